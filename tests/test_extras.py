"""The core install works without the extras, and each command that needs one says which, in one
line: the extras' modules are made unimportable in a fresh process (as if never installed)."""
import subprocess
import sys

import pytest

from tuneflow.extras import EXTRAS

BLOCK = """
import sys, importlib.abc
BLOCKED = set({blocked!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str, blocked) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=sorted(blocked)) + code],
                          capture_output=True, text=True, timeout=600)


ALL_EXTRAS = {m for mods in EXTRAS.values() for m in mods}
CORE = ["tuneflow.fit.finetune", "tuneflow.export.predictor", "tuneflow.export.embed", "tuneflow.export.formats",
        "tuneflow.workbench.doctor", "tuneflow.workbench.lr_find", "tuneflow.workbench.compare", "tuneflow.suggest",
        "tuneflow.cli", "tuneflow.data", "tuneflow.index", "tuneflow.export.explain", "tuneflow.runs.html"]


def test_the_core_modules_import_without_any_extra():
    r = _run("import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in CORE)
             + "print('ok')", ALL_EXTRAS)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("argv, extra", [
    (["serve", "RUN"], "serve"),
    (["index", "RUN", "IMAGES", "--out", "IDX"], "serve"),
    (["search", "small_similar", "--data", "D", "--trials", "1", "--out", "S"], "search"),
])
def test_a_command_names_its_missing_extra_in_one_line(argv, extra):
    r = _run(f"import tuneflow.cli as c; sys.exit(c.main({argv!r}))", EXTRAS[extra])
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("tuneflow: error: tuneflow " + argv[0]) and f"pip install 'tuneflow[{extra}]'" in last
    assert "Traceback" not in r.stderr


def test_optional_names_the_extra_and_lets_other_import_errors_through():
    code = ("from tuneflow.extras import optional\nfrom tuneflow.errors import MissingExtraError\n"
            "try:\n    optional('onnx', 'tuneflow export --format onnx')\nexcept MissingExtraError as e:\n    print(e)\n"
            "try:\n    optional('no_such_module_xyz', 'x')\nexcept MissingExtraError:\n    print('wrong')\n"
            "except ModuleNotFoundError:\n    print('plain')\n")
    r = _run(code, {"onnx"})
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("tuneflow export --format onnx needs onnx") and "tuneflow[export]" in lines[0]
    assert lines[1] == "plain"


def test_feature_engine_openvino_without_openvino_is_one_line(tmp_path):
    """OpenVINO is a core dependency; where it does not import, asking for it says so in one line."""
    from conftest import make_image_folder, random_lite0_weights
    data = make_image_folder(tmp_path / "d", per_class=4)
    argv = ["finetune", "small_similar", "--data", str(data), "--out", str(tmp_path / "r"),
            "--set", "feature_engine=openvino", "--set", "input_size=32", "--set", f"weights={random_lite0_weights()}", "--set", "backbone=efficientnet_lite0"]
    r = _run(f"import tuneflow.cli as c; sys.exit(c.main({argv!r}))", {"openvino"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("tuneflow: error: feature_engine='openvino' needs the OpenVINO runtime")
    assert "--set feature_engine=tensorflow" in last
    assert not (tmp_path / "r").exists()
