"""Every dependency setup.cfg declares is installed at a version it admits and imports: a broken or
missing one fails the suite here, by name, instead of skipping the tests that need it. (The
Makefile installs the core and every extra; only ``gpu``, CUDA's wheels, is left to GPU machines.)
(That every tuneflow module imports is tests/test_layers.py's.)"""
import configparser
import functools
import importlib
import importlib.metadata as md

import pytest
from packaging.requirements import Requirement

from conftest import REPO

NOT_INSTALLED_HERE = {"gpu"}  # extras the suite does not install


def _normal(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _declared() -> list[tuple[str, Requirement]]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    sections = [("core", cfg["options"]["install_requires"])]
    if cfg.has_section("options.extras_require"):
        sections += [(extra, text) for extra, text in cfg["options.extras_require"].items()
                     if extra not in NOT_INSTALLED_HERE]
    out = []
    for where, text in sections:
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                req = Requirement(line)
                if _normal(req.name) != "tuneflow" and (req.marker is None or req.marker.evaluate()):  # not all = tuneflow[...]
                    out.append((where, req))
    return out


DECLARED = _declared()


@functools.lru_cache(maxsize=None)
def _owners() -> dict:
    return md.packages_distributions()  # scans every installed distribution: once


def _top_level_modules(dist_name: str) -> list[str]:
    """The module to import for a distribution: the one named like it (tensorflow_datasets,
    python_multipart), else its importable top-level names (PIL, sklearn, faiss), never the
    ``tests``/``examples`` folders some wheels ship."""
    owners = _owners()
    mods = sorted(m for m, dists in owners.items() if any(_normal(d) == _normal(dist_name) for d in dists)
                  and m.isidentifier() and not m.startswith("_"))
    if _normal(dist_name) in mods:
        return [_normal(dist_name)]
    return [m for m in mods if m not in {"tests", "test", "examples", "tools", "docs", "benchmarks"}]


def test_setup_cfg_declares_the_dependencies_this_test_reads():
    names = {_normal(r.name) for _, r in DECLARED}
    assert {"tensorflow", "keras", "openvino", "numpy"} <= names, sorted(names)


@pytest.mark.parametrize("where, req", DECLARED, ids=[f"{w}:{r.name}" for w, r in DECLARED])
def test_declared_dependency_is_installed_in_range_and_imports(where, req):
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        pytest.fail(f"{req.name} ({where}) is declared in setup.cfg but not installed: run `make install`")
    assert req.specifier.contains(version, prereleases=True), (
        f"{req.name} {version} is installed, outside the range setup.cfg declares ({req})")
    modules = _top_level_modules(req.name)
    assert modules, f"{req.name} {version} is installed but provides no importable module"
    for module in modules:
        importlib.import_module(module)  # raises (fails) where the install is broken
