"""Training-job hyperparameters: which exist, and the bundle overrides they become.

SageMaker hands hyperparameters to the entry script as strings (``--key value``). Each is one of
- a job setting read by the entry script itself (``JOB_SETTINGS``);
- ``epochs``, another name for the bundle's ``max_epochs``;
- any id of the bundle's training, evaluation or multi-GPU configs (``image_size``, ``batch_size``,
  ``learning_rate``, ``imbalance``, ``augment#prob``, ``train#trainer#max_epochs``, ...), passed on to
  ``monai.bundle run`` as the same ``--key value`` a user types, so parsed the same way;
but not one of the paths the job itself sets (``SET_BY_THE_JOB``). Anything else is refused with the
list of what is wrong, by the launcher before anything is uploaded and by the entry script before
any work.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE_CONFIGS = ("configs/train.json", "configs/evaluate.json", "configs/multi_gpu_train.json")
ALIASES = {"epochs": "max_epochs"}
# Read by the entry script, not the bundle: the datalist split, whether to evaluate after training, and
# two folders ("": none) the launcher sets to the container's synced paths: the bundle's checkpoint
# folder (resume checkpoint, best model, history; SageMaker syncs it with S3 across spot restarts) and
# its TensorBoard folder.
JOB_SETTINGS = {
    "val_frac": 0.15,
    "test_frac": 0.15,
    "split_seed": 0,
    "evaluate": True,
    "checkpoint_dir": "",
    "tensorboard_dir": "",
}
SET_BY_THE_JOB = ("bundle_root", "ckpt_dir", "output_dir", "cache_dir", "dataset_dir", "datalist")


class HyperparameterError(ValueError):
    """A hyperparameter the bundle does not know, or that the job sets itself; the message lists all."""


@cache
def bundle_ids() -> frozenset[str]:
    """The top-level ids of the configs a job merges (nested ids are checked through the parser)."""
    return frozenset(_parser().config)


@cache
def _parser():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / name) for name in BUNDLE_CONFIGS])
    return parser


def as_strings(hyperparameters: dict) -> dict[str, str]:
    """Hyperparameters as SageMaker carries them: strings, lists and dicts as JSON."""
    return {str(key): value if isinstance(value, str) else json.dumps(value) for key, value in hyperparameters.items()}


def split(hyperparameters: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Check every key; return (bundle overrides, job settings), both as strings."""
    overrides, settings, problems = {}, {}, []
    for key, value in as_strings(hyperparameters).items():
        if key in JOB_SETTINGS:
            settings[key] = value
        elif key in SET_BY_THE_JOB:
            problems.append(f"{key!r} is set by the training job itself (from the data channel and SM_* paths)")
        elif key.startswith("_") or ALIASES.get(key, key) not in _parser():
            problems.append(f"unknown hyperparameter {key!r}{_suggestion(key)}")
        else:
            overrides[ALIASES.get(key, key)] = value
    if problems:
        raise HyperparameterError(
            "bad hyperparameters:\n  " + "\n  ".join(problems) + "\n"
            f"known: {', '.join(known())}, or any other id of {', '.join(BUNDLE_CONFIGS)}"
        )
    return overrides, settings


def known() -> list[str]:
    """The names a user is most likely to mean, for error messages."""
    common = [
        "epochs",
        "image_size",
        "batch_size",
        "learning_rate",
        "imbalance",
        "augment",
        "val_interval",
        "seed",
        "amp",
    ]
    return common + list(JOB_SETTINGS)


def _suggestion(key: str) -> str:
    candidates = sorted(set(known()) | {name for name in bundle_ids() if not name.startswith("_")})
    close = difflib.get_close_matches(key, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def job_settings(settings: dict[str, str]) -> dict:
    """The entry script's own settings, typed, defaults filled in; a malformed value is a HyperparameterError."""
    typed = dict(JOB_SETTINGS)
    for key, value in settings.items():
        if isinstance(JOB_SETTINGS[key], str):  # a path, taken as typed
            typed[key] = value
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if isinstance(JOB_SETTINGS[key], bool):
            parsed = {"true": True, "false": False}.get(str(parsed).lower(), parsed)
            valid = isinstance(parsed, bool)
        elif isinstance(JOB_SETTINGS[key], int):
            valid = isinstance(parsed, int) and not isinstance(parsed, bool)
        else:
            valid = isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
        if not valid:
            raise HyperparameterError(
                f"hyperparameter {key!r} must be a {type(JOB_SETTINGS[key]).__name__}, not {value!r}"
            )
        typed[key] = parsed
    return typed
