"""The serving predictor gives the bundle run's probabilities for the same files, and rejects bad bytes one by one."""

import csv
import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.networks.nets import DenseNet121
from PIL import Image

from bundle import sidecar
from bundle.handlers import BestModelSaver
from bundle.labels import CLASS_LABELS, CLASS_NAMES
from bundle.predictor import Prediction, Predictor, Rejection, RejectionKind, bundle_files, trained_image_size
from bundle.sidecar import SidecarError
from tests.bundle_runs import INFERENCE, REPO, run_bundle
from tests.serving import bad_image_bytes, bundle_with_random_weights, decoded_rgb, encode, mode_variants, png_header

TOLERANCE = 1e-5
N_REAL_IMAGES = 6


@pytest.fixture(scope="module")
def bundle_root_32(tmp_path_factory) -> Path:
    """The same weights as ``bundle_root``, with a sidecar saying they were trained at 32 x 32."""
    return bundle_with_random_weights(tmp_path_factory.mktemp("bundle_root_32"), trained_image_size=[32, 32])


@pytest.fixture(scope="module")
def predictor_32(bundle_root_32) -> Predictor:
    return Predictor(bundle_root_32, device="cpu")


@pytest.fixture(scope="module")
def good_jpeg(synthetic_dir) -> bytes:
    return sorted((synthetic_dir / "images").glob("*.jpg"))[0].read_bytes()


def _bundle_run_probabilities(bundle_root: Path, folder: Path, output_dir: Path, **overrides) -> dict[str, np.ndarray]:
    """``monai.bundle run --config_file configs/inference.json --input folder``: probabilities per file name."""
    run_bundle(
        INFERENCE,
        bundle_root=bundle_root,
        input=folder,
        output_dir=output_dir,
        num_workers=0,
        batch_size=8,
        device="$torch.device('cpu')",
        **overrides,
    )
    with open(output_dir / "predictions.csv", newline="") as f:
        return {
            Path(row["image"]).name: np.array([float(row[f"p_{c}"]) for c in CLASS_NAMES]) for row in csv.DictReader(f)
        }


def _served(predictor: Predictor, folder: Path, names: list[str]) -> np.ndarray:
    results = predictor.predict([(folder / name).read_bytes() for name in names])
    assert all(isinstance(result, Prediction) for result in results), results
    return np.array([[result.probabilities[c] for c in CLASS_NAMES] for result in results])


def _assert_parity(predictor: Predictor, bundle_root: Path, folder: Path, tmp_path: Path, **overrides) -> np.ndarray:
    expected = _bundle_run_probabilities(bundle_root, folder, tmp_path / "bundle_run", **overrides)
    names = sorted(expected)
    served = _served(predictor, folder, names)
    np.testing.assert_allclose(served, np.array([expected[name] for name in names]), rtol=0, atol=TOLERANCE)
    # not vacuous: the images are told apart by far more than the tolerance
    assert np.ptp(served, axis=0).max() > 100 * TOLERANCE
    return served


@pytest.fixture(scope="module")
def few_jpegs(synthetic_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("few_jpegs")
    for source in sorted((synthetic_dir / "images").glob("*.jpg"))[:4]:
        (folder / source.name).write_bytes(source.read_bytes())
    return folder


def test_probabilities_equal_the_bundle_run_on_synthetic_jpegs_and_converted_modes(
    predictor, bundle_root, synthetic_dir, tmp_path
):
    folder = tmp_path / "images"
    folder.mkdir()
    sources = sorted((synthetic_dir / "images").glob("*.jpg"))[:8]
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    for name, data in mode_variants(decoded_rgb(sources[0].read_bytes())).items():
        (folder / name).write_bytes(data)
    _assert_parity(predictor, bundle_root, folder, tmp_path)


def test_probabilities_equal_the_bundle_run_on_real_ham10000_jpegs(predictor, bundle_root, ham10000_dir, tmp_path):
    images = sorted(p for p in ham10000_dir.rglob("*.jpg"))
    assert images, f"no JPEGs under {ham10000_dir}"
    folder = tmp_path / "images"
    folder.mkdir()
    for source in random.Random(0).sample(images, min(N_REAL_IMAGES, len(images))):
        (folder / source.name).write_bytes(source.read_bytes())
    _assert_parity(predictor, bundle_root, folder, tmp_path)


def test_probabilities_equal_the_bundle_run_on_big_rotated_and_shrunk_images(
    predictor, bundle_root, synthetic_dir, tmp_path
):
    """The shrink and the EXIF turn are the config's own preprocessing: served = bundle run, at 1e-5."""
    folder = tmp_path / "images"
    folder.mkdir()
    pictures = iter(decoded_rgb(path.read_bytes()) for path in sorted((synthetic_dir / "images").glob("*.jpg")))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter; shown upright
    for name, size, image_format, params in (
        ("phone.jpg", (4_000, 3_000), "JPEG", {"quality": 92}),
        ("original.jpg", (600, 450), "JPEG", {}),
        ("sideways.jpg", (3_000, 4_000), "JPEG", {"exif": exif.tobytes()}),
        ("sideways.png", (450, 600), "PNG", {"exif": exif.tobytes()}),
        ("scan.png", (1_600, 1_200), "PNG", {}),
    ):
        (folder / name).write_bytes(
            encode(next(pictures).resize(size, Image.Resampling.BICUBIC), image_format, **params)
        )
    _assert_parity(predictor, bundle_root, folder, tmp_path)


def test_prediction_names_the_most_probable_class(predictor, good_jpeg):
    [result] = predictor.predict([good_jpeg])
    assert result.class_name == max(result.probabilities, key=result.probabilities.get)
    assert result.probability == result.probabilities[result.class_name]
    assert sum(result.probabilities.values()) == pytest.approx(1, abs=1e-5)
    malignant = sum(result.probabilities[c] for c in ("akiec", "bcc", "mel"))
    assert result.to_json() == {
        "class": result.class_name,
        "label": CLASS_LABELS[result.class_name],
        "probability": result.probability,
        "probabilities": result.probabilities,
        "decision_rule": "argmax",  # this sidecar holds no fitted rule: the most probable class, and it says so
        "most_probable_class": result.class_name,
        "malignant_probability": pytest.approx(malignant, abs=1e-6),
        "refer": None,  # nor a refer threshold: no referral rather than a guessed one
        "refer_threshold": None,
        "out_of_distribution": None,  # nor an out-of-distribution fit: every image answered, and it says so
        "ood_score": None,
        "ood_threshold": None,
        "ood_method": None,
    }
    assert list(result.probabilities) == list(CLASS_NAMES)


def test_non_rgb_images_are_converted_and_classified(predictor, good_jpeg):
    variants = mode_variants(decoded_rgb(good_jpeg))
    results = predictor.predict(list(variants.values()))
    assert all(isinstance(result, Prediction) for result in results), dict(zip(variants, results, strict=True))


EXPECTED_KIND = {
    "empty": RejectionKind.EMPTY,
    "random_64_bytes": RejectionKind.NOT_AN_IMAGE,
    "text_1": RejectionKind.NOT_AN_IMAGE,
    "jpeg_cut_at_0.50": RejectionKind.UNDECODABLE,
    "png_cut_at_0.50": RejectionKind.UNDECODABLE,
    "png_declares_100000x100000": RejectionKind.TOO_LARGE,  # Pillow's decompression-bomb error
    "png_declares_6000x5000": RejectionKind.TOO_LARGE,  # over the predictor's limit, under Pillow's
    "png_bomb_6000x5000": RejectionKind.TOO_LARGE,
    "format_gif": RejectionKind.UNSUPPORTED_FORMAT,
    "format_bmp": RejectionKind.UNSUPPORTED_FORMAT,
}


def test_each_bad_image_gets_its_own_rejection_and_the_good_ones_are_unaffected(predictor, good_jpeg):
    bad = bad_image_bytes(good_jpeg, encode(decoded_rgb(good_jpeg), "PNG"))
    names = list(bad)
    batch = []
    for name in names:  # a good image between every two bad ones
        batch += [good_jpeg, bad[name]]
    results = predictor.predict(batch)
    [alone] = predictor.predict([good_jpeg])
    for name, good_result, bad_result in zip(names, results[0::2], results[1::2], strict=True):
        assert isinstance(good_result, Prediction)
        np.testing.assert_allclose(
            list(good_result.probabilities.values()), list(alone.probabilities.values()), atol=TOLERANCE
        )
        assert isinstance(bad_result, Rejection), f"{name} was classified"
        assert bad_result.error and bad_result.to_json() == {"error": bad_result.error}
        if name in EXPECTED_KIND:
            assert bad_result.kind == EXPECTED_KIND[name], (name, bad_result)


def test_rejections_say_what_is_wrong(predictor, good_jpeg):
    results = predictor.predict(
        [
            b"",
            b"hello",
            good_jpeg[: len(good_jpeg) // 2],
            png_header(6000, 5000),
            encode(Image.new("RGB", (4, 4)), "GIF"),
        ]
    )
    assert [r.error for r in results[:2]] == [
        "empty image: no bytes were sent",
        "not an image: expected JPEG or PNG bytes",
    ]
    assert "truncated" in results[2].error
    assert results[3].error == "image too large: 6000 x 5000 = 30000000 pixels exceeds the limit of 25000000"
    assert results[4].error == "unsupported image format GIF: send a JPEG or PNG"


def test_a_batch_of_only_bad_images_runs_no_network(predictor):
    assert [r.kind for r in predictor.predict([b"", b"x"])] == [RejectionKind.EMPTY, RejectionKind.NOT_AN_IMAGE]
    assert predictor.predict([]) == []


def test_torchscript_weights_give_the_same_probabilities(bundle_root, predictor, good_jpeg, tmp_path):
    network = DenseNet121(spatial_dims=2, in_channels=3, out_channels=len(CLASS_NAMES))
    network.load_state_dict(torch.load(bundle_root / "models" / "model.pt", weights_only=True))
    torch.jit.script(network.eval()).save(str(tmp_path / "model.ts"))
    shutil.copy(bundle_root / "models" / "model.json", tmp_path / "model.json")  # an export shares the sidecar
    [scripted] = Predictor(bundle_root, weights=tmp_path / "model.ts", device="cpu").predict([good_jpeg])
    [eager] = predictor.predict([good_jpeg])
    np.testing.assert_allclose(
        list(scripted.probabilities.values()), list(eager.probabilities.values()), atol=TOLERANCE
    )


def test_the_sidecar_size_wins_over_the_config_and_matches_a_bundle_run_at_that_size(
    predictor_32, predictor, bundle_root_32, few_jpegs, tmp_path
):
    assert (predictor_32.image_size, predictor.image_size) == ([32, 32], [64, 64])  # inference.json says 64
    served = _assert_parity(predictor_32, bundle_root_32, few_jpegs, tmp_path, image_size="[32,32]")
    # the same weights at the config's 64 x 64 give other probabilities: the size is what differs
    at_64 = _served(predictor, few_jpegs, sorted(p.name for p in few_jpegs.iterdir()))
    assert np.abs(served - at_64).max() > 100 * TOLERANCE


def test_the_bundle_run_refuses_a_size_other_than_the_trained_one(bundle_root_32, few_jpegs, tmp_path):
    result = run_bundle(
        INFERENCE,
        expect_ok=False,
        bundle_root=bundle_root_32,
        input=few_jpegs,
        output_dir=tmp_path,
        num_workers=0,
        device="$torch.device('cpu')",
    )
    ckpt_path = f"{bundle_root_32}/models/model.pt"
    assert (
        f"ckpt_path {ckpt_path} was trained at image_size [32, 32] (says {bundle_root_32}/models/model.json), "
        f'but this run\'s image_size is [64, 64]: pass --image_size "[32,32]"'
    ) in result.stderr, result.stderr
    assert not (tmp_path / "predictions.csv").exists()


def test_weights_without_a_sidecar_are_refused_unless_the_caller_allows_them(bundle_root, tmp_path, caplog):
    shutil.copy(bundle_root / "models" / "model.pt", tmp_path / "model.pt")
    with pytest.raises(SidecarError) as error:
        Predictor(bundle_root, weights=tmp_path / "model.pt", device="cpu")
    assert str(error.value).startswith(f"weights {tmp_path / 'model.pt'} have no sidecar {tmp_path / 'model.json'}")
    assert "allow_missing_sidecar" in str(error.value)
    with caplog.at_level(logging.WARNING, logger="bundle.sidecar"):
        allowed = Predictor(bundle_root, weights=tmp_path / "model.pt", device="cpu", allow_missing_sidecar=True)
    assert allowed.image_size == [64, 64]
    [warning] = [r.getMessage() for r in caplog.records if r.name == "bundle.sidecar"]
    assert "have no sidecar model.json: using them at the configured image size, uncalibrated" in warning


def _other_weights(bundle_root: Path, folder: Path) -> Path:
    """The bundle's sidecar beside weights it does not describe (one value changed)."""
    state = torch.load(bundle_root / "models" / "model.pt", weights_only=True)
    state["class_layers.out.bias"] = state["class_layers.out.bias"] + 0.5
    torch.save(state, folder / "model.pt")
    shutil.copy(bundle_root / "models" / "model.json", folder / "model.json")
    return folder / "model.pt"


def test_a_sidecar_of_other_weights_is_refused(bundle_root, tmp_path):
    weights = _other_weights(bundle_root, tmp_path)
    for allow in (False, True):  # the opt-in is for a missing sidecar, never for a wrong one
        with pytest.raises(SidecarError, match=r"model\.json belongs to other weights than .*model\.pt"):
            Predictor(bundle_root, weights=weights, device="cpu", allow_missing_sidecar=allow)
    with pytest.raises(SidecarError, match="belongs to other weights"):
        bundle_files(bundle_root, weights)  # what packaging checks


def test_a_sidecar_with_the_classes_in_another_order_is_refused(bundle_root, tmp_path):
    shutil.copy(bundle_root / "models" / "model.pt", tmp_path / "model.pt")
    record = json.loads((bundle_root / "models" / "model.json").read_text())
    record["class_names"] = list(reversed(CLASS_NAMES))
    (tmp_path / "model.json").write_text(json.dumps(record))
    with pytest.raises(SidecarError) as error:
        Predictor(bundle_root, weights=tmp_path / "model.pt", device="cpu", allow_missing_sidecar=True)
    assert (
        f"{tmp_path / 'model.json'} (the sidecar of {tmp_path / 'model.pt'}) says the outputs are the classes "
        f"{list(reversed(CLASS_NAMES))}, but this bundle serves {list(CLASS_NAMES)}" in str(error.value)
    )


def test_a_sidecar_written_before_fingerprints_needs_the_opt_in(bundle_root, tmp_path):
    shutil.copy(bundle_root / "models" / "model.pt", tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [32, 32]}))
    with pytest.raises(SidecarError, match="records no weights_fingerprint and class_names.*allow_missing_sidecar"):
        Predictor(bundle_root, weights=tmp_path / "model.pt", device="cpu")
    assert Predictor(
        bundle_root, weights=tmp_path / "model.pt", device="cpu", allow_missing_sidecar=True
    ).image_size == [32, 32]


@pytest.mark.parametrize(
    "script, output",
    [("package_mar.py", ["--export_path", "dist"]), ("package_sagemaker.py", ["--output", "dist/model.tar.gz"])],
)
def test_packaging_refuses_weights_without_a_sidecar(bundle_root, tmp_path, script, output):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_root / "configs", root / "configs")
    (root / "models").mkdir()
    shutil.copy(bundle_root / "models" / "model.pt", root / "models" / "model.pt")
    result = subprocess.run(
        [sys.executable, REPO / "scripts" / script, "--bundle_root", root, *output],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert f"error: weights {root / 'models' / 'model.pt'} have no sidecar" in result.stderr, result.stderr
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_a_training_run_killed_between_weights_and_sidecar_is_not_served_until_resumed(
    bundle_root, good_jpeg, tmp_path, monkeypatch
):
    """BestModelSaver on the served DenseNet: killed after writing better weights, before their sidecar."""
    shutil.copytree(bundle_root / "configs", tmp_path / "configs")
    weights = tmp_path / "models" / "model.pt"
    network = DenseNet121(spatial_dims=2, in_channels=3, out_channels=len(CLASS_NAMES))
    network.load_state_dict(torch.load(bundle_root / "models" / "model.pt", weights_only=True))
    saver = BestModelSaver(network, str(weights), "val_auc", image_size=[64, 64])
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=0.5 + e.state.epoch / 10))
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    [before] = Predictor(tmp_path, device="cpu").predict([good_jpeg])

    real_replace = sidecar.os.replace

    def killed(source, target):  # the sidecar's rename is the last step; the new weights are in place
        if Path(source).name.endswith(".pending"):
            raise KeyboardInterrupt("killed")
        real_replace(source, target)

    monkeypatch.setattr(sidecar.os, "replace", killed)
    with torch.no_grad():
        network.class_layers.out.bias.add_(2.0)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0], max_epochs=2)
    monkeypatch.undo()
    with pytest.raises(SidecarError, match="a save was interrupted; running the same training command again"):
        Predictor(tmp_path, device="cpu")

    resumed = BestModelSaver(network, str(weights), "val_auc", image_size=[64, 64])
    resumed.load_state_dict({"best_metric": 0.7, "best_epoch": 2})
    resumed.attach(Engine(lambda e, b: None))  # as the restarted training builds its evaluator
    [after] = Predictor(tmp_path, device="cpu").predict([good_jpeg])
    assert after.probabilities != before.probabilities, "the new weights are served, with their own sidecar"


def test_torchscript_weights_use_the_sidecar_beside_them(bundle_root_32, predictor_32, good_jpeg, tmp_path):
    network = DenseNet121(spatial_dims=2, in_channels=3, out_channels=len(CLASS_NAMES))
    network.load_state_dict(torch.load(bundle_root_32 / "models" / "model.pt", weights_only=True))
    torch.jit.script(network.eval()).save(str(tmp_path / "model.ts"))
    shutil.copy(bundle_root_32 / "models" / "model.json", tmp_path / "model.json")
    scripted = Predictor(bundle_root_32, weights=tmp_path / "model.ts", device="cpu")
    assert scripted.image_size == [32, 32]
    [from_script], [eager] = scripted.predict([good_jpeg]), predictor_32.predict([good_jpeg])
    np.testing.assert_allclose(
        list(from_script.probabilities.values()), list(eager.probabilities.values()), atol=TOLERANCE
    )


@pytest.mark.parametrize(
    "text, problem",
    [
        ("{not json", "is not a JSON object with an 'image_size'"),
        ("[32, 32]", "is not a JSON object with an 'image_size'"),
        ('{"size": [32, 32]}', "is not a JSON object with an 'image_size'"),
        ('{"image_size": [32]}', "'image_size' must be [height, width] in pixels, got [32]"),
        ('{"image_size": "32x32"}', "'image_size' must be [height, width] in pixels, got '32x32'"),
        ('{"image_size": [0, 32]}', "'image_size' must be [height, width] in pixels, got [0, 32]"),
        ('{"image_size": [32.5, 32]}', "'image_size' must be [height, width] in pixels, got [32.5, 32]"),
    ],
)
def test_a_malformed_sidecar_is_an_error_naming_it(tmp_path, text, problem):
    (tmp_path / "model.json").write_text(text)
    with pytest.raises(ValueError) as error:
        trained_image_size(tmp_path / "model.pt")
    assert str(error.value).startswith(f"{tmp_path / 'model.json'} (the sidecar of {tmp_path / 'model.pt'})")
    assert problem in str(error.value)


def test_the_predictor_refuses_weights_with_a_malformed_sidecar(bundle_root, tmp_path):
    shutil.copy(bundle_root / "models" / "model.pt", tmp_path / "model.pt")
    (tmp_path / "model.json").write_text('{"image_size": null}')
    with pytest.raises(ValueError, match="model.json"):
        Predictor(bundle_root, weights=tmp_path / "model.pt", device="cpu")


def test_missing_weights_are_named(bundle_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        Predictor(bundle_root, weights=tmp_path / "nothing.pt", device="cpu")


def test_the_calibration_beside_the_weights_is_served(bundle_root, predictor, good_jpeg, tmp_path):
    """Temperature and decision rule come from the sidecar: probabilities softened, class from the rule."""
    shutil.copy(bundle_root / "models" / "model.pt", tmp_path / "model.pt")
    [plain] = predictor.predict([good_jpeg])
    logits = np.log([plain.probabilities[c] for c in CLASS_NAMES])
    weakest = int(np.argmin(logits))
    bias = [0.0] * len(CLASS_NAMES)
    bias[weakest] = 100.0  # a rule that always picks the least probable class
    record = json.loads((bundle_root / "models" / "model.json").read_text())
    (tmp_path / "model.json").write_text(
        json.dumps({**record, "calibration": {"temperature": 3.0, "class_bias": bias}})
    )
    [calibrated] = Predictor(bundle_root, weights=tmp_path / "model.pt", device="cpu").predict([good_jpeg])
    expected = torch.softmax(torch.tensor(logits) / 3.0, 0).numpy()
    np.testing.assert_allclose([calibrated.probabilities[c] for c in CLASS_NAMES], expected, atol=1e-5)
    assert calibrated.class_name == CLASS_NAMES[weakest]
    assert calibrated.probability == calibrated.probabilities[calibrated.class_name]


def _calibrated_copy(bundle_root: Path, folder: Path, calibration: dict) -> Path:
    """The bundle's weights in ``folder`` with their sidecar, holding ``calibration``."""
    shutil.copy(bundle_root / "models" / "model.pt", folder / "model.pt")
    record = json.loads((bundle_root / "models" / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**record, "calibration": calibration}))
    return folder / "model.pt"


def test_the_triage_answer_and_the_rule_that_chose_the_class_under_both_rules(
    bundle_root, predictor, few_jpegs, tmp_path
):
    """A sidecar whose rule picks the least probable class and whose refer threshold splits the images: each
    answer names its rule, shows the most probable class beside the chosen one, and refers at the threshold."""
    images = [path.read_bytes() for path in sorted(few_jpegs.iterdir())]
    plain = predictor.predict(images)
    malignant = sorted(sum(r.probabilities[c] for c in ("akiec", "bcc", "mel")) for r in plain)
    assert malignant[0] < malignant[-1]
    threshold = malignant[len(malignant) // 2]  # an image's own score: refer is >=
    weakest = int(np.argmin([plain[0].probabilities[c] for c in CLASS_NAMES]))
    bias = [100.0 if c == weakest else 0.0 for c in range(len(CLASS_NAMES))]
    weights = _calibrated_copy(
        bundle_root, tmp_path, {"temperature": 1.0, "class_bias": bias, "refer_threshold": threshold}
    )
    by_rule = {
        rule: Predictor(bundle_root, weights=weights, device="cpu", decision_rule=rule).predict(images)
        for rule in ("balanced", "argmax")
    }
    default = Predictor(bundle_root, weights=weights, device="cpu").predict(images)  # inference.json: balanced
    assert [r.to_json() for r in default] == [r.to_json() for r in by_rule["balanced"]]
    for rule, results in by_rule.items():
        for result, before in zip(results, plain, strict=True):
            answer = result.to_json()
            assert answer["probabilities"] == pytest.approx(before.probabilities, abs=1e-6)
            assert answer["decision_rule"] == rule
            assert answer["most_probable_class"] == before.class_name
            assert answer["class"] == (CLASS_NAMES[weakest] if rule == "balanced" else before.class_name)
            assert answer["probability"] == answer["probabilities"][answer["class"]]
            assert answer["malignant_probability"] == pytest.approx(
                sum(answer["probabilities"][c] for c in ("akiec", "bcc", "mel")), abs=1e-6
            )
            assert answer["refer"] is (answer["malignant_probability"] >= threshold)
            assert answer["refer_threshold"] == threshold
        assert {r.refer for r in results} == {True, False}, "the threshold splits these images"


def test_batch_inference_writes_the_served_triage_answer(bundle_root, few_jpegs, tmp_path):
    """predictions.csv of ``monai.bundle run --config_file configs/inference.json`` says what the Predictor serves."""
    models = tmp_path / "models"
    models.mkdir()
    probe = Predictor(bundle_root, device="cpu").predict([p.read_bytes() for p in sorted(few_jpegs.iterdir())])
    threshold = float(np.median([r.to_json()["malignant_probability"] for r in probe]))
    weights = _calibrated_copy(
        bundle_root,
        models,
        {"temperature": 1.5, "class_bias": [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0], "refer_threshold": threshold},
    )
    for rule in ("balanced", "argmax"):
        _bundle_run_probabilities(bundle_root, few_jpegs, tmp_path / rule, ckpt_path=weights, decision_rule=rule)
        with open(tmp_path / rule / "predictions.csv", newline="") as f:
            rows = {Path(row["image"]).name: row for row in csv.DictReader(f)}
        served = Predictor(bundle_root, weights=weights, device="cpu", decision_rule=rule)
        for name, row in rows.items():
            [answer] = [r.to_json() for r in served.predict([(few_jpegs / name).read_bytes()])]
            assert (row["predicted_class"], row["most_probable_class"]) == (
                answer["class"],
                answer["most_probable_class"],
            )
            assert row["decision_rule"] == answer["decision_rule"] == rule
            assert float(row["malignant_probability"]) == pytest.approx(answer["malignant_probability"], abs=1e-5)
            assert row["refer"] == str(answer["refer"]).lower()


@pytest.mark.parametrize("bad", ["high", -0.5, 2, True])
def test_a_malformed_refer_threshold_is_refused_before_serving(bundle_root, tmp_path, bad):
    weights = _calibrated_copy(bundle_root, tmp_path, {"temperature": 1.0, "class_bias": None, "refer_threshold": bad})
    with pytest.raises(ValueError) as error:
        Predictor(bundle_root, weights=weights, device="cpu")
    assert f"{tmp_path / 'model.json'}: 'calibration' key 'refer_threshold' must be a probability" in str(error.value)


def test_an_unknown_decision_rule_names_the_config_key(bundle_root, tmp_path):
    with pytest.raises(
        ValueError, match=r"config key 'decision_rule' must be one of \['balanced', 'argmax'\], got 'mode'"
    ):
        Predictor(bundle_root, device="cpu", decision_rule="mode")
    root = tmp_path / "bundle"
    shutil.copytree(bundle_root, root)
    config = json.loads((root / "configs" / "inference.json").read_text())
    (root / "configs" / "inference.json").write_text(json.dumps({**config, "decision_rule": "Balanced"}))
    with pytest.raises(ValueError) as error:
        Predictor(root, device="cpu")
    assert "config key 'decision_rule' must be one of ['balanced', 'argmax'], got 'Balanced'" in str(error.value)
