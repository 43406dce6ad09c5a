"""The bundle's ignite handlers, on real engines with no data pipeline."""

import datetime
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from bundle import sidecar
from bundle.calibration import Calibration
from bundle.handlers import (
    BestModelSaver,
    RandomStates,
    ResumeCheckpoint,
    TrainingHistory,
    TrainingSplitGuard,
    _check_finite,
    as_bool,
    atomic_write,
    check_resume,
    output_rows,
    training_fingerprint,
)
from bundle.labels import CLASS_NAMES
from bundle.predictor import trained_image_size
from bundle.sidecar import SidecarError, verified_sidecar, weights_fingerprint
from bundle.training import ValidationOutputd
from tests.bundle_runs import REPO, finished_pid


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def broken(tmp):
        open(tmp, "wb").write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target], "no temporary file left behind"


@pytest.mark.parametrize(
    "text, value", [("false", False), ("False", False), ("0", False), ("true", True), (True, True)]
)
def test_flags_typed_on_the_command_line(text, value):
    assert as_bool(text, "resume") is value


def test_a_bad_flag_names_its_key():
    with pytest.raises(ValueError, match="'resume'"):
        as_bool("maybe", "resume")


def _run(saver: BestModelSaver, scores: list[float]) -> None:
    """One validation epoch per score: the saver sees ``val_auc`` = that score."""
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=scores[e.state.epoch - 1])
    )
    saver.attach(engine)
    engine.run([0], max_epochs=len(scores))


def test_best_model_saver_keeps_the_best_across_a_resume(tmp_path):
    net = torch.nn.Linear(2, 2)
    path = tmp_path / "model.pt"

    first = BestModelSaver(net, str(path), "val_auc", image_size=[32, 32])
    _run(first, [0.6, 0.9, 0.7])
    assert first.state_dict() == {"best_metric": 0.9, "best_epoch": 2}
    saved = path.read_bytes()

    resumed = BestModelSaver(net, str(path), "val_auc", image_size=[32, 32])
    resumed.load_state_dict(first.state_dict())
    with torch.no_grad():
        net.weight.add_(1)  # a different model that scores worse must not replace the best one
    _run(resumed, [0.8, math.nan])
    assert path.read_bytes() == saved


def test_a_checkpoint_holds_the_bare_network_and_one_a_ddp_run_wrote_before_still_resumes(tmp_path):
    """Under DDP the checkpoint holds the network without its wrapper, so any number of processes resumes it;
    a checkpoint whose keys carry DDP's ``module.`` (written before) loads into the bare network."""
    path = tmp_path / "checkpoint_last.pt"
    net = torch.nn.Linear(2, 2)
    ResumeCheckpoint(str(path), {"model": net}).attach(engine := Engine(lambda e, b: None))
    engine.run([0], max_epochs=1)
    assert set(torch.load(path, weights_only=True)["model"]) == {"weight", "bias"}

    state = torch.load(path, weights_only=True)
    state["model"] = {f"module.{key}": value + 1 for key, value in state["model"].items()}
    torch.save(state, path)
    resumed = torch.nn.Linear(2, 2)
    # nor did checkpoints hold the random streams then: those resume without them
    to_load = {"model": resumed, "random_states": RandomStates()}
    ResumeCheckpoint(str(path), to_load).attach(engine := Engine(lambda e, b: None))
    engine.run([0], max_epochs=2)
    assert torch.equal(resumed.weight, net.weight + 1) and engine.state.epoch == 2


def test_a_model_saved_after_the_last_checkpoint_is_replaced_only_by_a_better_one(tmp_path):
    """A kill between saving model.pt (epoch 2, 0.9) and epoch 2's checkpoint (which would say 0.9): the
    checkpoint still holds epoch 1's best, 0.6, and the resumed run's 0.8 must not replace the 0.9 model."""
    net, path = torch.nn.Linear(2, 2), tmp_path / "model.pt"
    first = BestModelSaver(net, str(path), "val_auc", image_size=[32, 32])
    _run(first, [0.6])
    checkpointed = first.state_dict()
    _run(first, [0.6, 0.9])  # epoch 2 saves model.pt; the kill comes before its checkpoint
    saved = path.read_bytes()
    resumed = BestModelSaver(net, str(path), "val_auc", image_size=[32, 32])
    resumed.load_state_dict(checkpointed)
    assert resumed.state_dict() == {"best_metric": 0.9, "best_epoch": 2}
    with torch.no_grad():
        net.weight.add_(1)
    _run(resumed, [0.8])
    assert path.read_bytes() == saved


def test_best_model_saver_writes_the_trained_image_size_beside_the_weights(tmp_path):
    path = tmp_path / "model.pt"
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [64, 64]}))  # an earlier run's
    net = torch.nn.Linear(2, 2)
    _run(BestModelSaver(net, str(path), "val_auc", image_size=(32, 48)), [0.6, 0.9, 0.7])
    assert json.loads((tmp_path / "model.json").read_text()) == {
        "image_size": [32, 48],
        "class_names": list(CLASS_NAMES),
        "epoch": 2,
        "metric": {"val_auc": 0.9},
        "weights_fingerprint": weights_fingerprint(net.state_dict()),
    }
    assert trained_image_size(path) == [32, 48]  # what serving reads back
    assert verified_sidecar(path)["epoch"] == 2, "the sidecar belongs to the weights beside it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"], "no temporary file left behind"


def test_best_model_saver_on_a_non_writing_rank_writes_no_sidecar(tmp_path):
    _run(
        BestModelSaver(
            torch.nn.Linear(2, 2), str(tmp_path / "model.pt"), "val_auc", enabled=False, image_size=[32, 32]
        ),
        [0.6],
    )
    assert list(tmp_path.iterdir()) == []


class Killed(BaseException):
    """The process dies here: nothing after it runs, no ``except Exception`` catches it."""


def _killed_after_write(monkeypatch, n: int) -> None:
    """Kill the saver right after the n-th of save_pair's file writes (1: the pending sidecar, 2: the weights)."""
    real, done = sidecar.atomic_write, []

    def write_then_die(path, write):
        real(path, write)
        done.append(path)
        if len(done) == n:
            raise Killed(path)

    monkeypatch.setattr(sidecar, "atomic_write", write_then_die)


def test_a_kill_after_the_new_weights_leaves_a_pair_no_loader_accepts_and_the_next_run_completes_it(
    tmp_path, monkeypatch
):
    net, path = torch.nn.Linear(2, 2), tmp_path / "model.pt"
    first = BestModelSaver(net, str(path), "val_auc", image_size=[32, 32])
    _run(first, [0.6])
    with torch.no_grad():
        net.weight.add_(1)
    _killed_after_write(monkeypatch, 2)
    with pytest.raises(Killed):
        _run(first, [0.6, 0.9])  # epoch 2 improves: new weights written, then the process dies
    monkeypatch.undo()
    assert json.loads((tmp_path / "model.json").read_text())["epoch"] == 1, "the old sidecar beside the new weights"
    with pytest.raises(
        SidecarError,
        match=r"model\.json belongs to other weights than .*model\.pt .*"
        r": model\.json\.pending is there: a save was interrupted",
    ):
        verified_sidecar(path)

    # the resumed run restores best 0.9 and never beats it, yet leaves a pair that belongs together
    resumed = BestModelSaver(net, str(path), "val_auc", image_size=[32, 32])
    resumed.load_state_dict(first.state_dict())
    _run(resumed, [0.5])
    record = verified_sidecar(path)
    assert record["epoch"] == 2 and record["metric"] == {"val_auc": 0.9}
    torch.testing.assert_close(torch.load(path, weights_only=True), net.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]


def test_a_kill_before_the_new_weights_keeps_the_old_pair(tmp_path, monkeypatch):
    net, path = torch.nn.Linear(2, 2), tmp_path / "model.pt"
    first = BestModelSaver(net, str(path), "val_auc", image_size=[32, 32])
    _run(first, [0.6])
    old = path.read_bytes()
    with torch.no_grad():
        net.weight.add_(1)
    _killed_after_write(monkeypatch, 1)
    with pytest.raises(Killed):
        _run(first, [0.6, 0.9])
    monkeypatch.undo()
    assert path.read_bytes() == old and verified_sidecar(path)["epoch"] == 1, "the old pair, still served"
    _run(BestModelSaver(net, str(path), "val_auc", image_size=[32, 32]), [])  # the next run's start
    assert path.read_bytes() == old and verified_sidecar(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"], "the stale pending one is gone"


def test_a_checkpoint_trained_on_something_else_is_refused_naming_resume_false(tmp_path):
    datalist = tmp_path / "datalist.json"
    items = [{"image": f"images/{i}.jpg", "label": i % 7} for i in range(6)]
    datalist.write_text(json.dumps({"training": items[:4], "validation": items[4:], "testing": []}))
    trained_on = training_fingerprint(datalist, [32, 32], torch.nn.Linear(2, 7))
    checkpoint = tmp_path / "checkpoint_last.pt"
    torch.save({"trained_on": trained_on, "best_model_saver": {"best_metric": 0.9, "best_epoch": 3}}, checkpoint)

    check_resume(checkpoint, True, trained_on)
    reformatted = tmp_path / "same.json"  # same items, other formatting and another testing split
    reformatted.write_text(json.dumps({"testing": items[:1], "validation": items[4:], "training": items[:4]}, indent=3))
    check_resume(checkpoint, "true", training_fingerprint(reformatted, [32, 32], torch.nn.Linear(2, 7)))

    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps({"training": items[:3], "validation": items[4:]}))
    for other, what in [
        (training_fingerprint(fewer, [32, 32], torch.nn.Linear(2, 7)), "datalist"),
        (training_fingerprint(datalist, [64, 64], torch.nn.Linear(2, 7)), "image_size [32, 32]"),
        (training_fingerprint(datalist, [32, 32], torch.nn.Linear(3, 7)), "network 'Linear:"),
    ]:
        with pytest.raises(ValueError) as error:
            check_resume(checkpoint, True, other)
        assert what in str(error.value) and "Pass --resume false to start over" in str(error.value)
        assert "keep its best score (0.9)" in str(error.value)
        check_resume(checkpoint, "false", other)  # starting over is always allowed

    torch.save({"model": {}}, checkpoint)  # written before checkpoints recorded what they were trained on
    with pytest.raises(ValueError, match="records nothing about what it was trained on.*--resume false"):
        check_resume(checkpoint, True, trained_on)


def test_a_checkpoint_past_max_epochs_or_cut_off_is_refused_before_any_work_naming_it(tmp_path):
    checkpoint = tmp_path / "checkpoint_last.pt"
    torch.save({"trainer": {"iteration": 12, "epoch_length": 4, "max_epochs": 5}}, checkpoint)
    check_resume(checkpoint, True, None, max_epochs=3)  # at epoch 3: it just finishes
    with pytest.raises(ValueError, match=f"{checkpoint} is at epoch 3, past max_epochs=2: raise max_epochs"):
        check_resume(checkpoint, True, None, max_epochs=2)
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])  # cut off: a full disk, a copy that stopped
    with pytest.raises(ValueError, match=f"cannot resume from {checkpoint}: it does not load .* --resume false"):
        check_resume(checkpoint, True, None)
    check_resume(checkpoint, False, None)


def test_validation_postprocessing_of_a_batch_is_that_of_its_images():
    """train.json's evaluator hands ValidationOutputd whole batches (decollate off); each row must be what the
    image alone gets, and output_rows reads either form the same."""
    logits, labels = (
        torch.randn(5, 7, generator=torch.Generator().manual_seed(0)),
        torch.tensor([[0], [6], [2], [2], [5]]),
    )
    post = ValidationOutputd(Calibration(temperature=1.5), num_classes=7)
    batch = post({"pred": logits, "label": labels})
    images = [post({"pred": logits[i], "label": labels[i]}) for i in range(5)]
    for key in ("pred", "logits", "label"):
        torch.testing.assert_close(output_rows(batch, key), output_rows(images, key))
    assert output_rows(batch, "label").argmax(1).tolist() == [0, 6, 2, 2, 5]
    assert output_rows(batch, "features") is None and output_rows(images, "features") is None


def test_validation_decollated_or_not_scores_the_same_and_says_what_it_saves(synthetic_dir, tmp_path):
    """scripts/benchmark_validation.py runs train.json's evaluator both ways over the same weights, and refuses
    to report a ratio if their validation AUCs differ."""
    command = [sys.executable, "scripts/benchmark_validation.py", "--work_dir", str(tmp_path)]
    command += ["--dataset_dir", str(synthetic_dir), "--image_size", "32", "--rounds", "1"]
    result = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["images"] > 0 and 0 <= report["val_auc"] <= 1
    assert report["on_vs_off"] == pytest.approx(report["s_decollate_on"] / report["s_decollate_off"])


def _refit_reads_unreadable_weights(rank: int, init_file: str, ckpt_path: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        guard = TrainingSplitGuard(
            "training", validator=None, reference_loader=None, ckpt_path=ckpt_path, enabled=rank == 0
        )
        with pytest.raises(RuntimeError, match="cannot read the weights: SidecarError"):
            guard._best_weights()
    finally:
        torch.distributed.destroy_process_group()


def test_unreadable_best_weights_stop_every_rank_of_the_guards_refit(tmp_path):
    """Only the main rank reads the saved weights for the guard's training-split refit; when it cannot, every rank
    raises at once rather than the others waiting in the broadcast until the process group's timeout."""
    ckpt_path = tmp_path / "model.pt"
    ckpt_path.write_bytes(b"not a checkpoint")
    args = (str(tmp_path / "init"), str(ckpt_path))
    torch.multiprocessing.start_processes(_refit_reads_unreadable_weights, args, nprocs=2, start_method="spawn")


def test_the_history_times_training_once_the_device_has_done_it_and_waits_twice_an_epoch(tmp_path, monkeypatch):
    """On a GPU the host queues steps ahead of the device: an epoch's training time is read after waiting for
    it (at the epoch's start and at its last step, before validation), not from ignite's host-side clock."""
    waits = []

    def synchronize(device=None):  # stands for the device finishing 0.2 s of queued work
        waits.append(device)
        time.sleep(0.2)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    batch = {"image": torch.zeros(4, 3, 8, 8)}
    trainer = Engine(lambda engine, batch: [{"loss": torch.tensor(1.0)}])  # as the bundle's trainer_iteration
    trainer.add_event_handler(Events.STARTED, lambda engine: setattr(engine.state, "device", torch.device("cuda:0")))
    TrainingHistory(str(tmp_path / "history.json")).attach(trainer)
    trainer.run([batch] * 3, max_epochs=2)
    rows = json.loads((tmp_path / "history.json").read_text())
    assert len(waits) == 4, "a wait per step would stall the device's queue"
    for row in rows:
        assert row["train_s"] >= 0.2 and row["train_img_per_s"] == pytest.approx(12 / row["train_s"])


def test_a_checkpoint_folder_loses_the_temporary_files_killed_runs_left(tmp_path):
    """A kill inside atomic_write leaves ``.<name>.tmp<pid>``; the next run's resume checkpoint removes those of
    processes that are gone, and keeps a live process's and every other file."""
    left = tmp_path / f".checkpoint_last.pt.tmp{finished_pid()}"
    left.write_bytes(b"half a checkpoint")
    live = tmp_path / f".model.pt.tmp{os.getpid()}"
    live.write_bytes(b"being written")
    kept = [tmp_path / "model.pt", tmp_path / ".hidden.tmpx"]
    for path in kept:
        path.write_bytes(b"")
    ResumeCheckpoint(str(tmp_path / "checkpoint_last.pt"), {}).attach(Engine(lambda e, b: None))
    assert not left.exists() and live.exists() and all(path.exists() for path in kept)


def test_non_finite_outputs_are_refused_naming_the_images():
    """A NaN row would be class 0 under the decision rule and make the ECE NaN (invalid JSON) beside ordinary
    AUCs."""
    probabilities = np.full((3, 7), 1 / 7)
    probabilities[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite outputs for 1 of 3 images \(e\.g\. \['b\.jpg'\]\)"):
        _check_finite(["a.jpg", "b.jpg", "c.jpg"], probabilities)
    _check_finite(["a.jpg"], probabilities[:1])
