"""``report.html``: a run's, k-fold run's or search's report as one self-contained page (pictures inlined, no network).

It is written from the files the folder already holds (``report.json``, ``recipe.json``,
``run.json``, ``curves.png``, ``confusion.png``, ``top_losses.png``; for a search ``trials.csv``,
``search.png``, ``best_recipe.json``), so ``tuneflow report RUN`` can write it again at any time.

>>> write_report_html("runs/small_similar-20261122-233128")   # doctest: +SKIP
PosixPath('runs/small_similar-20261122-233128/report.html')
"""
from __future__ import annotations

import base64
import csv
import json
import logging
import os
import shlex
import sys
import webbrowser
from html import escape
from pathlib import Path

from ..errors import RunError
from . import names
from .folder import atomic_write

log = logging.getLogger("tuneflow")

HTML_FILE = names.REPORT_HTML

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:18px 22px 40px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #dde1e8;padding-bottom:4px}
.sub{color:#5b6475;margin:0 0 14px}
.verdict{padding:10px 14px;border-radius:8px;margin:10px 0;border:1px solid}
.verdict.good{background:#ecf8ef;border-color:#9fd3ad}.verdict.bad{background:#fdf0ef;border-color:#e9a9a3}
.verdict.mid{background:#fff8e6;border-color:#ecd08a}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:8px 12px;min-width:130px}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:6px 0}th,td{border:1px solid #dde1e8;padding:4px 8px;text-align:right}
th{background:#eef1f5}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #dde1e8;background:#fff;border-radius:4px}
pre{background:#fff;border:1px solid #dde1e8;padding:8px;overflow:auto;font-size:12px}
code{background:#eef1f5;padding:1px 4px;border-radius:3px}
.row{display:flex;flex-wrap:wrap;gap:14px}.row>div{flex:1 1 300px}
.bar{display:inline-block;height:9px;background:#3b6fb6;border-radius:2px;vertical-align:middle}
td.cm{text-align:center}
"""


def _img(path: Path, alt: str) -> str:
    """An inlined PNG (``data:`` URL), or a note when the picture is missing."""
    if not path.is_file():
        return f'<p class="sub">({escape(path.name)} is missing)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(v, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return escape(str(v)) if v is not None else ""


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><main>{body}</main></body></html>\n')


def _verdict_class(verdict: str) -> str:
    return {"good fit": "good", "no better than chance": "bad"}.get(verdict, "mid")


def _confusion_table(report: dict) -> str:
    cm, classes = report.get("confusion_matrix"), report.get("classes") or []
    if not isinstance(cm, list) or not cm:
        return ""
    peak = max(max(r) for r in cm) or 1
    rows = []
    for name, row in zip(classes, cm):
        cells = [escape(str(name))]
        for v in row:
            shade = int(235 - 150 * v / peak)
            cells.append(f'<span style="display:block;background:rgb({shade},{shade + 10},255)">{v}</span>')
        rows.append(cells)
    return _table(["true \\ predicted", *map(str, classes)], rows, "confusion")


def _run_sections(folder: Path, report: dict, level: int = 2) -> str:
    """The body of one run's report (also a fold's, inside a k-fold report)."""
    h = f"h{level}"
    b = report.get("baseline") or {}
    acc, rate = report.get("val_accuracy"), report.get("majority_rate")
    cards = [("val accuracy", _fmt(acc)), ("majority-class rate", _fmt(rate)),
             ("val loss", _fmt(report.get("val_loss"))),
             ("validation images", _fmt(report.get("num_val"))), ("train images", _fmt(report.get("num_train")))]
    if report.get("test_accuracy") is not None:
        cards.append(("test accuracy", _fmt(report["test_accuracy"])))
    beat = ""
    if b.get("num_val"):
        beat = (f"{b['val_correct']}/{b['num_val']} correct; always answering '{escape(str(b['majority_class']))}' "
                f"scores {_fmt(rate)}: " + ("beaten" if b.get("beats_majority") else "<b>not beaten</b>")
                + f" (one-sided binomial p = {b['p_value']:.2g}"
                + (f", {b['needed_correct']}/{b['num_val']} correct needed)" if b.get("needed_correct") is not None
                   else ", too few images to beat it)"))
    out = [f'<div class="verdict {_verdict_class(report.get("verdict", ""))}"><b>Verdict: '
           f'{escape(str(report.get("verdict", "unknown")))}</b> — {escape(str(report.get("advice", "")))}</div>',
           '<div class="cards">' + "".join(f"<div class=card><b>{v}</b><span>{escape(k)}</span></div>"
                                           for k, v in cards) + "</div>",
           f'<p class="sub">{beat}</p>' if beat else ""]
    if report.get("evaluated"):
        out.append(f'<p class="sub">Measured on: {escape(report["evaluated"])}.</p>')
    per = report.get("per_class") or {}
    if per:
        rows = [[escape(str(c)), f"{m['precision']:.3f}", f"{m['recall']:.3f}",
                 f'{m["f1"]:.3f} <span class="bar" style="width:{int(60 * m["f1"])}px"></span>', m["support"]]
                for c, m in per.items()]
        out += [f"<{h}>Per class (validation)</{h}>", _table(["class", "precision", "recall", "F1", "support"], rows)]
    out += [f"<{h}>Confusion matrix</{h}>", '<div class="row"><div>', _confusion_table(report), "</div><div>",
            _img(folder / names.CONFUSION, "confusion matrix"), "</div></div>",
            f"<{h}>Curves</{h}>", _img(folder / names.CURVES, "training curves")]
    if (folder / names.TOP_LOSSES).is_file():
        out += [f"<{h}>Top losses</{h}>", '<p class="sub">The validation images the model is most wrong '
                "about, each with its class-evidence heatmap (Grad-CAM).</p>",
                _img(folder / names.TOP_LOSSES, "top losses")]
    health = {s["stage"]: s for s in report.get("stage_health") or []}
    stages = []
    for s in report.get("stages") or []:
        hs = health.get(s["name"], {})
        stages.append([escape(s["name"]), escape(str(s["train"])), s["epochs_run"], escape(str(s["optimizer"])),
                       f"{s['lr']:g}", escape(str(s["schedule"])), "yes" if s.get("cache") else "no",
                       _fmt(hs.get("best_val_accuracy")), "<b>diverged</b>" if hs.get("diverged") else ""])
    out += [f"<{h}>Stages</{h}>", _table(["stage", "train", "epochs run", "optimizer", "lr", "schedule",
                                          "feature cache", "best val accuracy", ""], stages)]
    mf = report.get("model_from")
    weights = report.get("weights")
    origin = ("trained from scratch (weights=None)" if report.get("from_scratch") or weights in (None, "None")
              else f"{escape(str(report.get('backbone')))} initialised from <code>{escape(str(weights))}</code> weights")
    out.append(f"<p>Backbone: {origin}; input {report.get('input_size')} px ({escape(str(report.get('resize')))})"
               + (f", features tapped at <code>{escape(str(report['tap']))}</code>" if report.get("tap") else "")
               + ". The model's weights: " + (
                   f"the best validated ones, from stage '{escape(str(mf['stage']))}' "
                   + ("(its end)" if mf["epoch"] == "end" else f"(epoch {mf['epoch']})") if mf else "the last epoch's")
               + f"; precision {escape(str(report.get('precision')))}, strategy {escape(str(report.get('strategy')))}.</p>")
    choice = report.get("backbone_choice") or {}
    if choice:
        out.append(f'<p class="sub">Backbone chosen (backbone=auto): {escape(str(choice.get("reason", "")))}.</p>')
        if choice.get("probes"):
            out.append(_table(["candidate", "cross-validated accuracy (train)", "seconds", "images/s"],
                              [[escape(n) + (" (kept)" if n == choice.get("backbone") else ""), _fmt(p["accuracy"]),
                                _fmt(p["seconds"], 1), _fmt(p["images_per_second"], 1)]
                               for n, p in choice["probes"].items()]))
    return "\n".join(out)


def _repeat(folder: Path, report: dict) -> str:
    run = _read_json(folder / names.RUN) or {}
    data = report.get("data") or "DATA"
    cmd = f"tuneflow finetune {shlex.quote(str(folder / 'recipe.json'))} --data {shlex.quote(str(data))}"
    original = run.get("command", "")
    out = [f"<p>To repeat this run (the recipe as it ran, every override included):</p><pre>{escape(cmd, quote=False)}</pre>"]
    if original:
        out.append(f"<p>The command that made it:</p><pre>{escape(original, quote=False)}</pre>")
    recipe = folder / names.RECIPE
    if recipe.is_file():
        out.append(f"<details><summary>recipe.json</summary><pre>{escape(recipe.read_text(), quote=False)}</pre></details>")
    return "\n".join(out)


def run_html(folder: Path) -> str:
    report = _read_json(folder / names.REPORT)
    if report is None:
        raise RunError(f"{folder} has no readable report.json: the run did not finish. Finish or resume it "
                       "(`tuneflow finetune ... --resume`), then write its report.")
    title = f"tuneflow run: {report.get('recipe')}"
    head = (f"<h1>{escape(title)}</h1><p class='sub'>{escape(str(report.get('backbone')))} · "
            f"{len(report.get('classes') or [])} classes ({escape(', '.join(map(str, report.get('classes') or [])))}) · "
            f"data {escape(str(report.get('data')))} · {escape(str(folder.resolve()))}</p>")
    body = [head]
    if report.get("folds"):
        accs = report.get("fold_val_accuracy") or []
        body.append(f'<div class="verdict mid"><b>{report["folds"]}-fold cross-validation</b>: val accuracy '
                    f'{report["fold_mean_val_accuracy"]:.4f} ± {report["val_accuracy_std"]:.4f} (majority-class rate '
                    f'{_fmt(report.get("fold_mean_majority_rate"))}). {escape(report.get("final_model_note", ""))}</div>')
        cols = []
        for i, a in enumerate(accs, 1):
            sub = folder / f"fold-{i}"
            fr = _read_json(sub / names.REPORT) or {}
            cols.append(f"<div><h3>fold {i}: val accuracy {a:.4f}"
                        f"{' (the model)' if report.get('final_model') == f'fold-{i}' else ''}</h3>"
                        f"<p class=sub>majority rate {_fmt(fr.get('majority_rate'))}, verdict "
                        f"{escape(str(fr.get('verdict', '')))}</p>"
                        + _img(sub / names.CURVES, f"fold {i} curves") + _img(sub / names.CONFUSION, f"fold {i} confusion")
                        + "</div>")
        body += ["<h2>Folds side by side</h2>", f'<div class="row">{"".join(cols)}</div>',
                 f"<h2>The run's model ({escape(str(report.get('final_model')))})</h2>"]
    body += [_run_sections(folder, report), "<h2>Recipe and command</h2>", _repeat(folder, report)]
    return _page(title, "\n".join(body))


def search_html(folder: Path) -> str:
    try:
        with open(folder / "trials.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise RunError(f"{folder}/trials.csv is unreadable ({exc}); run the search first.") from None

    def acc(r):
        try:
            return float(r["val_accuracy"])
        except (KeyError, ValueError):
            return -1.0
    rows.sort(key=lambda r: -acc(r))
    header = list(rows[0].keys()) if rows else ["number", "state", "val_accuracy"]
    best = folder / "best_recipe.json"
    done = sum(r.get("state") == "COMPLETE" for r in rows)
    body = [f"<h1>tuneflow search</h1><p class='sub'>{escape(str(folder.resolve()))} · {len(rows)} trials, "
            f"{done} complete</p>"]
    try:
        auto = json.loads((folder / names.SEARCH_SUGGESTION).read_text())
        body.append(f"<p>auto: {escape(str(auto['recipe']))} with backbone {escape(str(auto['backbone']))} "
                    f"({escape(str(auto['reason']))})</p>")
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a search of a named recipe
    if rows and acc(rows[0]) >= 0:
        body.append(f'<div class="verdict good">Best trial {escape(rows[0].get("number", ""))}: val accuracy '
                    f'{acc(rows[0]):.4f} ({escape(rows[0].get("run", ""))}). Train it on all the data with '
                    f'<code>tuneflow finetune {escape(shlex.quote(str(best)))} --data DATA</code>.</div>')
    body += ["<h2>Search plot</h2>", _img(folder / "search.png", "search history"),
             "<h2>Trials (best first)</h2>", _table(header, [[escape(r.get(k, "")) for k in header] for r in rows])]
    if best.is_file():
        body += ["<h2>Best recipe</h2>", f"<pre>{escape(best.read_text(), quote=False)}</pre>"]
    return _page("tuneflow search", "\n".join(body))


def is_search(folder: Path) -> bool:
    return (folder / "trials.csv").is_file() and not (folder / names.REPORT).is_file()


def write_report_html(folder) -> Path:
    """Write ``report.html`` into a run, k-fold run or search folder -> its path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"{folder} is not a folder; give a run folder (tuneflow finetune) or a search folder.")
    text = search_html(folder) if is_search(folder) else run_html(folder)
    return atomic_write(folder / HTML_FILE, text)


def write_html(run) -> None:
    """``report.html`` of a run being finished (a :class:`~tuneflow.runs.folder.RunDir`, whose marker
    lists the file); a page that cannot be written is a warning, never a failed run."""
    try:
        run.write_text(HTML_FILE, run_html(run.path))
    except Exception as exc:  # noqa: BLE001 - the run's results are already written
        log.warning("%s not written: %s", HTML_FILE, exc)


def can_open_browser() -> bool:
    """Whether a graphical browser can show a page here: macOS and Windows always; elsewhere when
    a display is set (on a headless machine :mod:`webbrowser` would pick a text browser that takes
    over the terminal)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cli_report(args) -> int:
    """``tuneflow report RUN [--open]``."""
    path = write_report_html(args.run)
    print(path)
    if args.open:
        opened = False
        if can_open_browser():
            try:
                opened = webbrowser.open(path.resolve().as_uri())
            except webbrowser.Error:
                opened = False
        if not opened:
            print(f"tuneflow: no browser to open here; open {path} on a machine with one.", file=sys.stderr)
    return 0
