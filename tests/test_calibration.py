"""Temperature scaling, the balanced decision rule, test-time flips and the weight average: the
pieces that turn a trained network into calibrated, balanced predictions."""

import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bundle import calibration
from bundle.calibration import CalibratedSoftmaxd, Calibration, fit_decision_rule, fit_temperature
from bundle.handlers import BestModelSaver, WeightAverage
from bundle.inferers import FlipAveragingInferer
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
