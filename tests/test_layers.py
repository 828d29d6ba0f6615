"""The house's shape: the layer contracts of ``.importlinter`` hold (each layer imports only those
below it; no circles among a package's modules), and every module imports on its own."""
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tuneflow

REPO = Path(__file__).resolve().parents[1]


def test_the_layer_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), str(REPO / ".importlinter")], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_a_broken_layer_is_caught(tmp_path):
    """The check can fail: a copy of the package with one upward import breaks the contract."""
    import shutil
    pkg = tmp_path / "tuneflow"
    shutil.copytree(REPO / "tuneflow", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "runs" / "folder.py").write_text((pkg / "runs" / "folder.py").read_text()
                                            + "\nfrom ..training import stages as _upward  # noqa\n")
    lint = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(lint), str(REPO / ".importlinter")], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert r.returncode != 0 and "tuneflow.runs is not allowed to import tuneflow.training" in r.stdout


MODULES = sorted(m.name for m in pkgutil.walk_packages(tuneflow.__path__, "tuneflow.") if m.name != "tuneflow.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name):
    importlib.import_module(name)
