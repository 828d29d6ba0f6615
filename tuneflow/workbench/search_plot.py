"""``search.png``: each searched parameter against the trials' scores."""
from __future__ import annotations

import math
from pathlib import Path

from .space import finite, short_value



def plot_search(rows, spaces, path: Path) -> Path:
    """search.png: the optimisation history (each trial's val accuracy, best so far) and one
    scatter of val accuracy against each parameter (log axis for log ranges)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = search_figure(rows, spaces)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def search_figure(rows, spaces):
    """The figure of :func:`plot_search`. Log axes show the searched range, labelled at decades in a
    compact form ("2e-4") with no minor labels (matplotlib's labels 2..9 x 10^k on short ranges,
    which overlap); below 1.5 decades also at 2 and 5 x 10^k, below half a decade at every 1..9 x 10^k.
    Categorical values sit at their index, in the space's order."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    def acc(t):
        if t.state.name == "COMPLETE":
            return t.value
        v = t.user_attrs.get("val_accuracy")
        return v if finite(v) else None

    params = sorted({k for _, t in rows for k in t.params})
    n = 1 + len(params)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    flat = axes.ravel()
    ax = flat[0]
    best, xs_best, ys_best, boundaries = -math.inf, [], [], []
    styles = {"COMPLETE": dict(c="tab:blue", marker="o", label="complete"),
              "PRUNED": dict(c="tab:gray", marker="x", label="pruned (best epoch)"),
              "FAIL": dict(c="tab:red", marker="v", label="failed")}
    seen = set()
    for i, (r, t) in enumerate(rows):
        if i and r != rows[i - 1][0]:
            boundaries.append(i - 0.5)
        y = acc(t)
        if y is None:
            continue
        st = styles[t.state.name]
        ax.scatter([i], [y], c=st["c"], marker=st["marker"], s=22,
                   label=None if t.state.name in seen else st["label"])
        seen.add(t.state.name)
        if t.state.name == "COMPLETE" and y > best:
            best = y
        if best > -math.inf:
            xs_best.append(i)
            ys_best.append(best)
    ax.step(xs_best, ys_best, where="post", c="tab:green", label="best so far")
    for b in boundaries:
        ax.axvline(b, ls=":", c="k", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    ax.set(title="optimisation history" + (" (dotted: narrowed rounds)" if boundaries else ""),
           xlabel="trial (rounds in order, then trial number)", ylabel="val accuracy")
    ax.legend(fontsize=7)
    for j, p in enumerate(params, start=1):
        ax = flat[j]
        spec = next((s[p] for s in spaces if p in s), {})
        choices = list(spec.get("choices", [])) if spec.get("type") == "categorical" else None
        if choices is not None:  # values a trial used that the space no longer lists go last
            choices += sorted({t.params[p] for _, t in rows if p in t.params} - set(choices), key=str)
        for name in ("COMPLETE", "PRUNED"):
            pts = [(t.params[p], acc(t)) for _, t in rows if t.state.name == name and p in t.params
                   and acc(t) is not None]
            if pts:
                xs = [choices.index(x) for x, _ in pts] if choices is not None else [x for x, _ in pts]
                ax.scatter(xs, [y for _, y in pts], c=styles[name]["c"], marker=styles[name]["marker"], s=22)
        if choices is not None:
            ax.set_xticks(range(len(choices)), [short_value(c) for c in choices])
            ax.set_xlim(-0.5, len(choices) - 0.5)
        elif spec.get("log"):
            ax.set_xscale("log")
            lo, hi = spec["low"], spec["high"]
            pad = (hi / lo) ** 0.04  # 4% of the searched range each side, so end points are not cut
            ax.set_xlim(lo / pad, hi * pad)
            decades = math.log10(hi / lo)  # more ticks per decade where there are few decades
            subs = (1.0,) if decades >= 1.5 else (1.0, 2.0, 5.0) if decades >= 0.5 else tuple(range(1, 10))
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
            ax.xaxis.set_major_formatter(FuncFormatter(_log_tick))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        ax.set(xlabel=p, ylabel="val accuracy")
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _log_tick(v, _pos=None) -> str:
    """A log axis label: "2e-4" for 2 x 10^-4, plain digits from 0.01 to 1000."""
    if v <= 0:
        return ""
    if 1e-2 <= v < 1e3:
        return f"{v:g}"
    mantissa, exp = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exp)}"
