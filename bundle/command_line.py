"""The keys a ``python -m monai.bundle run`` command line sets, checked against the configs it reads.

MONAI takes an override whose key no config declares as a new key and runs without it: ``--max_epoch 3``
trains the configured epochs and says nothing. Each config's ``initialize`` calls
``check_overrides()`` first, so that such a command stops before any work, naming the key and the
closest declared one.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import sys
from pathlib import Path

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.scripts import create_workflow, run

# the arguments of run() (config_file, meta_file, args_file, ...) and of what it passes the rest to
# (create_workflow, ConfigWorkflow: workflow_type, workflow_name, properties_path...): not config keys
RUN_ARGUMENTS = frozenset(
    name
    for function in (run, create_workflow, ConfigWorkflow.__init__)
    for name, parameter in inspect.signature(function).parameters.items()
    if parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
) - {"override", "self"}


def check_overrides(argv: list[str] | None = None) -> None:
    """Raise a ValueError naming every key of the command line (and of its ``--args_file``) that none of its
    ``--config_file`` files declares. Does nothing in a process that is not ``python -m monai.bundle run``
    (the bundle built from Python, e.g. by ``monai.bundle.create_workflow``, has no command line to check)."""
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or argv[1] != "run":
        return
    given = _flags(argv[2:])
    if "args_file" in given:
        given = {**ConfigParser.load_config_file(given["args_file"]), **given}
    files = _config_files(given.get("config_file"))
    if not files:
        return
    declared = ConfigParser()
    declared.read_config(files)
    unknown = [key for key in given if key not in RUN_ARGUMENTS and key not in declared]
    if unknown:
        hints = [f"--{key}{_closest(key, declared)}" for key in unknown]
        raise ValueError(
            f"unknown config key(s) on the command line: {', '.join(hints)}. None of {', '.join(files)} declares "
            "them, and MONAI would add them unused"
        )


def _flags(arguments: list[str]) -> dict[str, str | None]:
    """``--key value`` and ``--key=value`` pairs, as fire reads them (a flag followed by a flag is a switch)."""
    flags: dict[str, str | None] = {}
    for index, argument in enumerate(arguments):
        if not argument.startswith("--"):
            continue
        key, equals, value = argument[2:].partition("=")
        following = arguments[index + 1] if index + 1 < len(arguments) else None
        if not equals:
            value = following if following is not None and not following.startswith("--") else None
        flags[key.replace("-", "_")] = value
    return flags


def _config_files(value) -> list[str]:
    """``--config_file`` as MONAI takes it: one path, or a Python list of them."""
    if not value:
        return []
    if isinstance(value, str) and value.lstrip().startswith(("[", "(")):
        value = ast.literal_eval(value)
    return [str(value)] if isinstance(value, (str, Path)) else [str(path) for path in value]


def _closest(key: str, declared: ConfigParser) -> str:
    """`` (did you mean --...?)`` for the declared key at the same level spelt most like ``key``."""
    *parents, last = key.split("#")
    scope = declared.get("#".join(parents)) if parents else declared.get()
    names = [str(name) for name in scope] if isinstance(scope, dict) else []
    match = difflib.get_close_matches(last, names, n=1)
    return f" (did you mean --{'#'.join([*parents, match[0]])}?)" if match else ""
