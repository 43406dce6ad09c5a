"""The bundle's ignite handlers, on real engines with no data pipeline."""

import json
import math

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.handlers import BestModelSaver, as_bool, atomic_write
from bundle.labels import CLASS_NAMES
from bundle.predictor import trained_image_size


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


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("0", False), ("true", True), (True, True)])
def test_flags_typed_on_the_command_line(text, value):
    assert as_bool(text, "resume") is value


def test_a_bad_flag_names_its_key():
    with pytest.raises(ValueError, match="'resume'"):
        as_bool("maybe", "resume")


def _run(saver: BestModelSaver, scores: list[float]) -> None:
    """One validation epoch per score: the saver sees ``val_auc`` = that score."""
    engine = Engine(lambda e, b: None)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=scores[e.state.epoch - 1]))
    saver.attach(engine)
    engine.run([0], max_epochs=len(scores))


def test_best_model_saver_keeps_the_best_across_a_resume(tmp_path):
    net = torch.nn.Linear(2, 2)
    path = tmp_path / "model.pt"

    first = BestModelSaver(net, str(path), "val_auc")
    _run(first, [0.6, 0.9, 0.7])
    assert first.state_dict() == {"best_metric": 0.9, "best_epoch": 2}
    saved = path.read_bytes()

    resumed = BestModelSaver(net, str(path), "val_auc")
    resumed.load_state_dict(first.state_dict())
    with torch.no_grad():
        net.weight.add_(1)  # a different model that scores worse must not replace the best one
    _run(resumed, [0.8, math.nan])
    assert path.read_bytes() == saved


def test_best_model_saver_writes_the_trained_image_size_beside_the_weights(tmp_path):
    path = tmp_path / "model.pt"
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [64, 64]}))  # an earlier run's
    _run(BestModelSaver(torch.nn.Linear(2, 2), str(path), "val_auc", image_size=(32, 48)), [0.6, 0.9, 0.7])
    assert json.loads((tmp_path / "model.json").read_text()) == {
        "image_size": [32, 48], "class_names": list(CLASS_NAMES), "epoch": 2, "metric": {"val_auc": 0.9}}
    assert trained_image_size(path) == [32, 48]  # what serving reads back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"], "no temporary file left behind"


def test_best_model_saver_without_an_image_size_drops_the_stale_sidecar(tmp_path):
    """New weights must not be served at the size an earlier run's sidecar recorded."""
    path = tmp_path / "model.pt"
    (tmp_path / "model.json").write_text(json.dumps({"image_size": [64, 64]}))
    _run(BestModelSaver(torch.nn.Linear(2, 2), str(path), "val_auc"), [0.6])
    assert path.is_file() and trained_image_size(path) is None


def test_best_model_saver_on_a_non_writing_rank_writes_no_sidecar(tmp_path):
    _run(BestModelSaver(torch.nn.Linear(2, 2), str(tmp_path / "model.pt"), "val_auc", enabled=False,
                        image_size=[32, 32]), [0.6])
    assert list(tmp_path.iterdir()) == []
