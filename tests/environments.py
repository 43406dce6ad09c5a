"""A Python process that sees only the packages a deployment declares, on this machine's venv.

The venv holds far more than any one deployment installs (and the checkout itself, editable), so an import a
deployment lacks passes every test run here unless the test hides what the deployment would not have. A
``sitecustomize`` on PYTHONPATH does that at every interpreter's start: each top-level module of a distribution
outside what ``pip install`` of the declared requirements would install is made unimportable, and the
checkout's editable finder is removed, so its packages import only from the files a deployment copies.
"""

import importlib.metadata
import sys
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def requirements_of(lines: Iterable[str]) -> list[Requirement]:
    """The requirements of a requirements file's ``lines`` (comments and blank lines left out)."""
    return [Requirement(line) for line in (line.split("#")[0].strip() for line in lines) if line]


def installed_by(requirements: Iterable[str]) -> set[str]:
    """The distributions ``pip install`` of the ``requirements`` lines installs: them and, transitively, what they
    require (extras and environment markers honoured, read from this venv's metadata)."""
    todo, seen, names = requirements_of(requirements), set(), set()
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            requires = importlib.metadata.distribution(requirement.name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here either, so nothing here can import it
        for line in requires:
            needed = Requirement(line)
            extras = requirement.extras or {""}
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(needed)
    return names


# imported at the start of every Python process given ``only_these_packages``'s PYTHONPATH
SITECUSTOMIZE = """\
import importlib.machinery
import sys

NOT_DECLARED = frozenset({absent})


class DeclaredOnly:
    # the path finder, blind to undeclared top-level modules: a probe (importlib.util.find_spec) gets None and
    # an import ModuleNotFoundError, as where they are not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in NOT_DECLARED:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):  # importlib.metadata asks the meta path too
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)

    @classmethod
    def invalidate_caches(cls):
        importlib.machinery.PathFinder.invalidate_caches()


# the checkout's editable install, which no deployment has: its packages come from the files deployed
editable = [f for f in sys.meta_path if getattr(f, "__module__", "").startswith("__editable__")]
path_finder = importlib.machinery.PathFinder
sys.meta_path[:] = [DeclaredOnly if f is path_finder else f for f in sys.meta_path if f not in editable]
"""


def only_these_packages(requirements: Iterable[str], directory: Path) -> dict:
    """Environment variables (PYTHONPATH, to a ``sitecustomize`` written in ``directory``) under which a Python
    process imports only what ``pip install`` of the ``requirements`` lines would install, and the standard library."""
    distributions_of = importlib.metadata.packages_distributions()
    installed = installed_by(requirements)
    checkout = {canonicalize_name(name) for name in distributions_of["bundle"]}  # hidden by the sitecustomize
    absent = {
        module
        for module, distributions in distributions_of.items()
        if module not in sys.stdlib_module_names
        and not any(canonicalize_name(name) in installed | checkout for name in distributions)
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE.format(absent=sorted(absent)))
    return {"PYTHONPATH": str(directory)}
