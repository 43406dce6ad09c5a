"""What the archives ship of the ``bundle`` package: the import closure of the packaged entry points.

The ``.mar``, ``model.tar.gz`` and the BYOC image carry the modules the packaged handler
(``handler.py``) and SageMaker adapter (``inference.py``) need and no others, so training, plotting and
the synthetic generator stay out of production. Derived, never listed: a hand-kept list drifts, and a
module missing from an archive fails only there, in the server. The closure follows

- every ``import bundle.x`` / ``from bundle(.x) import ...`` in the entry points and, transitively, in
  the bundle modules they reach (imports inside functions count too);
- the ``configs/inference.json`` keys the Predictor parses (its ``get_parsed_content("key")`` calls), with
  every ``@reference`` in them, transitively: the ``bundle.x`` those expressions name (the image reader,
  the inferer, the calibration, the guard) are imported by MONAI's config parser, not by Python code.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import bundle
from bundle.predictor import INFERENCE_CONFIG

PACKAGE = Path(bundle.__file__).parent
ENTRY_POINTS = (Path(__file__).with_name("handler.py"), Path(__file__).with_name("inference.py"))


def serving_modules(bundle_root: str | os.PathLike) -> list[str]:
    """The names of the ``bundle`` modules serving the bundle in ``bundle_root`` imports (``__init__``
    included), sorted: it is that bundle's ``configs/inference.json`` the archive carries."""
    return import_closure(ENTRY_POINTS, json.loads((Path(bundle_root) / INFERENCE_CONFIG).read_text()))


def import_closure(sources: Iterable[Path], config: dict, modules: Iterable[str] = ()) -> list[str]:
    """``modules`` (and ``__init__``) with every ``bundle`` module the ``sources`` import, transitively, sorted;
    ``config``: the inference config whose parsed keys count as imports (see the module docstring)."""
    found, queue = {"__init__", *modules}, list(sources)
    while queue:
        for name in sorted(bundle_modules(queue.pop(), config) - found):
            found.add(name)
            queue.append(PACKAGE / f"{name}.py")
    return sorted(found)


def serving_files(bundle_root: str | os.PathLike) -> list[Path]:
    """The source files of ``serving_modules(bundle_root)``."""
    return [PACKAGE / f"{name}.py" for name in serving_modules(bundle_root)]


def bundle_modules(source: Path, config: dict) -> set[str]:
    """The ``bundle`` modules ``source`` imports, or names through the config keys it parses."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.ImportFrom) and node.module == "bundle":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bundle."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("bundle.")}
        elif _parsed_config_key(node):
            names |= config_modules(config, node.args[0].value)
    return {name for name in names if (PACKAGE / f"{name}.py").is_file()}


def _parsed_config_key(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get_parsed_content"
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
    )


def config_modules(config: dict, key: str) -> set[str]:
    """The ``bundle.x`` named by the inference config's ``key`` and everything it references."""
    seen, queue, text = set(), [key], []
    while queue:
        current = queue.pop()
        if current in seen:
            continue
        seen.add(current)
        item = config
        for part in current.split("#"):
            item = item[int(part)] if isinstance(item, list) else item.get(part, {})
        dumped = json.dumps(item)
        text.append(dumped)
        queue += re.findall(r"@([\w#]+)", dumped)
    return set(re.findall(r"\bbundle\.(\w+)", "".join(text)))
