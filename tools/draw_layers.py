"""Draw tuneflow's layers and the imports between them: ``make layers`` writes docs/img/layers.png.

The import graph is grimp's (every ``import`` statement, those inside functions included); the
layer order is the import-linter ``layers`` contract when one is declared (setup.cfg,
.importlinter or pyproject.toml), else LAYERS below. Each box is a layer, bottom to top; an arrow
between two boxes counts the imports from one layer's modules into the other's. Grey arrows run
down (allowed); red arrows run up (a lower layer importing a higher one), and every upward
import is listed under the picture with its file and line, as are import cycles between modules.

    .venv/bin/python tools/draw_layers.py [--out docs/img/layers.png]
"""
from __future__ import annotations

import argparse
import configparser
import re
from collections import Counter
from pathlib import Path

import grimp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "tuneflow"

# Bottom to top; the modules of one entry form one layer. Used while no import-linter contract exists.
LAYERS = [
    ("core", ["errors", "atomic", "home", "imageops", "hardware", "tf_import", "recipe"]),
    ("runs, backbones, data", ["runs", "backbones", "data"]),
    ("features", ["features"]),
    ("training", ["training"]),
    ("export", ["export"]),
    ("serve, index, workbench", ["serve", "index", "workbench", "suggest"]),
    ("cli", ["cli", "__main__"]),
]


def contract_layers() -> list[tuple[str, list[str]]] | None:
    """The first import-linter ``layers`` contract, bottom to top, or None when there is none."""
    for name in ("setup.cfg", ".importlinter"):
        path = REPO / name
        if not path.exists():
            continue
        cfg = configparser.ConfigParser()
        cfg.read(path)
        for section in cfg.sections():
            if section.startswith("importlinter:contract") and cfg[section].get("type") == "layers":
                return _parse_layers(cfg[section].get("layers", ""), cfg[section].get("containers", ""))
    pyproject = REPO / "pyproject.toml"
    if pyproject.exists():
        import tomllib
        data = tomllib.loads(pyproject.read_text())
        for contract in data.get("tool", {}).get("importlinter", {}).get("contracts", []):
            if contract.get("type") == "layers":
                layers = contract.get("layers", [])
                containers = contract.get("containers", [])
                return _parse_layers("\n".join(layers), "\n".join(containers))
    return None


def _parse_layers(text: str, containers: str) -> list[tuple[str, list[str]]]:
    prefix = containers.split()[0] + "." if containers.split() else ""
    out = []
    for line in text.splitlines():
        line = line.strip().strip("()")
        if not line:
            continue
        names = [n.strip() for n in re.split(r"[|:]", line) if n.strip()]
        names = [(prefix + n if prefix else n).removeprefix(PACKAGE + ".") for n in names]
        out.append((", ".join(names), names))
    return out[::-1]  # import-linter lists the highest layer first


def layer_of(module: str, layers) -> int | None:
    """Index of the layer whose entry is the module or one of its packages (the longest match)."""
    best, best_len = None, -1
    short = module.removeprefix(PACKAGE + ".")
    for i, (_, names) in enumerate(layers):
        for n in names:
            if (short == n or short.startswith(n + ".")) and len(n) > best_len:
                best, best_len = i, len(n)
    return best


def members(layer_names: list[str], modules) -> list[str]:
    """The top-level names a layer box shows (a package once, with its module count)."""
    shown = []
    for n in layer_names:
        sub = [m for m in modules if m == f"{PACKAGE}.{n}" or m.startswith(f"{PACKAGE}.{n}.")]
        if not sub:
            continue
        shown.append(f"{n} ({len(sub) - 1})" if len(sub) > 1 else n)
    return shown


def draw(out: Path) -> dict:
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    layers = contract_layers() or LAYERS
    modules = sorted(graph.modules)
    where = {m: layer_of(m, layers) for m in modules}
    edges: Counter = Counter()
    upward = []
    for importer in modules:
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            a, b = where[importer], where[imported]
            if a is None or b is None or a == b:
                continue
            edges[(a, b)] += 1
            if b > a:
                for d in sorted(graph.get_import_details(importer=importer, imported=imported),
                                key=lambda d: d["line_number"]):
                    upward.append(f"{importer} -> {imported} (line {d['line_number']})")
    outside = [m for m in modules if where[m] is None]
    cycles = _module_cycles(graph, [m for m in modules if where[m] is not None])

    n = len(layers)
    fig_h = 1.1 * n + 0.3 + 0.16 * (len(upward) + len(cycles) + 3)
    fig, ax = plt.subplots(figsize=(11, fig_h))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.16 * (len(upward) + len(cycles) + 3) - 0.2, 1.1 * n)
    ax.axis("off")
    box_x, box_w = 0.3, 6.2
    centres = {}
    for i, (title, names) in enumerate(layers):
        y = 1.1 * i + 0.15
        ax.add_patch(FancyBboxPatch((box_x, y), box_w, 0.8, boxstyle="round,pad=0.02",
                                    fc="#e8f0fb", ec="#4a6fa5"))
        ax.text(box_x + 0.15, y + 0.58, f"{i + 1}. {title}", fontsize=10, weight="bold", va="center")
        ax.text(box_x + 0.15, y + 0.25, "  ".join(members(names, modules)), fontsize=8, va="center",
                family="monospace")
        centres[i] = y + 0.4
    # arrows on the right: downward ones on the left lane, upward ones (red) further right
    lanes = {"down": 6.7, "up": 8.6}
    k_down = k_up = 0
    for (a, b), count in sorted(edges.items()):
        up = b > a
        x = lanes["up" if up else "down"] + 0.14 * (k_up if up else k_down)
        if up:
            k_up += 1
        else:
            k_down += 1
        ax.add_patch(FancyArrowPatch((x, centres[a]), (x, centres[b]), arrowstyle="-|>", mutation_scale=9,
                                     color="#c0392b" if up else "#8a8a8a", lw=1.6 if up else 0.8,
                                     connectionstyle="arc3,rad=0.0"))
        if up:
            ax.text(x + 0.03, (centres[a] + centres[b]) / 2, str(count), fontsize=7, color="#c0392b")
    ax.text(6.7, 1.1 * n - 0.05, "imports down", fontsize=8, color="#555555")
    ax.text(8.6, 1.1 * n - 0.05, "imports up (not allowed)", fontsize=8, color="#c0392b")
    lines = [f"{len(upward)} upward imports, {len(cycles)} import cycles between modules"
             + (f"; outside the layers: {', '.join(outside)}" if outside else "")]
    lines += [f"up: {u}" for u in upward] + [f"cycle: {c}" for c in cycles]
    for j, line in enumerate(lines):
        ax.text(0.3, -0.16 * (j + 1), line.replace(PACKAGE + ".", ""), fontsize=7, family="monospace",
                color="#c0392b" if j else "black")
    ax.set_title(f"{PACKAGE}: layers, lowest at the bottom (grimp import graph)", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"layers": [t for t, _ in layers], "upward": upward, "cycles": cycles, "outside": outside}


def _module_cycles(graph, modules) -> list[str]:
    """Strongly connected groups among ``modules`` (Tarjan), each written as its members."""
    inside = set(modules)
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v) & inside:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(", ".join(sorted(group)))
    for m in modules:
        if m not in index:
            visit(m)
    return sorted(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "docs" / "img" / "layers.png"))
    args = p.parse_args(argv)
    found = draw(Path(args.out))
    print(f"{args.out}: {len(found['layers'])} layers, {len(found['upward'])} upward imports, "
          f"{len(found['cycles'])} cycles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
