"""The documentation cannot drift from the code: the README's and docs/'s code blocks are run or checked.

- Python blocks run (pytest-examples finds them; each runs as a module whose tracebacks point
  at the Markdown line) in a scratch folder holding ``data/digits`` and ``runs/digits``, a small
  real run of ``small_similar`` on data/digits. A block whose first line is
  ``# not run in tests: REASON`` is compiled, and the modules and names it imports must exist.
- Shell blocks: pytest-examples reads Python only, so a small collector here reads ``sh`` blocks.
  Every ``tuneflow ...`` command (and ``make finetune``'s ``RECIPE``/``DATA``/``OUT``/``ARGS``)
  is parsed by the CLI's own argparse parser; the cheap ones run, in block order, on a copy of
  the scratch folder; every ``make TARGET`` must be a Makefile target.
- The site builds with ``mkdocs build --strict``; the README's links resolve; the README stays
  within 250 lines.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytest_examples import CodeExample, find_examples

from conftest import REPO, random_lite0_weights

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
SKIP_MARK = "# not run in tests:"
# Subcommands cheap enough to run on runs/digits (32 px): seconds each. The rest are parsed only.
CHEAP = {"recipes", "predict", "embed", "index", "similar", "pack"}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------- the scratch folder

@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A folder with data/digits (linked) and runs/digits: a real small_similar run at 32 px on
    random Lite0 weights (the examples' ``runs/digits`` is the same recipe at 288 px, ImageNet)."""
    import tuneflow
    base = tmp_path_factory.mktemp("docs")
    (base / "data").mkdir()
    (base / "data" / "digits").symlink_to(REPO / "data" / "digits")
    tuneflow.finetune("small_similar", str(REPO / "data" / "digits"), str(base / "runs" / "digits"),
                      overrides={"input_size": 32, "backbone": "efficientnet_lite0", "weights": random_lite0_weights()}, verbose=0)
    return base


@pytest.fixture
def scratch(digits_run, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the scratch folder, made the working directory."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(REPO / "data" / "digits")
    shutil.copytree(digits_run / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------- Python blocks

PY_EXAMPLES = [ex for f in DOC_FILES for ex in find_examples(f)]


def _skip_reason(example: CodeExample) -> str | None:
    first = example.source.lstrip("\n").split("\n", 1)[0].strip()
    return first[len(SKIP_MARK):].strip() if first.startswith(SKIP_MARK) else None


def _check_imports(source: str) -> None:
    """Every module a block imports exists, every name imported from one exists, and every
    ``module.attribute`` chain on an imported module resolves."""
    tree = ast.parse(source)
    modules = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                importlib.import_module(a.name)
                modules[a.asname or a.name.split(".")[0]] = importlib.import_module(
                    a.name if a.asname else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            mod = importlib.import_module(node.module)
            for a in node.names:
                if not hasattr(mod, a.name):
                    importlib.import_module(f"{node.module}.{a.name}")  # a submodule, or ImportError
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                obj = modules[base.id]
                for name in reversed(chain):
                    if hasattr(obj, name):
                        obj = getattr(obj, name)
                        continue
                    try:  # a submodule not imported yet
                        obj = importlib.import_module(f"{obj.__name__}.{name}")
                    except (ImportError, AttributeError):
                        raise AssertionError(
                            f"{base.id}.{'.'.join(reversed(chain))}: {base.id} has no {name!r}") from None


def test_there_are_python_examples_and_most_run():
    assert len(PY_EXAMPLES) >= 8, [str(e) for e in PY_EXAMPLES]
    skipped = [e for e in PY_EXAMPLES if _skip_reason(e) is not None]
    assert len(skipped) < len(PY_EXAMPLES) / 2, [str(e) for e in skipped]


def _run_block(example: CodeExample) -> None:
    """Run a block as a module whose tracebacks name the Markdown file and line. (pytest-examples'
    own ``EvalExample.run`` rewrites the traceback in a way that makes pytest 9 stop with an
    INTERNALERROR instead of reporting the failing block, so it is used here to find blocks only.)"""
    code = compile("\n" * example.start_line + example.source, str(example.path), "exec")
    exec(code, {"__name__": example.module_name})  # noqa: S102 - running the documentation is the test


@pytest.mark.parametrize("example", PY_EXAMPLES, ids=str)
def test_python_block(example: CodeExample, request):
    reason = _skip_reason(example)
    if reason is not None:
        assert reason, f"{example}: `{SKIP_MARK}` needs a reason after the colon"
        compile(example.source, str(example), "exec")
        _check_imports(example.source)
        return
    if "runs/" in example.source or "data/" in example.source:
        request.getfixturevalue("scratch")  # the block reads the digits or their run
    else:
        request.getfixturevalue("monkeypatch").chdir(request.getfixturevalue("tmp_path"))
    _check_imports(example.source)
    _run_block(example)


# ---------------------------------------------------------------- shell blocks

@dataclass
class ShellBlock:
    path: Path
    line: int
    commands: list[list[str]]  # each one command line, split into words, environment assignments dropped

    def __str__(self):
        return f"{_rel(self.path)}:{self.line}"


_FENCE = re.compile(r"^```(sh|bash|shell|console)\s*\n(.*?)^```", re.M | re.S)
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _shell_blocks(path: Path) -> list[ShellBlock]:
    text = path.read_text()
    blocks = []
    for m in _FENCE.finditer(text):
        commands = []
        for line in m.group(2).replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and _ASSIGN.match(words[0]):
                words = words[1:]
            if words:
                commands.append(words)
        blocks.append(ShellBlock(path, text[:m.start()].count("\n") + 1, commands))
    return blocks


SHELL_BLOCKS = [b for f in DOC_FILES for b in _shell_blocks(f)]
MAKE_TARGETS = set(re.findall(r"^([A-Za-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))


def _parse(argv: list[str], where: str):
    """The CLI's own parser on argv; a failure shows argparse's message."""
    from tuneflow.cli import _parser
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return _parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and argv[:1] == ["--version"]:
            return None
        message = err.getvalue().strip().splitlines()[-1:]  # argparse's "error: ..." line, after the usage
        pytest.fail(f"{where}: `tuneflow {shlex.join(argv)}` does not parse: {' '.join(message)}")


def _make_argv(words: list[str], where: str) -> list[str] | None:
    """``make finetune RECIPE=.. DATA=.. OUT=.. ARGS=".."`` as the tuneflow argv it runs."""
    targets = [w for w in words[1:] if not _ASSIGN.match(w)]
    assert targets, f"{where}: `{shlex.join(words)}` names no target"
    for t in targets:
        assert t in MAKE_TARGETS, f"{where}: `make {t}` is not a Makefile target ({sorted(MAKE_TARGETS)})"
    if targets != ["finetune"]:
        return None
    v = dict(w.split("=", 1) for w in words[1:] if _ASSIGN.match(w))
    argv = ["finetune", v.get("RECIPE", "small_similar"), "--data", v.get("DATA", "data/digits")]
    return argv + (["--out", v["OUT"]] if v.get("OUT") else []) + shlex.split(v.get("ARGS", ""))


def _cheap(words: list[str]) -> bool:
    """A command to run: a cheap subcommand on the project's own digits (or `tuneflow recipes`)."""
    return len(words) > 1 and words[1] in CHEAP and (
        words[1] == "recipes" or any(w.startswith(("runs/digits", "data/digits")) for w in words[2:]))


def test_there_are_shell_examples():
    n = sum(1 for b in SHELL_BLOCKS for c in b.commands if c[0] == "tuneflow")
    assert n >= 30, n


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=str)
def test_shell_block(block: ShellBlock, request):
    from tuneflow.cli import main
    to_run = []
    for words in block.commands:
        where = str(block)
        if words[0] == "tuneflow":
            args = _parse(words[1:], where)
            if args is not None and _cheap(words):
                to_run.append(words[1:])
        elif words[0] == "make":
            argv = _make_argv(words, where)
            if argv is not None:
                _parse(argv, where)
    if not to_run:
        return
    request.getfixturevalue("scratch")
    for argv in to_run:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
        assert rc == 0, f"{block}: `tuneflow {shlex.join(argv)}` exited {rc}"


def test_cheap_commands_ran_somewhere():
    """The blocks above do run commands (a typo in CHEAP or in the paths would run none)."""
    ran = {words[1] for b in SHELL_BLOCKS for words in b.commands if words[0] == "tuneflow" and _cheap(words)}
    assert ran >= {"recipes", "predict", "embed", "index", "similar"}, ran


# ---------------------------------------------------------------- the site and the README

def test_site_builds_strict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "site" / "design" / "index.html").exists()


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs uses for anchors)."""
    s = re.sub(r"[`*_]", "", heading).strip().lower()
    s = re.sub(r"[^\w\s-]", "", s)
    return re.sub(r"[\s]+", "-", s)


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "make finetune" in text and "make test" in text
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local
    for link in local:
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.exists(), f"README links to {link}, which does not exist"
        if anchor:
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", target.read_text(), re.M)}
            assert anchor in slugs, f"README links to {link}: no heading with that anchor ({sorted(slugs)})"


def test_every_guide_page_is_in_the_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    for page in sorted((REPO / "docs").rglob("*.md")):
        assert _rel(page).removeprefix("docs/") in nav, f"{_rel(page)} is not in mkdocs.yml's nav"


def test_the_layer_picture_is_committed_shown_and_redrawn(tmp_path):
    """`make layers`'s script draws the .importlinter layers (one box each) from the code's imports."""
    assert (REPO / "docs" / "img" / "layers.png").stat().st_size > 10_000
    assert "img/layers.png" in (REPO / "docs" / "design.md").read_text()
    out = subprocess.run([sys.executable, str(REPO / "tools" / "draw_layers.py"), "--out", str(tmp_path / "l.png")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    contract = re.search(r"^layers =\n((?:[ \t]+\S.*\n)+)", (REPO / ".importlinter").read_text(), re.M)
    assert contract and f": {len(contract.group(1).splitlines())} layers," in out.stdout, out.stdout
    assert (tmp_path / "l.png").stat().st_size > 10_000


def _named_in_docs(pattern: str) -> set[tuple[str, str]]:
    return {(_rel(f), m) for f in DOC_FILES for m in re.findall(pattern, f.read_text())}


def test_the_files_and_names_the_docs_mention_exist():
    """A backticked `path.py` (from the repository, tuneflow/, tests/ or benchmarks/) and a backticked
    `tuneflow.name` resolve: a module moved or renamed shows up here."""
    for page, path in _named_in_docs(r"`([\w./-]+\.py)(?:::\w+)?`"):
        assert any((REPO / base / path).exists() for base in ("", "tuneflow", "tests", "benchmarks")), f"{page}: `{path}`"
    for page, dotted in _named_in_docs(r"`(tuneflow(?:\.\w+)+)`"):
        parts = dotted.split(".")
        obj = importlib.import_module(parts[0])
        for i, name in enumerate(parts[1:], start=1):
            if not hasattr(obj, name):
                try:
                    obj = importlib.import_module(".".join(parts[:i + 1]))
                    continue
                except ImportError:
                    pytest.fail(f"{page}: `{dotted}` does not resolve ({'.'.join(parts[:i])} has no {name!r})")
            obj = getattr(obj, name)
