"""Temperature scaling, the balanced decision rule, the refer threshold, test-time flips and the weight
average: the pieces that turn a trained network into calibrated, balanced predictions and a triage answer."""

import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bundle import calibration
from bundle.calibration import CalibratedSoftmaxd, Calibration, fit_decision_rule, fit_refer_threshold, fit_temperature
from bundle.handlers import BestModelSaver, WeightAverage
from bundle.inferers import FlipAveragingInferer
from bundle.labels import CLASS_NAMES
from bundle.metrics import balanced_accuracy, expected_calibration_error, operating_points
from bundle.sidecar import new_record, save_pair, verified_sidecar


def _sampled(n: int, temperature: float, priors: tuple[float, ...], seed: int = 0, spread: float = 3.0):
    """Logits whose softmax at ``temperature`` is the true class distribution, and labels drawn from it."""
    g = torch.Generator().manual_seed(seed)
    k = len(priors)
    logits = torch.randn(n, k, generator=g) * spread + torch.log(torch.tensor(priors)) * temperature
    labels = torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=g)[:, 0]
    return logits, labels


def test_temperature_scaling_recovers_an_overconfident_networks_temperature():
    logits, labels = _sampled(20_000, temperature=2.5, priors=(0.5, 0.3, 0.2))
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.5, rel=0.05)
    before = torch.softmax(logits, 1).numpy()
    after = Calibration(temperature).probabilities(logits).numpy()
    assert expected_calibration_error(after, labels.numpy()) < 0.02 < expected_calibration_error(before, labels.numpy())
    assert (after.argmax(1) == before.argmax(1)).all(), "temperature changes no ranking"


def test_the_decision_rule_trades_the_common_class_for_balanced_accuracy():
    logits, labels = _sampled(20_000, temperature=1.0, priors=(0.85, 0.1, 0.05), seed=1, spread=1.0)
    probabilities = torch.softmax(logits, 1).numpy()
    bias, tau = fit_decision_rule(probabilities, labels.numpy(), 3)
    rule = Calibration(class_bias=tuple(bias))
    argmax = balanced_accuracy(labels.numpy(), probabilities.argmax(1), 3)
    balanced = balanced_accuracy(labels.numpy(), rule.decide(probabilities), 3)
    assert tau > 0 and balanced > argmax + 0.03
    assert bias[0] < bias[1] < bias[2], "the rarer the class, the larger its bias"


def test_balanced_data_keeps_the_plain_argmax():
    logits, labels = _sampled(20_000, temperature=1.0, priors=(1 / 3, 1 / 3, 1 / 3), seed=2)
    probabilities = torch.softmax(logits, 1).numpy()
    bias, _ = fit_decision_rule(probabilities, labels.numpy(), 3)
    decided = Calibration(class_bias=tuple(bias)).decide(probabilities)
    assert (decided == probabilities.argmax(1)).mean() > 0.97


def test_the_fit_records_what_it_measured_on_validation():
    logits, labels = _sampled(5_000, temperature=2.0, priors=(0.7, 0.2, 0.1), seed=3)
    fitted = calibration.fit(logits, labels, 3)
    assert fitted.fit["n_images"] == 5_000
    assert fitted.fit["nll_after"] <= fitted.fit["nll_before"]
    assert fitted.fit["ece_after"] < fitted.fit["ece_before"]
    assert fitted.fit["balanced_accuracy_rule"] >= fitted.fit["balanced_accuracy_argmax"]


def test_calibration_round_trips_through_the_sidecar(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"")
    assert Calibration.from_sidecar(weights) == Calibration(), "no sidecar: the identity"
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [32, 32]}))
    assert Calibration.from_sidecar(weights) == Calibration(), "an older sidecar without calibration"
    stored = Calibration(1.7, (0.1, -0.2, 0.3), {"tau": 0.5})
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [32, 32], "calibration": stored.to_json()}))
    assert Calibration.from_sidecar(weights) == stored
    assert Calibration.from_sidecar(tmp_path / "model.ts") == stored, "an exported model shares the sidecar"


@pytest.mark.parametrize(
    "bad", [{"temperature": -1, "class_bias": None}, {"class_bias": [0.0]}, {"temperature": "warm", "class_bias": None}]
)
def test_a_malformed_calibration_names_the_sidecar(tmp_path, bad):
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [32, 32], "calibration": bad}))
    with pytest.raises(ValueError, match="model.json"):
        Calibration.from_sidecar(tmp_path / "model.pt")


def test_calibrated_softmax_postprocessing():
    logits = torch.tensor([2.0, 0.0, -1.0])
    out = CalibratedSoftmaxd("pred", Calibration(2.0))({"pred": logits, "label": 1})
    assert torch.allclose(out["pred"], torch.softmax(logits / 2, 0)) and out["label"] == 1


def test_flip_averaging_makes_a_network_flip_invariant():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(7))
    images = torch.rand(2, 3, 12, 16)
    network(images)
    inferer = FlipAveragingInferer()
    for axes in [(2,), (3,), (2, 3)]:
        assert torch.allclose(inferer(images, network), inferer(torch.flip(images, axes), network), atol=1e-5)
    assert torch.equal(FlipAveragingInferer(enabled=False)(images, network), network(images))


def _train_steps(network: torch.nn.Module, average: WeightAverage, steps: int) -> None:
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)

    def step(engine, batch):
        optimizer.zero_grad()
        network(batch).pow(2).mean().backward()
        optimizer.step()

    engine = Engine(step)
    average.attach(engine)
    engine.run([torch.ones(4, 3)] * steps, max_epochs=1)


def test_the_weight_average_lags_the_network_and_resumes():
    torch.manual_seed(0)
    network = torch.nn.Linear(3, 2)
    start = network.weight.detach().clone()
    average = WeightAverage(network, epochs=2, steps_per_epoch=5)
    assert average.decay == pytest.approx(0.9)
    _train_steps(network, average, steps=10)
    moved, averaged = (network.weight - start).norm(), (average.model.weight - start).norm()
    assert 0 < averaged < moved, "the average follows the network from behind"
    restored = WeightAverage(torch.nn.Linear(3, 2), epochs=2, steps_per_epoch=5)
    restored.load_state_dict(average.state_dict())
    assert torch.equal(restored.model.weight, average.model.weight)


def test_the_weight_average_is_torchs_ema_of_weights_and_batch_norm_statistics_across_a_resume():
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2)
    )
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    average = WeightAverage(network, epochs=2, steps_per_epoch=5)
    reference = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(average.decay), use_buffers=True)

    def step(engine, images):
        optimizer.zero_grad()
        network(images).pow(2).mean().backward()
        optimizer.step()

    def run(average: WeightAverage, steps: int) -> None:
        engine = Engine(step)
        average.attach(engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: reference.update_parameters(network))
        engine.run([torch.rand(8, 3, 6, 6) for _ in range(steps)], max_epochs=1)

    def assert_matches_reference(average: WeightAverage) -> None:
        ours, theirs = average.model.state_dict(), reference.module.state_dict()
        for name, tensor in theirs.items():
            if tensor.is_floating_point():
                assert torch.allclose(ours[name], tensor, atol=1e-6), name
        assert int(ours["1.num_batches_tracked"]) == int(network[1].num_batches_tracked), "counts are copied"

    run(average, steps=7)
    assert_matches_reference(average)
    restored = WeightAverage(network, epochs=2, steps_per_epoch=5)
    restored.load_state_dict(average.state_dict())
    run(restored, steps=3)  # a resumed average goes on averaging: it does not restart from a copy
    assert_matches_reference(restored)
    assert int(restored.averaged.n_averaged) == int(reference.n_averaged) == 10


def test_no_weight_average_validates_the_network_itself():
    network = torch.nn.Linear(3, 2)
    average = WeightAverage(network, epochs=0, steps_per_epoch=5)
    assert average.model is network and average.state_dict() == {}
    with pytest.raises(ValueError, match="ema_epochs"):
        WeightAverage(network, epochs=-1, steps_per_epoch=5)


def test_best_model_saver_stores_the_calibration_fitted_on_validation(tmp_path):
    logits, labels = _sampled(600, temperature=2.0, priors=(0.6, 0.3, 0.1), seed=4)
    one_hot = torch.nn.functional.one_hot(labels, 3)
    outputs = [{"logits": logits[i], "label": one_hot[i]} for i in range(len(labels))]
    engine = Engine(lambda e, batch: batch)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=0.8))
    path = tmp_path / "model.pt"
    BestModelSaver(torch.nn.Linear(2, 3), str(path), "val_auc", image_size=[32, 32], calibrate=True).attach(engine)
    engine.run([outputs[:300], outputs[300:]], max_epochs=1)
    stored = Calibration.from_sidecar(path)
    assert stored == calibration.fit(logits, labels, 3)
    assert stored.fit["n_images"] == 600 and stored.temperature == pytest.approx(2.0, rel=0.25)


def test_operating_points_reach_their_sensitivity():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 3000)
    probabilities = rng.dirichlet([1, 1, 1], 3000) * 0.5
    probabilities[np.arange(3000), labels] += 0.5
    points = operating_points(probabilities, labels, probabilities.argmax(1), ["a", "b", "c"])
    for name in "abc":
        for target in (0.90, 0.95):
            point = points[name][f"at_sensitivity_{target:.2f}"]
            assert point["sensitivity"] >= target and point["sensitivity"] == pytest.approx(target, abs=0.01)
            assert 0 <= point["specificity"] <= 1
        assert set(points[name]["decision"]) == {"sensitivity", "specificity", "ppv"}


def test_calibration_fitter_adds_the_fit_to_an_existing_sidecar(tmp_path):
    from bundle.handlers import CalibrationFitter

    logits, labels = _sampled(400, temperature=2.0, priors=(0.6, 0.3, 0.1), seed=5)
    one_hot = torch.nn.functional.one_hot(labels, 3)
    outputs = [{"logits": logits[i], "label": one_hot[i]} for i in range(len(labels))]
    path = tmp_path / "model.pt"
    weights = torch.nn.Linear(2, 3).state_dict()
    save_pair(path, weights, {**new_record(weights, [128, 128]), "epoch": 17})
    engine = Engine(lambda e, batch: batch)
    CalibrationFitter(str(path), image_size=[128, 128]).attach(engine)
    engine.run([outputs[:200], outputs[200:]], max_epochs=1)
    record = json.loads((tmp_path / "model.json").read_text())
    assert record["epoch"] == 17 and record["image_size"] == [128, 128], "the rest of the sidecar is kept"
    assert verified_sidecar(path) == record, "still the sidecar of these weights"
    assert Calibration.from_sidecar(path) == calibration.fit(logits, labels, 3)


def _seven_class_validation(n: int, seed: int):
    """Logits over the 7 HAM10000 classes, HAM10000-like priors, and labels drawn from them."""
    return _sampled(n, temperature=1.5, priors=(0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02), seed=seed, spread=2.0)


def test_the_refer_threshold_is_the_largest_reaching_the_target_sensitivity():
    rng = np.random.default_rng(0)
    for n_malignant in (1, 7, 19, 20, 21, 137):
        scores = np.r_[rng.random(n_malignant), rng.random(300)]
        is_malignant = np.r_[np.ones(n_malignant, bool), np.zeros(300, bool)]
        threshold = fit_refer_threshold(scores, is_malignant, 0.95)
        assert (scores[is_malignant] >= threshold).mean() >= 0.95, n_malignant
        higher = scores[is_malignant][scores[is_malignant] > threshold]
        if higher.size:  # the next malignant score up already misses the target
            assert (scores[is_malignant] >= higher.min()).mean() < 0.95, n_malignant
        assert threshold in scores[is_malignant], "a malignant image's own score"
    # 20 malignant images: 19 must be caught, so the threshold is the second lowest of their scores
    assert fit_refer_threshold(np.arange(20) / 20, np.ones(20, bool)) == 0.05
    # ties at the threshold are all referred: sensitivity 1 here, and no higher threshold reaches 0.95
    assert fit_refer_threshold(np.array([0.3, 0.3, 0.3, 0.9]), np.ones(4, bool)) == 0.3
    assert fit_refer_threshold(np.array([0.2, 0.8]), np.array([False, False])) is None, "nothing to fit on"


def test_the_fit_stores_a_refer_threshold_with_95_percent_validation_sensitivity():
    logits, labels = _seven_class_validation(3_000, seed=6)
    fitted = calibration.fit(logits, labels, 7)
    malignant = calibration.malignant_probability(fitted.probabilities(logits).numpy())
    is_malignant = np.isin(labels.numpy(), [CLASS_NAMES.index(c) for c in ("akiec", "bcc", "mel")])
    assert fitted.refer_threshold is not None and 0 < fitted.refer_threshold < 1
    assert (malignant[is_malignant] >= fitted.refer_threshold).mean() >= 0.95
    triage = fitted.fit["triage"]
    assert triage["threshold"] == fitted.refer_threshold and triage["target_sensitivity"] == 0.95
    assert triage["sensitivity"] >= 0.95 and triage["n_malignant"] == int(is_malignant.sum())
    assert triage["malignant_classes"] == ["akiec", "bcc", "mel"] and triage["malignant_auc"] > 0.5
    assert fitted.refer(malignant).tolist() == (malignant >= fitted.refer_threshold).tolist()
    assert calibration.fit(*_sampled(500, 1.0, (0.5, 0.5)), 2).refer_threshold is None, "no HAM10000 classes"


def test_the_refer_threshold_round_trips_through_the_sidecar_and_an_older_one_serves_no_referral(tmp_path):
    weights = tmp_path / "model.pt"
    stored = Calibration(1.3, tuple(range(7)), {"tau": 1.0}, refer_threshold=0.125)
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [32, 32], "calibration": stored.to_json()}))
    assert Calibration.from_sidecar(weights) == stored
    assert Calibration.from_sidecar(weights).refer(0.125) is True and stored.refer(0.1249) is False
    older = {k: v for k, v in stored.to_json().items() if k != "refer_threshold"}
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [32, 32], "calibration": older}))
    assert Calibration.from_sidecar(weights).refer_threshold is None
    assert Calibration.from_sidecar(weights).refer(0.99) is None, "no threshold: no referral, never a guess"


@pytest.mark.parametrize("bad", ["0.5", True, -0.1, 1.5, [0.5], {"value": 0.5}, float("nan")])
def test_a_malformed_refer_threshold_is_refused_naming_the_sidecar_and_the_key(tmp_path, bad):
    record = {"temperature": 1.0, "class_bias": None, "refer_threshold": bad}
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [32, 32], "calibration": record}))
    with pytest.raises(ValueError) as error:
        Calibration.from_sidecar(tmp_path / "model.pt")
    assert str(error.value).startswith(f"{tmp_path / 'model.json'}: 'calibration' key 'refer_threshold'")


def test_the_decision_rule_is_configurable_and_named(tmp_path):
    stored = Calibration(2.0, (0.0, 5.0, 0.0), refer_threshold=0.4)
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [32, 32], "calibration": stored.to_json()}))
    balanced = Calibration.from_sidecar(tmp_path / "model.pt", "balanced")
    argmax = Calibration.from_sidecar(tmp_path / "model.pt", "argmax")
    assert (balanced.decision_rule, argmax.decision_rule) == ("balanced", "argmax")
    assert (argmax.temperature, argmax.refer_threshold) == (2.0, 0.4), "only the class rule changes"
    p = np.array([[0.6, 0.3, 0.1]])
    assert (balanced.decide(p)[0], argmax.decide(p)[0]) == (1, 0)
    assert Calibration().decision_rule == "argmax", "no fitted rule: the most probable class, and it says so"
    with pytest.raises(ValueError, match=r"config key 'decision_rule' must be one of \['balanced', 'argmax'\]"):
        Calibration.from_sidecar(tmp_path / "model.pt", "majority")


def test_best_model_saver_stores_the_refer_threshold_fitted_on_validation(tmp_path):
    logits, labels = _seven_class_validation(700, seed=7)
    one_hot = torch.nn.functional.one_hot(labels, 7)
    outputs = [{"logits": logits[i], "label": one_hot[i]} for i in range(len(labels))]
    engine = Engine(lambda e, batch: batch)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=0.8))
    path = tmp_path / "model.pt"
    BestModelSaver(torch.nn.Linear(2, 7), str(path), "val_auc", image_size=[32, 32], calibrate=True).attach(engine)
    engine.run([outputs[:350], outputs[350:]], max_epochs=1)
    stored = Calibration.from_sidecar(path)
    assert stored.refer_threshold is not None
    assert stored.refer_threshold == calibration.fit(logits, labels, 7).refer_threshold
    assert json.loads((tmp_path / "model.json").read_text())["calibration"]["refer_threshold"] == stored.refer_threshold
