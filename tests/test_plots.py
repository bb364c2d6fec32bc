"""The comparison plots, from synthetic rows (no model): what they draw and that the PNG is whole."""

import math

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from simba_cli.report import plots

MODELS = {"zoo-s": (1.0e9, 0.36), "zoo-m": (2.2e9, 0.43), "zoo-l": (4.8e9, 0.51)}
CRITERIA = ["simba", "recent", "random", "uniform", "dt-norm", "output-norm", "simba-abs", "simba-gated",
            "simba-window"]
MEAN_KEEP = {0.3: 0.62, 0.1: 0.51}


def _value(metric, acc, drop):
    if metric == "perplexity":
        return 60 / (acc - 0.2) * (1 + drop)
    if metric == "loglik_per_token":
        return -3.5 + 2 * acc - drop
    return acc - drop * 0.5


def compare_rows(criteria=CRITERIA, tasks=(("simba_choice", "acc_norm"), ("simba_cloze", "loglik_per_token"),
                                           ("lambada_openai", "perplexity")), stderr=True, matched=True,
                 keeps=MEAN_KEEP):
    """Rows shaped like the compare command's: dense, every criterion at two keeps, and FLOPs-matched points."""
    rng = np.random.default_rng(0)
    rows = []
    for task, metric in tasks:
        for i, (model, (flops, acc)) in enumerate(MODELS.items()):
            def row(setting, criterion, final_keep, mean_keep, drop, f, match=None, model=model, task=task,
                    metric=metric, acc=acc):
                v = _value(metric, acc, drop)
                se = abs(v) * 0.03 if stderr else None
                return {"model": model, "setting": setting, "criterion": criterion, "final_keep": final_keep,
                        "task": task, "metric": metric, metric: v, f"{metric}_stderr": se, "flops_per_doc": f,
                        "mean_keep": mean_keep, "matched": match}

            rows.append(row("dense", "-", 1.0, 1.0, 0.0, flops))
            for k, mk in keeps.items():
                for j, c in enumerate(criteria):
                    drop = (0.02 if c == "simba" else 0.05 + 0.01 * j) * (1 - mk) * 3 + rng.uniform(0, 0.01)
                    rows.append(row(f"{c} {k:g}", c, k, mk, drop, flops * (0.2 + 0.8 * mk)))
            if matched and i > 0:
                smaller = list(MODELS)[i - 1]
                f = MODELS[smaller][0] * 1.02
                mk = (f / flops - 0.2) / 0.8
                for c in criteria[:2]:
                    rows.append(row(f"{c} @{smaller}", c, round(mk * 0.5, 4), mk, 0.12, f, smaller))
    return rows


def ppl_rows(windows=16):
    rng = np.random.default_rng(1)
    rows = []
    for model, (_, acc) in MODELS.items():
        for setting in ("dense", "simba 0.1", "recent 0.1", "simba-window 0.1"):
            for ctx in (128, 256, 512, 1024):
                base = 4.2 - 2 * acc - 0.1 * math.log2(ctx / 128) + (0 if setting == "dense" else 0.08)
                w = list(base + rng.normal(0, 0.3, windows))
                nll = float(np.mean(w))
                rows.append({"model": model, "setting": setting, "context": ctx, "ppl": math.exp(nll), "nll": nll,
                             "window_nll": w, "mean_keep": 1.0 if setting == "dense" else 0.5})
    return rows


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, kept open for inspection."""
    seen = []
    save = plots._save

    def keep(fig, path):
        fig.canvas.draw()
        fig.test_renderer = fig.canvas.get_renderer()  # the canvas goes with plt.close
        seen.append(fig)
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return seen


def error_bars(fig) -> int:
    return sum(len(c.lines[2][0].get_segments()) for ax in fig.axes for c in ax.containers
               if isinstance(c, ErrorbarContainer))


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_criterion_is_drawn_and_named_in_the_legend(tmp_path, figures):
    rows = compare_rows()
    out = tmp_path / "flops_accuracy.png"
    drawn = plots.plot_flops_accuracy(rows, out)
    assert is_png(out) and [p.name for p in tmp_path.iterdir()] == ["flops_accuracy.png"]
    assert drawn["criteria"] == CRITERIA  # simba-window is not one the plots know: drawn all the same
    (fig,) = figures
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert drawn["legend"] == [x for x in labels if x]
    for c in CRITERIA + list(MODELS) + ["dense models"]:
        assert c in labels
    assert drawn["points"] == len(rows) and drawn["skipped"] == []
    # Every criterion has its own marker and line style, simba's drawn larger than the others.
    styles = plots.criterion_styles(CRITERIA)
    assert len(set(styles.values())) == len(CRITERIA)
    handles = dict(zip(labels, legend.legend_handles))
    assert handles["simba"].get_markersize() > handles["simba-window"].get_markersize()
    assert handles["simba-window"].get_marker() not in {handles[c].get_marker() for c in CRITERIA[:-1]}


def test_error_bars_where_a_stderr_is_given(tmp_path, figures):
    rows = compare_rows()
    drawn = plots.plot_flops_accuracy(rows, tmp_path / "a.png")
    assert drawn["errorbars"] == len(rows) == error_bars(figures[-1])
    for r in rows[::3]:
        r[f"{r['metric']}_stderr"] = None
    for r in rows[1::3]:
        del r[f"{r['metric']}_stderr"]
    drawn = plots.plot_flops_accuracy(rows, tmp_path / "b.png")
    assert drawn["errorbars"] == len(rows[2::3]) == error_bars(figures[-1])
    drawn = plots.plot_flops_accuracy(compare_rows(stderr=False), tmp_path / "c.png")
    assert drawn["errorbars"] == 0 == error_bars(figures[-1])
    assert "±1 standard error" not in drawn["legend"]


def test_keep_ratios_matched_points_and_axes(tmp_path, figures):
    rows = compare_rows()
    drawn = plots.plot_flops_accuracy(rows, tmp_path / "f.png")
    fig = figures[-1]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    by_task = {ax.get_title(): ax for ax in axes}
    assert list(by_task) == ["simba_choice", "simba_cloze", "lambada_openai"]
    # The measured mean keep of every pruned point is written on the panel.
    for task, ax in by_task.items():
        texts = {t.get_text() for t in ax.texts}
        keeps = {f"{r['mean_keep']:.2f}" for r in rows if r["task"] == task and r["criterion"] != "-"}
        assert keeps <= texts and set(MODELS) <= texts
    assert drawn["matched"] == sum(1 for r in rows if r["matched"])
    # Lower is better: a log y axis and a label that says so; higher is better otherwise.
    assert by_task["lambada_openai"].get_yscale() == "log" and drawn["yscale"]["lambada_openai"] == "log"
    assert "lower is better" in by_task["lambada_openai"].get_ylabel()
    assert by_task["simba_choice"].get_yscale() == "linear"
    assert "higher is better" in by_task["simba_choice"].get_ylabel()
    assert "acc_norm" in by_task["simba_choice"].get_ylabel()
    assert "log-likelihood per token" in by_task["simba_cloze"].get_ylabel()
    renderer = fig.test_renderer
    for ax in axes:
        assert ax.get_xscale() == "log"
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
            assert len(boxes) >= 2
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    # The legend sits outside every panel.
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in axes)


def test_keep_ratios_of_close_columns_do_not_print_over_each_other(tmp_path, figures):
    rows = compare_rows(criteria=["simba", "recent"], keeps={0.3: 0.62, 0.2: 0.58, 0.1: 0.55})
    drawn = plots.plot_flops_accuracy(rows, tmp_path / "k.png")
    fig = figures[-1]
    for ax in fig.axes:
        keeps = [t.get_window_extent(fig.test_renderer) for t in ax.texts if t.get_text()[:2] == "0."]
        assert len(keeps) == drawn["keep_labels"] / len(fig.axes)
        assert not any(a.overlaps(b) for i, a in enumerate(keeps) for b in keeps[i + 1:])


def test_nice_log_ticks_are_few_and_round():
    for lo, hi in [(3e8, 6e9), (1.1e9, 1.9e9), (2e7, 8e11), (15, 400), (0.9e9, 1.05e9)]:
        ticks = plots.nice_log_ticks(lo, hi)
        assert 2 <= len(ticks) <= 7, (lo, hi, ticks)
        assert all(lo <= t <= hi for t in ticks) and ticks == sorted(ticks)
    assert [plots._sci(v) for v in (1e9, 2e9, 2.5e10)] == ["1e9", "2e9", "2.5e10"]


def test_rows_without_a_value_are_skipped_not_fatal(tmp_path):
    rows = compare_rows(criteria=["simba"], tasks=(("simba_choice", "acc"),), matched=False)
    rows[1]["acc"] = None
    rows[2]["acc"] = float("nan")
    drawn = plots.plot_flops_accuracy(rows, tmp_path / "x.png")
    assert len(drawn["skipped"]) == 2 and drawn["points"] == len(rows) - 2
    assert is_png(tmp_path / "x.png")


def test_a_criterion_without_a_number_stays_in_the_legend(tmp_path, figures):
    rows = compare_rows()
    for r in rows:
        if r["criterion"] == "recent":
            r[r["metric"]] = None
    drawn = plots.plot_flops_accuracy(rows, tmp_path / "n.png")
    assert "recent" not in drawn["criteria"] and drawn["no_data"] == ["recent"]
    assert "recent (no data)" in [t.get_text() for t in figures[-1].legends[0].get_texts()]


def test_ppl_context_error_bars_from_the_windows(tmp_path, figures):
    rows = ppl_rows()
    out = tmp_path / "ppl_context.png"
    drawn = plots.plot_ppl_context(rows, out)
    assert is_png(out) and [p.name for p in tmp_path.iterdir()] == ["ppl_context.png"]
    assert drawn["errorbars"] == len(rows) == error_bars(figures[-1])
    assert set(drawn["settings"]) <= set(drawn["legend"]) and set(MODELS) <= set(drawn["legend"])
    assert len(drawn["series"]) == len(MODELS) * 4
    # The bar is exp(nll ± se) with se the standard error of the mean window NLL.
    r = rows[0]
    se = np.std(r["window_nll"], ddof=1) / math.sqrt(len(r["window_nll"]))
    assert plots.ppl_interval(r["nll"], r["window_nll"]) == pytest.approx((math.exp(r["nll"] - se),
                                                                           math.exp(r["nll"] + se)))
    (ax,) = figures[-1].axes
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    lows = sorted(seg[0][1] for c in bars for seg in c.lines[2][0].get_segments())
    expect = sorted(plots.ppl_interval(r["nll"], r["window_nll"])[0] for r in rows)
    assert lows == pytest.approx(expect)
    # A single window has no standard error: no bar, still a point.
    for r in rows[:5]:
        r["window_nll"] = r["window_nll"][:1]
    assert plots.plot_ppl_context(rows, out)["errorbars"] == len(rows) - 5
    renderer = figures[-1].test_renderer
    (legend,) = figures[-1].legends
    assert not legend.get_window_extent(renderer).overlaps(figures[-1].axes[0].get_window_extent(renderer))


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "flops_accuracy.png"
    out.write_bytes(b"old")

    def broken(self, path, **kw):
        open(path, "wb").write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError):
        plots.plot_flops_accuracy(compare_rows(criteria=["simba"]), out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["flops_accuracy.png"]


def test_passkey_heat_maps_say_how_many_documents_each_cell_holds(tmp_path, figures):
    cells = ((256, 0.0, 1.0, 1), (256, 1.0, 0.5, 2), (512, 0.0, 0.0, 3))
    rows = [{"task": "simba_passkey_exact", "setting": s, "length": n, "depth": d, "acc": a, "docs": k}
            for s in ("dense", "simba 0.1") for n, d, a, k in cells]
    plots.plot_passkey_heatmaps(rows, tmp_path / "p.png")
    assert is_png(tmp_path / "p.png")
    texts = [t.get_text() for ax in figures[-1].axes for t in ax.texts]
    assert texts.count("1.00\nn=1") == 2 and texts.count("0.50\nn=2") == 2 and texts.count("0.00\nn=3") == 2
    assert len(texts) == 6  # the empty cell (512 tokens, depth 1) has no text: not a 0


def test_training_plot_names_what_each_curve_measures(tmp_path, figures):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 3.0, "answer_loss": 3.0}\n{"step": 2, "loss": 9.0, "answer_loss": 2.5}\n'
                   '{"step": 2, "val_loss": 5.0}\n')
    plots.plot_training(log, tmp_path / "loss.png")
    labels = [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    assert labels == ["training objective (recall mix: see the recipe)", "recall answers' loss (train)",
                      "held-out cross-entropy, every token"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"step": 1, "loss": 3.0}\n{"step": 1, "val_loss": 3.2}\n')
    plots.plot_training(plain, tmp_path / "plain.png")
    assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == \
        ["train loss", "held-out cross-entropy, every token"]
