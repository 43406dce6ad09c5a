"""Real ``monai.bundle run`` train / evaluate / infer / export on a small synthetic set, on the CPU."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121
from PIL import Image

from bundle import data, ood
from bundle.calibration import Calibration
from bundle.labels import CLASS_NAMES
from bundle.synthetic import generate
from tests.bundle_runs import EVALUATE, EVALUATE_CHAIN, FAST, INFERENCE, REPO, TRAIN, read_json, run_bundle
from tests.test_metrics import TRIAGE_KEYS

EPOCHS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """420 synthetic images and their lesion-level datalist."""
    root = tmp_path_factory.mktemp("train_data")
    images = generate(root / "images_root", n_images=420, image_size=(64, 48), seed=1)
    datalist = data.write_datalist(
        data.split_by_lesion(data.read_ham10000(images), seed=0), root / "datalist.json", images
    )
    return {"dataset_dir": images, "datalist": datalist}


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One bundle trained for a few epochs; tests read (never write) its folder."""
    bundle_root = tmp_path_factory.mktemp("trained")
    result = run_bundle(TRAIN, bundle_root=bundle_root, max_epochs=EPOCHS, **dataset, **FAST)
    return {"bundle_root": bundle_root, "log": result.stdout + result.stderr, **dataset}


@pytest.fixture(scope="module")
def evaluated(trained):
    run_bundle(
        EVALUATE,
        bundle_root=trained["bundle_root"],
        dataset_dir=trained["dataset_dir"],
        datalist=trained["datalist"],
        **FAST,
    )
    return trained["bundle_root"] / "eval"


def _network() -> torch.nn.Module:
    return DenseNet121(spatial_dims=2, in_channels=3, out_channels=len(CLASS_NAMES)).eval()


def test_best_model_is_a_plain_state_dict_loadable_on_cpu(trained):
    state = torch.load(trained["bundle_root"] / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    _network().load_state_dict(state)  # strict: same keys and shapes as the declared network


def test_training_records_history_and_resume_checkpoint(trained):
    models = trained["bundle_root"] / "models"
    history = read_json(models / "history.json")
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    assert all(np.isfinite(row["train_loss"]) and 0 <= row["val_auc"] <= 1 for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    checkpoint = torch.load(models / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "trainer", "best_model_saver"} <= checkpoint.keys()
    trainer = checkpoint["trainer"]
    assert trainer["iteration"] == EPOCHS * trainer["epoch_length"]
    best = checkpoint["best_model_saver"]
    assert best["best_metric"] == pytest.approx(max(row["val_auc"] for row in history))
    assert list((trained["bundle_root"] / "eval").glob("events.out.tfevents.*")), "no TensorBoard log"


def test_evaluation_shows_the_network_learned(evaluated, trained):
    metrics = read_json(evaluated / "metrics.json")
    testing = read_json(trained["datalist"])["testing"]
    assert metrics["n_images"] == len(testing)
    assert metrics["split"] == "testing" and "in_sample" not in metrics
    assert metrics["auc_macro"] > 0.8, metrics  # chance is 0.5
    assert set(metrics["auc_per_class"]) == set(CLASS_NAMES)
    assert np.array(metrics["confusion_matrix"]).sum() == len(testing)
    for key in ("accuracy", "balanced_accuracy"):
        assert 0 <= metrics[key] <= 1
    for name in (
        "roc_curves.png",
        "confusion_matrix.png",
        "training_curves.png",
        "reliability.png",
        "malignant_roc.png",
    ):
        with Image.open(evaluated / name) as image:
            assert image.format == "PNG" and image.width > 300


def _predictions(path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {row["image"]: np.array([float(row[f"p_{c}"]) for c in CLASS_NAMES]) for row in rows}


def test_inference_on_a_folder_writes_one_row_per_image(trained, tmp_path):
    folder = tmp_path / "to_classify"
    folder.mkdir()
    sources = sorted((trained["dataset_dir"] / "images").glob("*.jpg"))[:5]
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    run_bundle(INFERENCE, bundle_root=trained["bundle_root"], input=folder, output_dir=tmp_path / "out", **FAST)
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["image"] for row in rows) == sorted(str(folder / s.name) for s in sources)
    rule = Calibration.from_sidecar(trained["bundle_root"] / "models" / "model.pt")
    for row in rows:
        p = np.array([float(row[f"p_{c}"]) for c in CLASS_NAMES])
        assert p.sum() == pytest.approx(1, abs=1e-4)
        assert row["predicted_class"] == CLASS_NAMES[int(rule.decide(p))]


def test_training_stores_the_calibration_fitted_on_validation(trained):
    sidecar = read_json(trained["bundle_root"] / "models" / "model.json")
    fit = sidecar["calibration"]["fit"]
    assert fit["n_images"] == len(read_json(trained["datalist"])["validation"])
    assert sidecar["calibration"]["temperature"] > 0 and len(sidecar["calibration"]["class_bias"]) == len(CLASS_NAMES)
    assert fit["nll_after"] <= fit["nll_before"] + 1e-9, "the temperature minimises the validation NLL"
    assert fit["balanced_accuracy_rule"] >= fit["balanced_accuracy_argmax"], "tau 0 (the argmax) is on the grid"
    assert sidecar["calibration"]["refer_threshold"] == fit["triage"]["threshold"] is not None
    assert fit["triage"]["sensitivity"] >= 0.95, "the refer threshold catches 95% of validation malignant lesions"
    # the out-of-distribution guard, in a file the sidecar names: its thresholds fitted on the validation split,
    # its statistics on the training split once training completed (ood_statistics: training, the default)
    guard = sidecar["ood"]
    assert guard["fit"]["n_images"] == fit["n_images"] and guard["target_share"] == 0.95
    assert guard["fit"]["statistics_split"] == "training"
    assert guard["fit"]["n_statistics_images"] == len(read_json(trained["datalist"])["training"])
    assert set(guard["thresholds"]) == set(ood.METHODS)
    assert (trained["bundle_root"] / "models" / guard["file"]).is_file()
    assert [p.name for p in (trained["bundle_root"] / "models").glob(ood.GUARD_GLOB)] == [guard["file"]]
    for method, shares in guard["fit"]["validation_flagged_share"].items():
        assert shares["all"] <= 0.05 + 1e-9, f"{method}: its threshold keeps 95% of the held-out validation scores"


def test_evaluation_reports_the_share_of_test_images_the_guard_flags(evaluated, trained):
    report = read_json(evaluated / "metrics.json")["ood"]
    sidecar = read_json(trained["bundle_root"] / "models" / "model.json")
    method = read_json(REPO / "configs" / "inference.json")["ood_method"]
    assert report["method"] == method and report["threshold"] == sidecar["ood"]["thresholds"][method]
    assert set(report["flagged_share"]["per_class"]) == set(CLASS_NAMES)
    assert set(report["flagged_share_by_method"]) == set(ood.METHODS)
    assert report["statistics_split"] == sidecar["ood"]["fit"]["statistics_split"] == "training"
    per_class, limit = report["flagged_share"]["per_class"], ood.OVERFLAG_FACTOR * (1 - report["target_share"])
    assert set(report["overflagged_classes"]) == {name for name, share in per_class.items() if share and share > limit}
    assert 0 <= report["flagged_share"]["all"] <= 1 and (evaluated / "ood_scores.png").stat().st_size > 0
    present = [share for share in per_class.values() if share is not None]
    assert report["flagged_share"]["class_mean"] == pytest.approx(np.mean(present))
    with open(evaluated / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    flagged = [row["out_of_distribution"] == "true" for row in rows]
    assert np.mean(flagged) == pytest.approx(report["flagged_share"]["all"])


def test_evaluation_reports_calibration_and_operating_points(evaluated, trained):
    metrics = read_json(evaluated / "metrics.json")
    stored = read_json(trained["bundle_root"] / "models" / "model.json")["calibration"]
    calibration = metrics["calibration"]
    assert calibration["temperature"] == stored["temperature"]
    assert calibration["expected_calibration_error_after"] == metrics["expected_calibration_error"]
    assert {"expected_calibration_error_before", "nll_before", "nll_after"} <= calibration.keys()
    assert metrics["decision_rule"]["class_bias"] == stored["class_bias"]
    assert 0 <= metrics["balanced_accuracy_argmax"] <= 1
    for point in metrics["operating_points"].values():
        assert point["at_sensitivity_0.95"]["sensitivity"] >= 0.95
        assert 0 <= point["decision"]["specificity"] <= 1
    assert 0 <= metrics["accuracy_argmax"] <= 1 and metrics["decision_rule"]["rule"] == "balanced"


def test_evaluation_reports_the_triage_answer_at_the_validation_threshold(evaluated, trained):
    """metrics.json's triage block: the sidecar's threshold, and its operating point on the testing split as
    predictions.csv's served malignant probability and refer answer give it."""
    triage = read_json(evaluated / "metrics.json")["triage"]
    assert set(triage) == TRIAGE_KEYS
    stored = read_json(trained["bundle_root"] / "models" / "model.json")["calibration"]
    assert triage["threshold"] == stored["refer_threshold"] is not None
    assert (triage["target_sensitivity"], triage["malignant_classes"]) == (0.95, ["akiec", "bcc", "mel"])
    malignant_ids = {CLASS_NAMES.index(c) for c in ("akiec", "bcc", "mel")}
    labels = {
        Path(item["image"]).name: item["label"] in malignant_ids for item in read_json(trained["datalist"])["testing"]
    }
    with open(evaluated / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    is_malignant = np.array([labels[Path(row["image"]).name] for row in rows])
    refer = np.array([row["refer"] == "true" for row in rows])
    for row in rows:  # the CSV rounds to 6 decimals: compare away from the threshold
        if abs(float(row["malignant_probability"]) - triage["threshold"]) > 1e-5:
            assert (row["refer"] == "true") == (float(row["malignant_probability"]) > triage["threshold"]), row
    assert (triage["n_malignant"], triage["n_benign"]) == (is_malignant.sum(), (~is_malignant).sum())
    assert triage["sensitivity"] == pytest.approx(refer[is_malignant].mean())
    assert triage["specificity"] == pytest.approx(1 - refer[~is_malignant].mean())
    assert triage["malignant_auc"] > 0.5


def test_inference_and_evaluation_share_one_preprocessing(evaluated, trained, tmp_path):
    """inference.json over the testing split gives the evaluation's probabilities for every image, through the
    per-sample chain and through the default fast data path alike: the preprocessing ends on the 8-bit levels
    the image cache stores (without that step the rounding moved this barely trained model's probabilities by
    about a percent, and answers across fitted thresholds now and then)."""
    run_bundle(
        INFERENCE,
        bundle_root=trained["bundle_root"],
        input=trained["datalist"],
        dataset_dir=trained["dataset_dir"],
        output_dir=tmp_path / "inference",
        ood_probabilities=True,  # the rows the guard flags keep their probabilities, to compare them all
        **FAST,
    )
    run_bundle(
        EVALUATE_CHAIN,
        bundle_root=trained["bundle_root"],
        dataset_dir=trained["dataset_dir"],
        datalist=trained["datalist"],
        output_dir=tmp_path / "chain",
        **FAST,
    )
    inferred = _predictions(tmp_path / "inference" / "predictions.csv")
    by_chain = _predictions(tmp_path / "chain" / "predictions.csv")
    by_fast_path = _predictions(evaluated / "predictions.csv")
    assert inferred.keys() == by_chain.keys() == by_fast_path.keys()
    for image, p in inferred.items():  # the CSVs hold 6 decimals
        np.testing.assert_allclose(p, by_chain[image], atol=2e-6)
        np.testing.assert_allclose(p, by_fast_path[image], atol=2e-6)


def test_torchscript_export_matches_the_eager_model(trained):
    models = trained["bundle_root"] / "models"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "ckpt_export",
            "network_def",
            "--filepath",
            str(models / "model.ts"),
            "--ckpt_file",
            str(models / "model.pt"),
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            INFERENCE,
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    scripted = torch.jit.load(str(models / "model.ts"), map_location="cpu").eval()
    eager = _network()
    eager.load_state_dict(torch.load(models / "model.pt", map_location="cpu", weights_only=True))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), atol=1e-5, rtol=1e-5)


def test_evaluation_falls_back_to_validation_without_a_testing_split(trained, tmp_path):
    content = read_json(trained["datalist"])
    content["testing"] = []
    datalist = tmp_path / "no_testing.json"
    datalist.write_text(json.dumps(content))
    run_bundle(
        EVALUATE,
        bundle_root=trained["bundle_root"],
        dataset_dir=trained["dataset_dir"],
        datalist=datalist,
        output_dir=tmp_path / "eval",
        **FAST,
    )
    assert read_json(tmp_path / "eval" / "metrics.json")["n_images"] == len(content["validation"])


def test_calibrate_json_refits_a_models_calibration_in_place(trained, tmp_path):
    """A model whose sidecar has no calibration (trained elsewhere, or before) gets one from the validation split."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes((trained["bundle_root"] / "models" / "model.pt").read_bytes())
    stored = read_json(trained["bundle_root"] / "models" / "model.json")
    (models / "model.json").write_text(json.dumps({k: v for k, v in stored.items() if k != "calibration"}))
    run_bundle(
        "['configs/train.json','configs/calibrate.json']",
        bundle_root=tmp_path,
        dataset_dir=trained["dataset_dir"],
        datalist=trained["datalist"],
        **FAST,
    )
    refitted = read_json(models / "model.json")
    assert refitted["epoch"] == stored["epoch"], "the rest of the sidecar is kept"
    assert refitted["calibration"]["fit"]["n_images"] == len(read_json(trained["datalist"])["validation"])
    assert refitted["calibration"]["temperature"] == pytest.approx(stored["calibration"]["temperature"], rel=0.05)
    assert refitted["calibration"]["refer_threshold"] == pytest.approx(
        stored["calibration"]["refer_threshold"], rel=0.1
    )
    # the guard is refit with it, thresholds on the same validation images, statistics on the training split as
    # training's own refit, into a file of its own beside the weights
    assert refitted["ood"]["fit"]["n_images"] == refitted["calibration"]["fit"]["n_images"]
    assert refitted["ood"]["fit"]["statistics_split"] == "training"
    for method, threshold in stored["ood"]["thresholds"].items():
        assert refitted["ood"]["thresholds"][method] == pytest.approx(threshold, rel=1e-4), method
    assert [path.name for path in models.glob(ood.GUARD_GLOB)] == [refitted["ood"]["file"]]
    # with its statistics on validation (out-of-fold thresholds) it reads no training image: a datalist of the
    # validation split alone will do
    validation_only = tmp_path / "validation_only.json"
    validation_only.write_text(json.dumps({"validation": read_json(trained["datalist"])["validation"]}))
    run_bundle(
        "['configs/train.json','configs/calibrate.json']",
        bundle_root=tmp_path,
        dataset_dir=trained["dataset_dir"],
        datalist=validation_only,
        cache_dir=tmp_path / "validation_only",
        ood_statistics="validation",
        **FAST,
    )
    on_validation = read_json(models / "model.json")["ood"]
    assert on_validation["fit"]["statistics_split"] == "validation" and on_validation["fit"]["folds"] == ood.FOLDS
    assert on_validation["thresholds"]["energy"] == pytest.approx(stored["ood"]["thresholds"]["energy"], rel=1e-4)
    assert [path.name.split("-")[0] for path in (tmp_path / "validation_only").glob("*.npy")] == ["validation"]
    assert [path.name for path in models.glob(ood.GUARD_GLOB)] == [on_validation["file"]]
