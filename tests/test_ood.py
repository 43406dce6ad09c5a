"""The out-of-distribution guard (bundle.ood): scores, the validation fit, its storage beside the weights."""

import json
import shutil

import numpy as np
import pytest
import torch

from bundle import ood
from bundle.inferers import FlipAveragingInferer
from bundle.labels import CLASS_NAMES
from bundle.predictor import Predictor
from bundle.sidecar import FINGERPRINT, SidecarError, read_sidecar, write_sidecar
from tests.serving import (
    FLAGGED_FIELDS,
    SERVED_FIELDS,
    bundle_with_random_weights,
    out_of_distribution_image,
    store_guard,
)

CLASSES, FEATURES = 7, 32


def _clusters(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features around one mean per class (all moved by ``shift``), their labels and a linear head's logits."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.arange(n) % CLASSES
    features = means[labels] + torch.randn(n, FEATURES, generator=generator) + shift
    head = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(98))
    return features, labels, features @ head


def test_thresholds_keep_the_target_share_of_new_in_distribution_images_and_flag_far_ones():
    features, labels, logits = _clusters(1400, seed=0)
    fitted = ood.fit(logits, features, labels)
    new_features, new_labels, new_logits = _clusters(4000, seed=1)
    far_features, _, far_logits = _clusters(500, seed=2, shift=8.0)
    for method in ood.METHODS:
        scores = ood.scores(method, new_logits, new_features, fitted.statistics).numpy()
        flagged = (scores > fitted.thresholds[method]).mean()
        assert 0.02 <= flagged <= 0.08, f"{method}: {flagged:.3f} of new in-distribution images flagged"
    for method in ood.FEATURE_METHODS:
        far = ood.scores(method, far_logits, far_features, fitted.statistics).numpy()
        assert (far > fitted.thresholds[method]).mean() == 1.0, method
    # out-of-fold and leave-one-out: the validation images' own scores were not fitted on themselves
    for method, shares in fitted.record["validation_flagged_share"].items():
        assert shares["all"] <= 0.05 + 1e-9 and len(shares["per_class"]) == CLASSES, method


def test_a_rare_class_that_varies_where_the_common_ones_do_not_is_not_hidden_by_the_guard():
    """One image in 50 is of a class that spreads five times as far as the others in four directions, as
    vascular lesions do in the real features. A covariance weighted by image count is the common classes',
    and flags 63% of that class's new images; with each class weighted equally (the default), a third."""
    means = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(99)) * 4
    spread = torch.ones(CLASSES, FEATURES)
    spread[:, :4], spread[-1, :4] = 0.2, 1.0

    def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.where(torch.arange(n) % 50 == 0, CLASSES - 1, torch.arange(n) % (CLASSES - 1))
        noise = torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))
        return means[labels] + noise * spread[labels], labels

    features, labels = images(2000, seed=0)
    new_features, new_labels = images(20000, seed=1)
    rare = new_labels == CLASSES - 1
    shares = {}
    for weights in ood.CLASS_WEIGHTS:
        fitted = ood.fit(torch.zeros(len(labels), CLASSES), features, labels, class_weights=weights)
        assert fitted.record["covariance_class_weights"] == weights

        def flagged(features: torch.Tensor, fitted: ood.GuardFit = fitted) -> torch.Tensor:
            return ood.scores("mahalanobis", None, features, fitted.statistics) > fitted.thresholds["mahalanobis"]

        shares[weights] = flagged(new_features)[rare].float().mean()
        assert flagged(new_features)[~rare].float().mean() <= 0.05
        assert flagged(new_features + 8.0).all()
    assert shares["equal"] <= 0.4 and shares["count"] >= 0.55


def test_statistics_from_the_training_split_come_from_it_alone_and_thresholds_from_validation():
    """``ood_statistics: training``: class means, covariance and kNN bank from the (larger) training split's
    features, the thresholds from the validation scores under them; new in-distribution images keep the
    target share and far ones are flagged as before."""
    reference_features, reference_labels, _ = _clusters(5000, seed=5)
    features, labels, logits = _clusters(1400, seed=0)
    fitted = ood.fit(logits, features, labels, reference=(reference_features, reference_labels))
    own = ood.fit(logits, features, labels)
    assert fitted.record["statistics_split"] == "training" and own.record["statistics_split"] == "validation"
    assert fitted.record["n_statistics_images"] == 5000 and fitted.record["n_images"] == 1400
    means = torch.stack([reference_features[reference_labels == c].mean(0) for c in range(CLASSES)])
    torch.testing.assert_close(fitted.statistics["class_means"], means)
    assert len(fitted.statistics["bank"]) == ood.KNN_BANK and len(own.statistics["bank"]) == 1400
    bank_rows = torch.nn.functional.normalize(reference_features.double(), dim=-1).float()
    assert all((bank_rows == row).all(dim=1).any() for row in fitted.statistics["bank"][:20])
    # the energy and softmax thresholds read the validation logits alone, whatever the statistics
    assert {m: fitted.thresholds[m] for m in ("energy", "msp")} == {m: own.thresholds[m] for m in ("energy", "msp")}
    new_features, _, new_logits = _clusters(4000, seed=1)
    far_features, _, far_logits = _clusters(500, seed=2, shift=8.0)
    for method in ood.FEATURE_METHODS:
        new = ood.scores(method, new_logits, new_features, fitted.statistics).numpy()
        assert 0.02 <= (new > fitted.thresholds[method]).mean() <= 0.08, method
        far = ood.scores(method, far_logits, far_features, fitted.statistics).numpy()
        assert (far > fitted.thresholds[method]).all(), method
    with pytest.raises(ValueError, match="ood_statistics"):
        ood.check_statistics("test")


def test_each_class_threshold_keeps_its_share_of_the_images_called_that_class_and_is_never_below_the_one():
    """A class whose images score higher (a rare class that varies more) gets a threshold of its own that keeps
    95% of the validation images the network calls it; a class that scores lower keeps the one threshold (so no
    class is flagged more than before), and a class called too few images too."""
    rng = np.random.default_rng(0)
    predicted = np.repeat([0, 1, 2], [400, 60, ood.CLASS_THRESHOLD_MIN_IMAGES - 1])
    scores = np.r_[rng.normal(0, 1, 400), rng.normal(3, 1, 60), rng.normal(9, 1, ood.CLASS_THRESHOLD_MIN_IMAGES - 1)]
    threshold = ood.threshold_for(scores, 0.95)
    low = ood.class_thresholds_for(-scores, predicted, ood.threshold_for(-scores, 0.95), 0.95, 4)
    by_class = ood.class_thresholds_for(scores, predicted, threshold, 0.95, 4)
    assert by_class[1] == ood.threshold_for(scores[predicted == 1], 0.95) > threshold
    assert (scores[predicted == 1] <= by_class[1]).mean() >= 0.95 > (scores[predicted == 1] <= threshold).mean()
    assert by_class[0] == threshold and by_class[3] == threshold, "lower-scoring and absent classes keep the one"
    assert by_class[2] == threshold, "a class called fewer than CLASS_THRESHOLD_MIN_IMAGES keeps the one"
    assert low[0] >= ood.threshold_for(-scores, 0.95)


def test_the_fit_stores_class_thresholds_and_each_image_is_judged_by_its_most_probable_class(tmp_path):
    """The fit's class thresholds go to the sidecar beside the one threshold; the served guard judges an image by
    the threshold of the class its logits make most probable ("class", the default), or by the one ("global").
    A fit from before class thresholds serves the one."""
    features, labels, logits = _clusters(700, seed=0)
    features[labels == 6] *= 1.5  # one class spreads further: its own threshold rises above the one
    fitted = ood.fit(logits, features, labels)
    for method in ood.METHODS:
        assert len(fitted.class_thresholds[method]) == CLASSES
        assert min(fitted.class_thresholds[method]) == fitted.thresholds[method]
    assert fitted.class_thresholds["mahalanobis"][6] > fitted.thresholds["mahalanobis"]
    by_class = fitted.record["validation_flagged_share_class_thresholds"]["mahalanobis"]
    assert by_class["all"] <= fitted.record["validation_flagged_share"]["mahalanobis"]["all"]

    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    record = {"image_size": [32, 32], FINGERPRINT: "sha256:" + "1" * 64}
    write_sidecar(weights, {**record, "ood": ood.store(weights, fitted, record[FINGERPRINT])})
    served = ood.Guard.from_sidecar(weights, "mahalanobis")
    assert served.class_thresholds == tuple(fitted.class_thresholds["mahalanobis"])
    assert ood.Guard.from_sidecar(weights, "mahalanobis", "global").class_thresholds is None
    # two images with the same score, one called class 6 and one class 0: only the second is flagged
    called = torch.zeros(2, CLASSES)
    called[0, 6] = called[1, 0] = 1.0
    between = (fitted.thresholds["mahalanobis"] + fitted.class_thresholds["mahalanobis"][6]) / 2
    results = [ood.OODResult(between, t, "mahalanobis", by_class=True) for t in served.thresholds(called)]
    assert [result.flagged for result in results] == [False, True]
    assert "the class it finds most probable" in results[1].reason
    with pytest.raises(ValueError, match="ood_thresholds"):
        ood.Guard.from_sidecar(weights, "mahalanobis", "per_class")

    block = read_sidecar(weights)["ood"]
    block["class_thresholds"]["mahalanobis"] = block["class_thresholds"]["mahalanobis"][:-1]
    write_sidecar(weights, {**record, "ood": block})
    with pytest.raises(SidecarError, match="6 class thresholds for 7 classes"):
        ood.Guard.from_sidecar(weights, "mahalanobis")
    del block["class_thresholds"]
    write_sidecar(weights, {**record, "ood": block})
    assert ood.Guard.from_sidecar(weights, "mahalanobis").class_thresholds is None


def test_evaluation_names_the_classes_the_guard_flags_far_more_than_its_target():
    labels = np.array([0] * 100 + [1] * 20 + [2] * 5)
    flagged = np.zeros(len(labels), bool)
    flagged[:5] = True  # 5% of class 0: the target
    flagged[100:103] = True  # 15% of class 1: over twice the target
    shares = ood.overflagged(flagged, labels, ["a", "b", "c", "d"], 0.95)
    assert shares == {"b": {"share": 0.15, "n": 20}}  # "c" is never flagged and "d" has no image


def test_the_served_mahalanobis_distance_is_the_quadratic_form_of_the_fitted_precision():
    features, labels, logits = _clusters(600, seed=3)
    statistics = ood.fit(logits, features, labels).statistics
    new_features = _clusters(50, seed=4)[0].double()
    centred = new_features[:, None, :] - statistics["class_means"].double()[None]
    expected = torch.einsum("ncf,fg,ncg->nc", centred, statistics["precision"].double(), centred).amin(dim=1)
    served = ood.scores("mahalanobis", None, new_features, statistics | ood.whitening(statistics))
    assert torch.allclose(served, expected, rtol=1e-6)


def test_the_threshold_is_the_smallest_score_the_target_share_stays_under():
    scores = np.arange(1, 101, dtype=float)
    assert ood.threshold_for(scores, 0.95) == 95.0
    assert (scores > ood.threshold_for(scores, 0.95)).mean() == 0.05
    with pytest.raises(ValueError, match="ood_target_share"):
        ood.check_target_share(1.0)
    with pytest.raises(ValueError, match="ood_method"):
        ood.check_method("softmax")
    with pytest.raises(ValueError, match="ood_class_weights"):
        ood.check_class_weights("balanced")


@pytest.mark.parametrize("views, crop_scale", [("flips", 1.0), ("dihedral", 1.0), ("flips", 0.75)])
@pytest.mark.parametrize("batched", [False, True])
def test_the_tapped_features_are_those_of_the_averaged_logits(views, crop_scale, batched):
    """With test-time views the inferer averages the views' logits, a pass per view or one pass over all of
    them; the tap averages each image's features over its views, and the classifier of those is the served
    logits."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, CLASSES)
    ).eval()
    tap = ood.FeatureTap(network)
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        logits = FlipAveragingInferer(views=views, batched=batched, crop_scale=crop_scale)(x, network)
        features = tap.take(len(x))
        head = network[-1]
        torch.testing.assert_close(torch.nn.functional.linear(features, head.weight, head.bias), logits)
        network(x[:3])
        with pytest.raises(RuntimeError, match="not whole views of a batch of 5"):
            tap.take(len(x))
    with pytest.raises(RuntimeError, match="no forward pass"):
        tap.take(len(x))


def test_a_torchscript_network_hides_its_features_and_says_what_to_do():
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="ood_method"):
        ood.FeatureTap(scripted)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, synthetic_dir):
    root = bundle_with_random_weights(tmp_path_factory.mktemp("guarded"), trained_image_size=[32, 32])
    store_guard(root, synthetic_dir)
    return root


def test_a_flagged_image_gets_no_diagnosis_in_the_same_batch_as_a_lesion(guarded, synthetic_dir):
    lesion = sorted((synthetic_dir / "images").glob("*.jpg"))[0].read_bytes()
    answered, flagged = Predictor(guarded, device="cpu").predict([lesion, out_of_distribution_image()])
    assert answered.to_json()["out_of_distribution"] is False and set(answered.to_json()) == SERVED_FIELDS
    answer = flagged.to_json()
    assert set(answer) == FLAGGED_FIELDS and answer["class"] is None and answer["out_of_distribution"] is True
    assert answer["ood_score"] > answer["ood_threshold"] and "not answered" in answer["reason"]
    # each answer's threshold is that of its most probable class (inference.json's ood_thresholds "class")
    guard = ood.Guard.from_sidecar(guarded / "models" / "model.pt", "mahalanobis")
    served = answered.to_json()
    assert served["ood_threshold"] == guard.class_thresholds[CLASS_NAMES.index(served["most_probable_class"])]
    # for research use, the probabilities can still come with the flag
    parser_key = Predictor(guarded, device="cpu")
    parser_key.ood_probabilities = True
    research = parser_key.predict([out_of_distribution_image()])[0].to_json()
    assert research["out_of_distribution"] is True and set(research) == SERVED_FIELDS | {"reason"}


def test_the_views_as_one_batch_serve_the_same_answers_and_scores(guarded, synthetic_dir):
    """``tta_batched`` (the default on a GPU) changes how the views reach the network, not what is served."""
    images = [path.read_bytes() for path in sorted((synthetic_dir / "images").glob("*.jpg"))[:3]]
    images.insert(1, out_of_distribution_image())
    predictor = Predictor(guarded, device="cpu")
    assert predictor.inferer.batched is False
    per_view = [result.to_json() for result in predictor.predict(images)]
    predictor.inferer.batched = True
    batched = [result.to_json() for result in predictor.predict(images)]
    assert [r["out_of_distribution"] for r in batched] == [False, True, False, False]
    for one, other in zip(per_view, batched, strict=True):
        assert one["class"] == other["class"] and one["ood_score"] == pytest.approx(other["ood_score"], rel=1e-5)
        assert one.get("probabilities") == pytest.approx(other.get("probabilities"), abs=1e-5)


def test_every_method_can_be_served_and_none_turns_the_guard_off(guarded, synthetic_dir):
    lesion = sorted((synthetic_dir / "images").glob("*.jpg"))[0].read_bytes()
    for method in ood.METHODS:
        guard = ood.Guard.from_sidecar(guarded / "models" / "model.pt", method)
        assert guard.method == method and guard.needs_features == (method in ood.FEATURE_METHODS)
    assert ood.Guard.from_sidecar(guarded / "models" / "model.pt", ood.OFF) is None
    predictor = Predictor(guarded, device="cpu")
    predictor.guard = None
    assert predictor.predict([lesion])[0].to_json()["out_of_distribution"] is None


def test_a_guard_file_that_does_not_match_the_weights_is_refused(guarded, tmp_path):
    weights = tmp_path / "models" / "model.pt"
    weights.parent.mkdir()
    weights.write_bytes((guarded / "models" / "model.pt").read_bytes())
    record = read_sidecar(guarded / "models" / "model.pt")
    guard_file = ood.guard_file(guarded / "models" / "model.pt")
    write_sidecar(weights, record)

    with pytest.raises(SidecarError, match="not beside"):  # the sidecar names a file that did not come along
        ood.Guard.from_sidecar(weights, "mahalanobis")

    tampered = bytearray(guard_file.read_bytes())
    tampered[-10] ^= 0xFF
    (weights.parent / guard_file.name).write_bytes(bytes(tampered))
    with pytest.raises(SidecarError, match="sha256 differs"):
        ood.Guard.from_sidecar(weights, "knn")

    # a genuine guard file, but fitted for other weights (its own fingerprint says so)
    statistics = torch.load(guard_file, weights_only=True)
    statistics[FINGERPRINT] = "sha256:" + "0" * 64
    other = ood.GuardFit(
        {m: 1.0 for m in ood.METHODS}, {k: v for k, v in statistics.items() if k != FINGERPRINT}, 0.95, {}
    )
    block = ood.store(weights, other, "sha256:" + "0" * 64)
    write_sidecar(weights, {**record, "ood": block})
    with pytest.raises(SidecarError, match="other weights"):
        ood.Guard.from_sidecar(weights, "mahalanobis")
    # logit methods need no statistics, but packaging checks the whole fit before anything ships
    from bundle.predictor import bundle_files

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.json").write_text(json.dumps({}))
    with pytest.raises(SidecarError, match="other weights"):
        bundle_files(tmp_path, weights)


def test_a_new_fit_replaces_the_old_file_only_once_the_sidecar_names_it(guarded, tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes((guarded / "models" / "model.pt").read_bytes())
    record = read_sidecar(guarded / "models" / "model.pt")
    statistics = ood.load_fit(guarded / "models" / "model.pt")[1]
    fits = [ood.GuardFit({m: float(i) for m in ood.METHODS}, statistics, 0.95, {}) for i in range(2)]
    first = ood.store(weights, fits[0], record[FINGERPRINT])
    write_sidecar(weights, {**record, "ood": first})
    second = ood.store(weights, fits[1], record[FINGERPRINT])  # a kill here leaves the first pair intact
    assert ood.Guard.from_sidecar(weights, "knn").threshold == 0.0
    write_sidecar(weights, {**record, "ood": second})
    ood.remove_stale(weights)
    assert [path.name for path in tmp_path.glob(ood.GUARD_GLOB)] == [second["file"]]
    assert ood.Guard.from_sidecar(weights, "knn").threshold == 1.0


def test_the_measurement_scores_every_set_and_method_against_the_test_split(guarded, synthetic_dir, tmp_path):
    """scripts/evaluate_ood.py as users run it: built-in sets, a folder of one's own, the guard's cost."""
    import subprocess
    import sys

    from tests.bundle_runs import REPO

    def script(name: str, *arguments) -> str:
        result = subprocess.run(
            [sys.executable, REPO / "scripts" / name, *map(str, arguments)], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    datalist = tmp_path / "datalist.json"
    script("prepare_data.py", "--dataset_dir", synthetic_dir, "--output", datalist)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "green.jpg").write_bytes(out_of_distribution_image())
    output = tmp_path / "ood.json"
    printed = script(
        "evaluate_ood.py",
        *("--bundle_root", guarded, "--dataset_dir", synthetic_dir, "--datalist", datalist),
        # a folder named like a built-in set replaces it
        *("--folders", json.dumps({"mine": str(mine), "far_medical": str(mine)})),
        *("--latency_batches", 2, "--output", output),
    )
    results = json.loads(output.read_text())
    n_test = len(json.loads(datalist.read_text())["testing"])
    assert results["in_distribution"]["n"] == n_test and results["served_method"] == "mahalanobis"
    far = {"far_photos", "far_synthetic", "far_medical"}
    near = {"near_blurred", "near_cropped", "near_inverted", "near_greyscale", "near_rotated_black_borders"}
    assert set(results["sets"]) == {"mine", "far_all"} | far | near
    for name, by_method in results["sets"].items():
        assert set(by_method) == set(ood.METHODS), name
        for scores in by_method.values():
            assert scores["n"] > 0 and 0 <= scores["auroc"] <= 1 and 0 <= scores["flagged"] <= 1
    assert results["sets"]["far_all"]["knn"]["n"] == sum(results["sets"][name]["knn"]["n"] for name in far)
    assert results["sets"]["mine"]["mahalanobis"] == {"n": 1, "auroc": 1.0, "fpr_at_95_tpr": 0.0, "flagged": 1.0}
    assert results["sets"]["far_medical"] == results["sets"]["mine"]
    assert results["latency"]["ratio"] > 0 and "RESULT guard_latency_ratio=" in printed
    # one's own folders alone, as the command line spells it, and the guard refitted with each statistics split
    # and class weighting
    printed = script(
        "evaluate_ood.py",
        *("--bundle_root", guarded, "--dataset_dir", synthetic_dir, "--datalist", datalist),
        *("--folders", json.dumps({"mine": str(mine)}), "--builtin", "false", "--latency_batches", 0),
        *("--output", output, "--refit", "true"),
    )
    refitted = json.loads(output.read_text())
    fits = {f"{split}/{weights}" for split in ood.STATISTICS for weights in ood.CLASS_WEIGHTS}
    assert set(refitted["sets"]) == {"mine"} and set(refitted["refits"]) == fits
    for name, refit in refitted["refits"].items():
        assert refit["sets"] == {"mine": {"n": 1, "auroc": 1.0, "fpr_at_95_tpr": 0.0, "flagged": 1.0}}, name
        shares = refit["in_distribution"]
        present = [share for share in shares["per_class"].values() if share is not None]
        assert set(shares["per_class"]) == set(CLASS_NAMES) and shares["class_mean"] == pytest.approx(np.mean(present))
    assert "refitted with its statistics on each split and each class weighting" in printed

    # the same built-in sets, written as files for other tools
    written = tmp_path / "sets"
    script("ood_sets.py", "--output_dir", written, "--dataset_dir", synthetic_dir, "--datalist", datalist)
    counts = json.loads((written / "sets.json").read_text())
    assert set(counts) == far | near
    for name, count in counts.items():
        assert len(list((written / name).glob("*.jpg"))) == count, name
        assert name == "far_medical" or count == results["sets"][name]["msp"]["n"], name
    # ... and read back as the sets of a GPU session (scripts/gpu_session.sh carries them): --sets_dir
    script(
        "evaluate_ood.py",
        *("--bundle_root", guarded, "--dataset_dir", synthetic_dir, "--datalist", datalist),
        *("--sets_dir", written, "--builtin", "false", "--latency_batches", 0, "--output", output),
    )
    read_back = json.loads(output.read_text())["sets"]
    assert {name: read_back[name]["mahalanobis"]["n"] for name in counts} == counts
    missing = subprocess.run(
        [sys.executable, REPO / "scripts" / "evaluate_ood.py", "--bundle_root", guarded, "--dataset_dir", synthetic_dir]
        + ["--datalist", datalist, "--sets_dir", tmp_path, "--builtin", "false", "--latency_batches", "0"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and f"--sets_dir: {tmp_path / 'sets.json'} is missing" in missing.stderr

    # unreadable inputs are named before any work: a broken test image, a datalist without its dataset folder
    content = json.loads(datalist.read_text())
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_dir, broken)
    (broken / content["testing"][0]["image"]).write_bytes(b"not a jpeg")
    refused = subprocess.run(
        [sys.executable, REPO / "scripts" / "evaluate_ood.py", "--bundle_root", guarded, "--dataset_dir", broken]
        + ["--datalist", datalist, "--builtin", "false", "--latency_batches", "0"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and f"testing[0] {content['testing'][0]['image']}: " in refused.stderr
    alone = subprocess.run(
        [sys.executable, REPO / "scripts" / "ood_sets.py", "--output_dir", tmp_path / "x", "--datalist", datalist],
        capture_output=True,
        text=True,
    )
    assert alone.returncode != 0 and "names images relative to a dataset folder: pass --dataset_dir" in alone.stderr
