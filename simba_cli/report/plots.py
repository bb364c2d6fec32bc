"""Plots (PNG, matplotlib, no display needed).

The comparison plots return a small dict of what they drew (criteria, error bars, legend labels, ...)
besides writing the PNG, so that what a reader sees can be checked without looking at pixels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter  # noqa: E402

# Metrics read as "lower is better" (drawn on a log y axis).
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}

METRIC_NAMES = {"acc": "accuracy", "acc_norm": "length-normalised accuracy",
                "loglik_per_token": "log-likelihood per token (nats)", "perplexity": "perplexity",
                "word_perplexity": "word perplexity", "byte_perplexity": "byte perplexity",
                "bits_per_byte": "bits per byte", "exact_match": "exact match", "f1": "F1", "mcc": "MCC"}

# Fixed looks for the criteria the project knows; any other name gets the next style of _CYCLE.
# Colour is the model's, so criteria differ by marker and line style; simba is drawn filled and larger.
_STYLES = {"simba": ("o", "-"), "recent": ("s", ":"), "random": ("X", "--"), "uniform": ("D", "-."),
           "dt-norm": ("^", (0, (5, 1))), "output-norm": ("v", (0, (3, 1, 1, 1, 1, 1))),
           "simba-abs": ("P", (0, (1, 1))), "simba-gated": ("*", (0, (5, 2, 1, 2)))}
_CYCLE_MARKERS = ["<", ">", "p", "h", "d", "8", "H"]
_CYCLE_LINES = ["-.", (0, (4, 2)), (0, (2, 2)), (0, (6, 1, 1, 1)), (0, (1, 2, 4, 2))]


def _save(fig, path: Path):
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def plot_training(log_path: Path, out_path: Path, title: str = ""):
    """The training objective and the held-out loss against step, from a train_log.jsonl; with a recall mix also
    the recall answers' own loss. The objective is what the optimiser minimised: with a recall mix, the answers'
    loss alone during the lead, then the other tokens' mean plus answer_loss times the answers' (so it is not
    comparable with the held-out cross-entropy, and is labelled so)."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    answers = [(r["step"], r["answer_loss"]) for r in rows if _num(r.get("answer_loss")) is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        label = "training objective (recall mix: see the recipe)" if answers else "train loss"
        ax.plot(*zip(*train), label=label, alpha=0.7)
    if answers:
        ax.plot(*zip(*answers), label="recall answers' loss (train)", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out cross-entropy, every token")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out_path)


# ---------------------------------------------------------------------------------------------- helpers


def _num(v) -> float | None:
    """A finite float, or None (missing, NaN, inf or not a number)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def criterion_styles(criteria: list[str]) -> dict[str, tuple]:
    """(marker, line style) per criterion: the fixed ones, then a cycle for names not known here."""
    out, k = {}, 0
    for c in criteria:
        if c in _STYLES:
            out[c] = _STYLES[c]
        else:
            out[c] = (_CYCLE_MARKERS[k % len(_CYCLE_MARKERS)], _CYCLE_LINES[k % len(_CYCLE_LINES)])
            k += 1
    return out


def metric_label(metric: str) -> str:
    """What the y axis shows, and which way is better."""
    name = METRIC_NAMES.get(metric, metric)
    head = name if name == metric else f"{name} [{metric}]"
    return head + ("\nlower is better (log scale)" if metric in LOWER_IS_BETTER else "\nhigher is better")


def _model_colors(models: list[str]) -> dict:
    return {m: plt.cm.viridis(i / max(1, len(models) - 1) * 0.85) for i, m in enumerate(models)}


def _is_dense(r: dict) -> bool:
    return r.get("setting") == "dense" or r.get("criterion") in (None, "-")


def _matched(r: dict) -> str | None:
    """The smaller model whose FLOPs this pruned point was matched to, if any."""
    if r.get("matched"):
        return str(r["matched"])
    setting = str(r.get("setting", ""))
    if "@" not in setting:
        return None
    return setting.split("@", 1)[1].strip() or None


def nice_log_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """A few round values (1, 2, 5 x 10^k and the like) between lo and hi > 0, at least two where the
    range allows, never more than `most`."""
    if not (lo > 0 and hi > lo):
        return [lo] if lo > 0 else []
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    best = []
    for mantissas in [(1,), (1, 3), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8),
                      tuple(1 + i / 10 for i in range(90))]:
        ticks = [round(m * 10.0**e, 12 - e) for e in range(first - 1, last + 1) for m in mantissas]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) > most:
            step = math.ceil(len(ticks) / most)
            ticks = ticks[::step]
        if len(ticks) >= 3:
            return ticks
        best = ticks if len(ticks) > len(best) else best
    return best


def _sci(v: float, _pos=None) -> str:
    """1e9, 2e9, 2.5e9: short and unambiguous FLOPs."""
    if v <= 0:
        return ""
    e = math.floor(math.log10(v) + 1e-9)
    m = round(v / 10.0**e, 3)
    return f"{m:g}e{e}"


def _plain(v: float, _pos=None) -> str:
    return f"{v:.4g}"


def _log_axis(axis, lo: float, hi: float, fmt):
    axis.set_major_locator(FixedLocator(nice_log_ticks(lo, hi)))
    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())


def _yerr(y: float, se: float, log: bool) -> tuple[float, float]:
    """(down, up) of a ±se bar; on a log axis the lower end stays above zero."""
    return (min(se, y * 0.999) if log else se), se


def _bars(ax, xs, ys, ses, color, log: bool, zorder: int) -> int:
    """±se bars at the points whose se is known; how many."""
    have = [(x, y, se) for x, y, se in zip(xs, ys, ses) if se is not None]
    if have:
        down, up = zip(*(_yerr(y, se, log) for _, y, se in have))
        ax.errorbar([h[0] for h in have], [h[1] for h in have], yerr=[down, up], fmt="none", ecolor=color,
                    elinewidth=0.9, capsize=2.5, alpha=0.8, zorder=zorder)
    return len(have)


def _pad(ax, right: float = 0.0, top: float = 0.0):
    """Widen the view by a fraction of its (log or linear) span to the right and at the top."""
    for get, set_, scale, frac in ((ax.get_xlim, ax.set_xlim, ax.get_xscale(), right),
                                   (ax.get_ylim, ax.set_ylim, ax.get_yscale(), top)):
        lo, hi = get()
        if scale == "log":
            set_(lo, hi * (hi / lo) ** frac)
        else:
            set_(lo, hi + (hi - lo) * frac)


def _place_labels(ax, labels: list[tuple], fontsize: float = 7, step: float = 9.0):
    """Small labels (x, y, text, colour) centred above their points; one that would run into a label
    already placed goes up a step, so that neighbouring columns never print over each other."""
    to_pt = 72 / ax.figure.dpi
    placed = []  # (left, right, bottom, top) in points
    for x, y, text, color in sorted(labels, key=lambda a: (a[0], a[1])):
        px, py = (v * to_pt for v in ax.transData.transform((x, y)))
        half = 0.62 * fontsize * len(text) / 2 + 2
        for level in range(8):
            bottom = py + 5 + level * step
            box = (px - half, px + half, bottom, bottom + fontsize + 2)
            if not any(b[0] < box[1] and box[0] < b[1] and b[2] < box[3] and box[2] < b[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(0, 5 + level * step), ha="center",
                    va="bottom", fontsize=fontsize, color=color, zorder=7,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))


def _handle(color, marker=None, ls="-", lw=1.2, ms=6, mfc=None, mec=None, alpha=1.0):
    return Line2D([], [], color=color, marker=marker, ls=ls, lw=lw, ms=ms, mfc=mfc or color, mec=mec or color,
                  alpha=alpha)


def _column_legend(fig, sections: list[list[tuple]], title: str, **kw):
    """One legend whose columns are the sections (models, criteria, notes), padded with blank rows."""
    sections = [s for s in sections if s]
    height = max(len(s) for s in sections)
    blank = Line2D([], [], ls="none", marker=None)
    handles, labels = [], []
    for s in sections:
        handles += [h for h, _ in s] + [blank] * (height - len(s))
        labels += [lab for _, lab in s] + [""] * (height - len(s))
    return fig.legend(handles, labels, ncol=len(sections), title=title, fontsize=8, title_fontsize=8,
                      frameon=False, **kw)


def _legend_labels(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts() if t.get_text()]


# ------------------------------------------------------------------------------------ FLOPs vs accuracy


def plot_flops_accuracy(rows: list[dict], out_path: Path) -> dict:
    """One panel per task: the dense models' curve (thick black) and, per model, a thin line from its
    dense point through its pruned points of each criterion, against measured FLOPs per document.
    Bars: ±1 standard error where the row has `<metric>_stderr`. The number beside pruned points is
    the measured mean keep ratio (the final keep where none was measured, marked with *).

    Returns {"path", "tasks", "models", "criteria" (drawn, pruned only), "points", "errorbars",
    "keep_labels", "matched", "yscale" ({task: "log"|"linear"}), "legend" (its labels), "skipped"
    ([(model, setting, task)] rows without a finite value or FLOPs)}."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    criteria = list(dict.fromkeys(r["criterion"] for r in rows if not _is_dense(r)))
    colors = _model_colors(models)
    styles = criterion_styles(criteria)
    drawn = {"path": str(out_path), "tasks": tasks, "models": models, "criteria": [], "points": 0,
             "errorbars": 0, "keep_labels": 0, "matched": 0, "yscale": {}, "legend": [], "skipped": []}
    ncols = 2 if len(tasks) == 4 else max(1, min(3, len(tasks)))
    nrows = max(1, math.ceil(len(tasks) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 4.4 * nrows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    used, any_final_keep, pending = [], False, []
    for ax, task in zip(axes.flat, tasks):
        mine = [r for r in rows if r["task"] == task]
        metric = next((r["metric"] for r in mine if r.get("metric")), "acc")
        log_y = metric in LOWER_IS_BETTER
        pts = []  # (row, x, y, se)
        for r in mine:
            x, y = _num(r.get("flops_per_doc")), _num(r.get(metric))
            if x is None or x <= 0 or y is None or (log_y and y <= 0):
                drawn["skipped"].append((r["model"], r["setting"], task))
                continue
            se = _num(r.get(f"{metric}_stderr"))
            pts.append((r, x, y, se if se is not None and se > 0 else None))
        dense = {r["model"]: (x, y, se) for r, x, y, se in pts if _is_dense(r)}

        curve = sorted(dense.values())
        if curve:
            xs, ys, ses = zip(*curve)
            ax.plot(xs, ys, "-", color="black", lw=2.4, zorder=4)
            ax.plot(xs, ys, "o", color="black", ms=6, zorder=6)
            drawn["errorbars"] += _bars(ax, xs, ys, ses, "black", log_y, 5)
            drawn["points"] += len(curve)
            for m, (x, y, _se) in dense.items():
                # The side away from the dense curve (it rises to the right, or falls where lower is better).
                ax.annotate(m, (x, y), textcoords="offset points", xytext=(7, 6 if log_y else -7), ha="left",
                            va="bottom" if log_y else "top", fontsize=8, color="black", zorder=7,
                            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
        keep_groups: dict[tuple, list] = {}
        for m in models:
            for crit in criteria:
                cpts = sorted(((r, x, y, se) for r, x, y, se in pts
                               if r["model"] == m and r["criterion"] == crit and not _is_dense(r)),
                              key=lambda p: -p[1])
                if not cpts:
                    continue
                if crit not in used:
                    used.append(crit)
                marker, ls = styles[crit]
                main = crit == "simba"
                path = ([dense[m][:2]] if m in dense else []) + [(x, y) for _, x, y, _ in cpts]
                ax.plot(*zip(*path), ls=ls, color=colors[m], lw=1.5 if main else 0.9, alpha=1 if main else 0.7,
                        zorder=3 if main else 2)
                xs, ys = [p[1] for p in cpts], [p[2] for p in cpts]
                ax.plot(xs, ys, ls="none", marker=marker, ms=8 if main else 6, color=colors[m],
                        mfc=colors[m] if main else "white", mec=colors[m], mew=1.3,
                        zorder=6 if main else 5)
                drawn["errorbars"] += _bars(ax, xs, ys, [p[3] for p in cpts], colors[m], log_y, 4)
                drawn["points"] += len(cpts)
                for r, x, y, se in cpts:
                    if _matched(r):
                        ax.plot([x], [y], ls="none", marker="o", ms=15, mfc="none", mec="black", mew=1.0,
                                zorder=6)
                        drawn["matched"] += 1
                    keep = _num(r.get("mean_keep"))
                    text = f"{keep:.2f}" if keep is not None else None
                    if text is None and _num(r.get("final_keep")) is not None:
                        text, any_final_keep = f"{_num(r['final_keep']):.2f}*", True
                    if text is not None:
                        top = y + (se or 0.0)
                        keep_groups.setdefault((m, text), []).append((x, top))
        # Criteria at the same keep sit at (nearly) the same FLOPs: one label above each such column.
        labels = []
        for (m, text), where in keep_groups.items():
            x = math.exp(sum(math.log(w[0]) for w in where) / len(where))
            labels.append((x, max(w[1] for w in where), text, colors[m]))
        pending.append((ax, labels))
        drawn["keep_labels"] += len(labels)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        drawn["yscale"][task] = "log" if log_y else "linear"
        ax.margins(x=0.1, y=0.12)
        ax.autoscale_view()
        _pad(ax, right=0.06, top=0.08)  # room for the model names right of the last dense point, and the keeps
        _log_axis(ax.xaxis, *ax.get_xlim(), _sci)
        if log_y:
            _log_axis(ax.yaxis, *ax.get_ylim(), _plain)
        ax.tick_params(axis="x", labelsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("measured FLOPs per document (log scale)", fontsize=9)
        ax.set_ylabel(metric_label(metric), fontsize=9)
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3, which="major")
        ax.grid(alpha=0.1, which="minor")
    drawn["criteria"] = used
    fig.suptitle("Dense vs pruned Mamba: task metric against measured FLOPs", fontsize=11)
    fig.tight_layout()
    for ax, labels in pending:
        _place_labels(ax, labels)
    sections = [[(_handle("black", "o", lw=2.4), "dense models")]
                + [(_handle(colors[m], lw=2.5), m) for m in models],
                [(_handle("0.3", styles[c][0], styles[c][1], lw=1.5 if c == "simba" else 0.9,
                          ms=8 if c == "simba" else 6, mfc=None if c == "simba" else "white"),
                  c if c in used else f"{c} (no data)") for c in criteria]]  # a criterion of the run is never
    drawn["no_data"] = [c for c in criteria if c not in used]  # left out silently
    notes = []
    if drawn["matched"]:
        notes.append((_handle("black", "o", ls="none", ms=13, mfc="none"),
                      "ringed: pruned to a\nsmaller model's FLOPs"))
    if drawn["errorbars"]:
        notes.append((Line2D([], [], color="0.3", marker="|", ls="-", lw=0.9, ms=8), "±1 standard error"))
    sections.append(notes)
    title = ("colour: model · marker and line: pruning criterion (thin lines start at the model's dense point)\n"
             "number above pruned points: measured mean keep ratio"
             + (" (* final keep, not measured)" if any_final_keep else ""))
    legend = _column_legend(fig, sections, title, loc="upper center", bbox_to_anchor=(0.5, 0.0))
    drawn["legend"] = _legend_labels(legend)
    _save(fig, out_path)
    return drawn


# ------------------------------------------------------------------------------ perplexity vs context


def ppl_interval(nll: float, window_nll: list[float] | None) -> tuple[float, float] | None:
    """exp(nll ± se), se = the standard error of the mean NLL over the windows; None under two windows."""
    vals = [v for v in (window_nll or []) if _num(v) is not None]
    n = len(vals)
    if n < 2:
        return None
    mean = sum(vals) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n)
    return math.exp(nll - se), math.exp(nll + se)


def plot_ppl_context(rows: list[dict], out_path: Path) -> dict:
    """Perplexity of the scored tokens against context length, per model (colour) and setting (line).
    Bars: exp(nll ± se) with se the standard error of the mean NLL over the windows.

    Returns {"path", "models", "settings", "series" (["model setting"] drawn), "errorbars", "legend"}."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    colors = _model_colors(models)
    crits = [s.split()[0] for s in settings if s != "dense"]
    styles = criterion_styles(list(dict.fromkeys(crits)))
    drawn = {"path": str(out_path), "models": models, "settings": settings, "series": [], "errorbars": 0,
             "legend": []}
    fig, ax = plt.subplots(figsize=(7, 4.6))
    n_series = max(1, len(settings))
    contexts = sorted({r["context"] for r in rows})
    for m in models:
        for j, s in enumerate(settings):
            mine = sorted((r for r in rows if r["model"] == m and r["setting"] == s), key=lambda r: r["context"])
            pts = []
            for r in mine:
                ppl = _num(r.get("ppl"))
                nll = _num(r.get("nll"))
                if ppl is None and nll is not None:
                    ppl = math.exp(nll)
                if ppl is None or ppl <= 0:
                    continue
                nll = nll if nll is not None else math.log(ppl)
                # Settings side by side at each context (a few % of an octave) so that bars do not overlap.
                x = r["context"] * 2 ** (0.05 * (j - (n_series - 1) / 2))
                pts.append((x, ppl, ppl_interval(nll, r.get("window_nll"))))
            if not pts:
                continue
            drawn["series"].append(f"{m} {s}")
            if s == "dense":
                kw = dict(marker="o", ls="-", lw=2.6, ms=6, mfc=colors[m], alpha=0.55)
            else:
                marker, ls = styles[s.split()[0]]
                main = s.split()[0] == "simba"
                kw = dict(marker=marker, ls=ls, lw=1.4 if main else 1.0, ms=7 if main else 6,
                          mfc=colors[m] if main else "white", alpha=1.0)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[m], mec=colors[m], mew=1.2, **kw)
            have = [p for p in pts if p[2] is not None]
            if have:
                ax.errorbar([p[0] for p in have], [p[1] for p in have],
                            yerr=[[p[1] - p[2][0] for p in have], [p[2][1] - p[1] for p in have]], fmt="none",
                            ecolor=colors[m], elinewidth=0.9, capsize=2.5, alpha=0.85)
                drawn["errorbars"] += len(have)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(contexts)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.06, y=0.1)
    ax.autoscale_view()
    _log_axis(ax.yaxis, *ax.get_ylim(), _plain)
    ax.set_xticks(contexts)
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.tick_params(labelsize=8)
    ax.set_xlabel("context length (tokens, log scale)", fontsize=9)
    ax.set_ylabel("perplexity of the scored last tokens\nlower is better (log scale)", fontsize=9)
    ax.set_title("Long-context perplexity (held-out plays)", fontsize=10)
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    set_handles = []
    for s in settings:
        if s == "dense":
            set_handles.append((_handle("0.3", "o", "-", lw=2.6, alpha=0.55), s))
        else:
            marker, ls = styles[s.split()[0]]
            main = s.split()[0] == "simba"
            set_handles.append((_handle("0.3", marker, ls, lw=1.4 if main else 1.0, ms=7 if main else 6,
                                        mfc=None if main else "white"), s))
    if drawn["errorbars"]:
        set_handles.append((Line2D([], [], color="0.3", marker="|", ls="-", lw=0.9, ms=8), "±1 s.e. over windows"))
    sections = [[(_handle(colors[m], lw=2.5), m) for m in models], set_handles]
    fig.tight_layout()
    legend = _column_legend(fig, sections, "colour: model · line: setting\n(settings nudged sideways)",
                            loc="upper left", bbox_to_anchor=(1.0, 0.95))
    drawn["legend"] = _legend_labels(legend)
    _save(fig, out_path)
    return drawn


def plot_passkey_heatmaps(rows: list[dict], out_path: Path, title: str = "") -> dict:
    """Pass-key accuracy by key depth (rows) and context length (columns): one panel per setting, one line
    of panels per task. rows: model, setting, task, length, depth, acc, docs (compare's breakdown)."""
    import numpy as np

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(len(tasks), len(settings), figsize=(2.1 * len(settings) + 1.2, 2.2 * len(tasks) + 0.6),
                             squeeze=False)
    image = None
    for i, task in enumerate(tasks):
        for j, setting in enumerate(settings):
            ax = axes[i][j]
            grid = np.full((len(depths), len(lengths)), np.nan)
            for r in rows:
                if r["task"] == task and r["setting"] == setting:
                    grid[depths.index(r["depth"]), lengths.index(r["length"])] = r.get("acc", np.nan)
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            docs = np.zeros((len(depths), len(lengths)), dtype=int)
            for r in rows:
                if r["task"] == task and r["setting"] == setting:
                    docs[depths.index(r["depth"]), lengths.index(r["length"])] = r.get("docs", 0)
            for (y, x), v in np.ndenumerate(grid):
                if not np.isnan(v):  # the value, and how many documents it rests on (often one or two)
                    ax.text(x, y, f"{v:.2f}\nn={docs[y, x]}", ha="center", va="center", fontsize=5.5,
                            color="white" if v < 0.6 else "black")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths] if j == 0 else [], fontsize=7)
            if i == 0:
                ax.set_title(setting.replace(" @", "\n@"), fontsize=8)  # matched settings: two lines
            if j == 0:
                ax.set_ylabel(f"{task}\ndepth of the key", fontsize=7)
            if i == len(tasks) - 1:
                ax.set_xlabel("context (tokens)", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle(title or "pass-key accuracy by depth and context length", fontsize=10, y=1.0 + 0.1 / len(tasks))
    _save(fig, out_path)
    return {"path": str(out_path), "tasks": tasks, "settings": settings, "lengths": lengths, "depths": depths}
