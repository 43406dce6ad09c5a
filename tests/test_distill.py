"""Distillation (issue 17): scripts/soft_labels.py writes the teachers' averaged soft labels through the served
path; train.json's ``distill_soft_labels`` / ``distill_weight`` blend them into the training targets."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import DenseNet

from bundle import data, distill
from bundle.augment import BatchMix
from bundle.handlers import check_resume
from bundle.labels import CLASS_NAMES
from bundle.predictor import Predictor
from bundle.sidecar import new_record, save_pair, write_sidecar
from tests.bundle_runs import FAST, REPO, TRAIN, bundle_env, run_bundle
from tests.test_train_config import TINY_DENSENET, training_workflow

sys.path.insert(0, str(REPO / "scripts"))
import soft_labels  # noqa: E402  (the script under test)

C = len(CLASS_NAMES)
# a fixed teachers' distribution: with distill_weight 1 every target is this row, mixed or not
CONSTANT = torch.tensor([0.05, 0.10, 0.15, 0.05, 0.20, 0.40, 0.05])


def _tiny_teacher(path: Path, seed: int, out_channels: int = C) -> Path:
    torch.manual_seed(seed)
    network = DenseNet(
        spatial_dims=2, in_channels=3, out_channels=out_channels, init_features=8, growth_rate=4, block_config=(2, 2)
    )
    save_pair(path, network.state_dict(), new_record(network.state_dict(), [32, 32]))
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A bundle root whose inference.json declares a small DenseNet (fast on a CPU), and two teachers of it."""
    root = tmp_path_factory.mktemp("teachers")
    shutil.copytree(REPO / "configs", root / "configs")
    inference = json.loads((root / "configs" / "inference.json").read_text())
    inference["network_def"] = TINY_DENSENET
    (root / "configs" / "inference.json").write_text(json.dumps(inference))
    return root, [_tiny_teacher(root / f"teacher{seed}" / "model.pt", seed) for seed in (0, 1)]


def _datalist(synthetic_dir: Path, path: Path, seed: int = 0) -> Path:
    data.write_datalist(data.split_by_lesion(data.read_ham10000(synthetic_dir), seed=seed), path, synthetic_dir)
    return path


def _training_keys(datalist: Path, synthetic_dir: Path) -> list[str]:
    return [
        distill.image_key(i["image"], synthetic_dir) for i in data.load_datalist(datalist, "training", synthetic_dir)
    ]


def test_the_script_averages_the_teachers_tempered_probabilities_from_the_served_path(
    synthetic_dir, tmp_path, teachers
):
    """Temperature 2 over two teachers: per image the mean of softmax(logits / 2), i.e. of the served
    (uncalibrated) probabilities' square roots, renormalised; keyed by the datalist's image paths."""
    root, weights = teachers
    datalist, output = _datalist(synthetic_dir, tmp_path / "datalist.json"), tmp_path / "soft.pt"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/soft_labels.py",
            "--teachers",
            f"[{weights[0]}, {weights[1]}]",
            "--dataset_dir",
            str(synthetic_dir),
            "--datalist",
            str(datalist),
            "--output",
            str(output),
            "--temperature",
            "2",
            "--bundle_root",
            str(root),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=bundle_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 teachers' soft labels: 100%" in result.stderr, "a progress bar"
    record = torch.load(output, weights_only=True)
    items = data.load_datalist(datalist, "training", synthetic_dir)
    assert record["images"] == _training_keys(datalist, synthetic_dir) and record["temperature"] == 2.0
    served = []
    for teacher in weights:
        predictions = Predictor(root, weights=teacher, device="cpu").predict(
            [Path(item["image"]).read_bytes() for item in items]
        )
        probabilities = torch.tensor([[p.probabilities[name] for name in CLASS_NAMES] for p in predictions])
        served.append(probabilities.sqrt() / probabilities.sqrt().sum(1, keepdim=True))
    assert torch.allclose(record["probabilities"], (served[0] + served[1]) / 2, atol=1e-5)


def test_teachers_of_other_classes_or_trained_on_another_datalist_are_refused_naming_the_file(synthetic_dir, tmp_path):
    datalist = _datalist(synthetic_dir, tmp_path / "datalist.json")
    five = _tiny_teacher(tmp_path / "five" / "model.pt", 0, out_channels=5)
    write_sidecar(five, {**json.loads(five.with_suffix(".json").read_text()), "class_names": list(CLASS_NAMES[:5])})
    with pytest.raises(ValueError, match=f"teacher {five} classifies into 5 classes"):
        soft_labels.check_teacher(five, str(datalist))
    teacher = _tiny_teacher(tmp_path / "run" / "model.pt", 0)
    soft_labels.check_teacher(teacher, str(datalist))  # no resume checkpoint: a warning, not a refusal
    checkpoint = teacher.with_name("checkpoint_last.pt")
    torch.save({"trained_on": {"datalist": data.datalist_fingerprint(datalist)}}, checkpoint)
    soft_labels.check_teacher(teacher, str(datalist))
    other = _datalist(synthetic_dir, tmp_path / "other.json", seed=1)
    torch.save({"trained_on": {"datalist": data.datalist_fingerprint(other)}}, checkpoint)
    with pytest.raises(ValueError, match=f"teacher {teacher} was trained on another datalist"):
        soft_labels.check_teacher(teacher, str(datalist))
    assert soft_labels.teacher_paths("[a/m.pt, 'b/m.pt']") == [Path("a/m.pt"), Path("b/m.pt")]
    assert soft_labels.teacher_paths(["a/m.pt"]) == [Path("a/m.pt")]


def _soft_label_file(path: Path, keys: list[str], rows: torch.Tensor | None = None, classes=CLASS_NAMES) -> Path:
    rows = CONSTANT.expand(len(keys), -1) if rows is None else rows
    distill.write_soft_labels(path, keys, rows, 1.0, ["t.pt"], "datalist.json")
    if list(classes) != list(CLASS_NAMES):
        record = torch.load(path, weights_only=True)
        torch.save({**record, "class_names": list(classes)}, path)
    return path


def test_a_soft_label_file_round_trips_and_one_of_another_split_or_class_list_is_refused(synthetic_dir, tmp_path):
    datalist = _datalist(synthetic_dir, tmp_path / "datalist.json")
    items = data.load_datalist(datalist, "training", synthetic_dir)
    keys = _training_keys(datalist, synthetic_dir)
    rows = torch.softmax(torch.randn(len(keys), C, generator=torch.Generator().manual_seed(0)), 1)
    path = _soft_label_file(tmp_path / "soft.pt", keys, rows)
    distillation = distill.Distillation(path, 0.25, items, synthetic_dir, CLASS_NAMES)
    reordered = items[::-1]  # a shard in another order gets each image's own row
    one_hot = torch.nn.functional.one_hot(torch.tensor([i["label"] for i in reordered]), C).float()
    assert torch.allclose(distillation.targets(reordered), 0.75 * one_hot + 0.25 * rows.flip(0))

    other = data.load_datalist(_datalist(synthetic_dir, tmp_path / "other.json", seed=1), "training", synthetic_dir)
    with pytest.raises(ValueError, match=rf"'distill_soft_labels': {path} was written for another training split"):
        distill.Distillation(path, 0.25, other, synthetic_dir, CLASS_NAMES)
    with pytest.raises(ValueError, match="'distill_soft_labels'.*classes"):
        distill.Distillation(
            _soft_label_file(tmp_path / "c.pt", keys, classes="abcdefg"), 0.5, items, synthetic_dir, CLASS_NAMES
        )
    with pytest.raises(ValueError, match=f"'distill_soft_labels': {tmp_path / 'none.pt'} does not exist"):
        distill.Distillation(tmp_path / "none.pt", 0.5, items, synthetic_dir, CLASS_NAMES)


def test_bad_distill_keys_are_refused_naming_the_key_even_when_off(synthetic_dir, tmp_path):
    for weight in (1.5, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="'distill_weight'"):
            distill.Distillation.from_config(None, weight, [], synthetic_dir, CLASS_NAMES)
    assert distill.Distillation.from_config(None, 0.5, [], synthetic_dir, CLASS_NAMES) is None
    workflow = training_workflow(synthetic_dir, tmp_path, distill_weight=2)
    with pytest.raises(RuntimeError) as refused:  # MONAI wraps the expression's error
        workflow.initialize()
    assert "'distill_weight'" in str(refused.value.__cause__)
    workflow = training_workflow(synthetic_dir, tmp_path, distill_soft_labels=str(tmp_path / "missing.pt"))
    with pytest.raises(RuntimeError) as refused:
        workflow.initialize()
    assert "'distill_soft_labels'" in str(refused.value.__cause__) and "missing.pt" in str(refused.value.__cause__)


def test_a_student_never_resumes_a_run_trained_without_its_soft_labels(synthetic_dir, tmp_path):
    datalist = _datalist(synthetic_dir, tmp_path / "datalist.json")
    items = data.load_datalist(datalist, "training", synthetic_dir)
    path = _soft_label_file(tmp_path / "soft.pt", _training_keys(datalist, synthetic_dir))
    distillation = distill.Distillation(path, 0.5, items, synthetic_dir, CLASS_NAMES)
    base = {"datalist": "sha256:x", "image_size": [32, 32]}
    student = base | distill.resume_record(distillation)
    plain = base | distill.resume_record(None)
    checkpoint = tmp_path / "checkpoint_last.pt"
    checkpoint.touch()  # check_resume reads the checkpoint handed to it; this says there is one
    with pytest.raises(ValueError, match="distillation None"):
        check_resume(checkpoint, True, student, checkpoint={"trained_on": base})
    check_resume(checkpoint, True, student, checkpoint={"trained_on": student})
    # nor does a plain run continue a student (a hybrid of both, its soft labels forgotten) ...
    with pytest.raises(ValueError, match=r"distillation 'sha256:\w+', this run's is None"):
        check_resume(checkpoint, True, plain, checkpoint={"trained_on": student})
    # ... while a checkpoint written before runs recorded distillation resumes as before
    check_resume(checkpoint, True, plain, checkpoint={"trained_on": base})


def test_a_soft_label_file_with_non_finite_rows_or_missing_parts_is_refused_naming_it(synthetic_dir, tmp_path):
    """NaN compares false both ways, so a check of sums and signs alone lets a diverged teacher's rows through."""
    datalist = _datalist(synthetic_dir, tmp_path / "datalist.json")
    items = data.load_datalist(datalist, "training", synthetic_dir)
    keys = _training_keys(datalist, synthetic_dir)
    rows = CONSTANT.expand(len(keys), -1).clone()
    rows[3, 2] = float("nan")
    path = _soft_label_file(tmp_path / "nan.pt", keys, rows)
    with pytest.raises(ValueError, match=f"'distill_soft_labels': {path} is damaged: .* not finite"):
        distill.Distillation(path, 0.5, items, synthetic_dir, CLASS_NAMES)
    record = torch.load(path, weights_only=True)
    for broken in ({k: v for k, v in record.items() if k != "images"}, {**record, "probabilities": [[1.0] * C]}):
        torch.save(broken, path)
        with pytest.raises(ValueError, match=f"'distill_soft_labels': {path} is damaged"):
            distill.Distillation(path, 0.5, items, synthetic_dir, CLASS_NAMES)


def test_the_script_names_each_image_once_and_checks_every_teacher_before_any_work(
    synthetic_dir, tmp_path, teachers, caplog
):
    """A split that lists an image twice gets a file training accepts; a missing teacher, or one whose outputs
    are not finite, is refused and nothing is written."""
    root, weights = teachers
    datalist = _datalist(synthetic_dir, tmp_path / "datalist.json")
    listed = json.loads(datalist.read_text())
    listed["training"].append(listed["training"][0])
    datalist.write_text(json.dumps(listed))
    output = tmp_path / "soft.pt"
    common = {"dataset_dir": str(synthetic_dir), "datalist": str(datalist), "bundle_root": str(root), "device": "cpu"}

    with pytest.raises(ValueError, match=f"teacher {tmp_path / 'none.pt'} does not exist"):
        soft_labels.main([str(weights[0]), str(tmp_path / "none.pt")], output=str(output), **common)
    diverged = _tiny_teacher(tmp_path / "diverged" / "model.pt", 0)
    state = torch.load(diverged, weights_only=True)
    state["class_layers.out.bias"] = torch.full((C,), float("nan"))
    save_pair(diverged, state, new_record(state, [32, 32]))
    with pytest.raises(ValueError, match=f"teacher {diverged} gave non-finite probabilities"):
        soft_labels.main([str(diverged)], output=str(output), **common)
    assert not output.exists()

    soft_labels.main([str(weights[0])], output=str(output), **common)
    items = data.load_datalist(datalist, "training", synthetic_dir)
    record = torch.load(output, weights_only=True)
    assert len(record["images"]) == len(set(record["images"])) == len(items) - 1
    distillation = distill.Distillation(output, 0.5, items, synthetic_dir, CLASS_NAMES)
    assert torch.equal(distillation.targets(items)[0], distillation.targets(items)[-1])


@pytest.mark.parametrize("alphas", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}])
def test_mixup_and_cutmix_mix_soft_rows_as_they_mix_one_hot_labels(alphas):
    """Mixing is linear in the targets: with the same draws, the rows of a batch of soft targets are mixed
    by the matrix that mixing the one-hot labels 0..6 gives."""
    images = torch.rand(C, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    rows = torch.softmax(torch.randn(C, C, generator=torch.Generator().manual_seed(1)), 1)
    for seed in range(5):
        mixed, mixing = BatchMix(C, seed=seed, **alphas)(images, torch.arange(C))
        mixed_soft, targets = BatchMix(C, seed=seed, **alphas)(images, rows)
        assert torch.equal(mixed_soft, mixed)
        assert torch.allclose(targets, mixing @ rows, atol=1e-6)


def _seen_by_the_loss(workflow) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Runs ``workflow`` and returns per training step the targets, the predictions and the loss."""
    workflow.initialize()
    seen = []

    def record(engine) -> None:
        output = engine.state.output[0]
        seen.append((output["label"].clone(), output["pred"].detach().clone(), float(output["loss"].detach())))

    workflow.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_COMPLETED, record)
    workflow.run()
    return seen


@pytest.mark.parametrize("overlays", [(), ("train_chain.json",)], ids=["cached", "chain"])
def test_the_loss_sees_each_images_one_hot_blended_with_the_teachers_row(synthetic_dir, tmp_path, overlays):
    """distill_weight 0.25, the class-balanced sampler: every target is 0.75 x one-hot + 0.25 x its soft row,
    on both data paths, and the loss is the cross-entropy against it."""
    datalist = _datalist(synthetic_dir, tmp_path / "datalist.json")
    path = _soft_label_file(tmp_path / "soft.pt", _training_keys(datalist, synthetic_dir))
    workflow = training_workflow(
        synthetic_dir,
        tmp_path,
        overlays,
        distill_soft_labels=str(path),
        distill_weight=0.25,
        label_smoothing=0.0,
        max_epochs=1,
        batch_size=32,
        val_interval=5,
        num_workers=0,
        network_arch=TINY_DENSENET,
    )
    seen = _seen_by_the_loss(workflow)
    assert seen
    for targets, pred, loss in seen:
        assert targets.dtype == torch.float32 and targets.shape == (len(pred), C)
        one_hot = torch.nn.functional.one_hot(targets.argmax(1), C).float()
        assert torch.allclose(targets, 0.75 * one_hot + 0.25 * CONSTANT, atol=1e-6)
        assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(pred, targets)), rel=1e-5)


def test_monai_bundle_run_with_distill_weight_1_trains_on_the_teachers_rows_through_mixup(synthetic_dir, tmp_path):
    """One real epoch through ``python -m monai.bundle run``, distill_weight 1, mixup and CutMix on, the
    class-balanced sampler: mixing rows that are all one distribution leaves it, so the last step's targets
    are that distribution and its loss the cross-entropy against it; the run saves its history as usual."""
    datalist = _datalist(synthetic_dir, tmp_path / "datalist.json")
    path = _soft_label_file(tmp_path / "soft.pt", _training_keys(datalist, synthetic_dir))
    last = "@train#trainer.state.output[0]"
    report = (
        f"$print('DISTILL', repr({{'targets': {last}['label'].tolist(), 'loss': float({last}['loss']),"
        f" 'cross_entropy': float(torch.nn.functional.cross_entropy({last}['pred'], {last}['label']))}}))"
    )
    result = run_bundle(
        TRAIN,
        bundle_root=tmp_path,
        dataset_dir=synthetic_dir,
        datalist=datalist,
        max_epochs=1,
        distill_soft_labels=path,
        distill_weight=1.0,
        label_smoothing=0.0,
        **{
            "augment#mixup_alpha": 0.4,
            "augment#cutmix_alpha": 1.0,
            "run": f'["$@train#trainer.run()", "{report}"]',
            "network_arch": json.dumps(TINY_DENSENET),
        },
        **FAST,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("DISTILL"))
    seen = ast.literal_eval(line[len("DISTILL ") :])
    assert torch.allclose(torch.tensor(seen["targets"]), CONSTANT.expand(len(seen["targets"]), -1), atol=1e-6)
    assert seen["loss"] == pytest.approx(seen["cross_entropy"], rel=1e-5)
    history = json.loads((tmp_path / "models" / "history.json").read_text())
    assert len(history) == 1 and history[0]["train_loss"] > 0
