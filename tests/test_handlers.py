"""The bundle's ignite handlers, on real engines with no data pipeline."""

import math

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.handlers import BestModelSaver, as_bool, atomic_write


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


def test_best_model_saver_keeps_the_best_across_a_resume(tmp_path):
    net = torch.nn.Linear(2, 2)
    path = tmp_path / "model.pt"

    def run(saver, scores):
        engine = Engine(lambda e, b: None)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_auc=scores[e.state.epoch - 1]))
        saver.attach(engine)
        engine.run([0], max_epochs=len(scores))

    first = BestModelSaver(net, str(path), "val_auc")
    run(first, [0.6, 0.9, 0.7])
    assert first.state_dict() == {"best_metric": 0.9, "best_epoch": 2}
    saved = path.read_bytes()

    resumed = BestModelSaver(net, str(path), "val_auc")
    resumed.load_state_dict(first.state_dict())
    with torch.no_grad():
        net.weight.add_(1)  # a different model that scores worse must not replace the best one
    run(resumed, [0.8, math.nan])
    assert path.read_bytes() == saved
