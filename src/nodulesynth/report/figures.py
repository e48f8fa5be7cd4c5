"""The report's figures, each drawn from plain arrays and tables into PNG bytes.

Figures are built on matplotlib's object API with the Agg canvas (no pyplot, no global backend state),
so they render headless and can be called from any thread or worker.
"""

import base64
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from nodulesynth.labels import colorize

ARM_COLOURS = {"A": "#444444", "B": "#d95f02", "C": "#1b9e77"}
ARM_NAMES = {"A": "A: real", "B": "B: real + SPADE", "C": "C: real + SDM",
             "P": "P: positive control (A, nodule patients withheld)",
             "N": "N: negative control (A + relabelled nodule-free slices)"}
GT_COLOUR, PRED_COLOUR = "#00dd00", "#ff2020"


def to_png(fig: Figure, dpi=110) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    """PNG bytes as a data: URI, so the HTML needs no side files."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _grey(ax, image, title=None):
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def image_grid(rows) -> bytes:
    """Rows of dicts (kind, scan_id, slice_index, ct, label, sdm, spade; fold where known): CT, lesion map,
    SDM, SPADE."""
    fig = Figure(figsize=(9, 2.4 * len(rows)))
    axes = fig.subplots(len(rows), 4, squeeze=False)
    for r, row in enumerate(rows):
        titles = ("CT", "lesion map", "SDM", "SPADE") if r == 0 else (None,) * 4
        _grey(axes[r, 0], row["ct"], titles[0])
        fold = f"\ntest patient of fold {row['fold']}" if row.get("fold") is not None else ""
        axes[r, 0].set_ylabel(f"{row['kind']}\n{row['scan_id']} #{row['slice_index']}{fold}", fontsize=8)
        axes[r, 1].imshow(colorize(row["label"]), interpolation="nearest")
        axes[r, 1].set_xticks([])
        axes[r, 1].set_yticks([])
        if titles[1]:
            axes[r, 1].set_title(titles[1], fontsize=9)
        _grey(axes[r, 2], row["sdm"], titles[2])
        _grey(axes[r, 3], row["spade"], titles[3])
    return to_png(fig)


def _box(ax, box, colour, label=None, style="-"):
    x0, y0, x1, y1 = box
    # boxes are pixel edges with x1/y1 exclusive; imshow centres pixel i at i, so edges sit at -0.5
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.3,
                           linestyle=style))
    if label:
        ax.text(x0 - 0.5, y0 - 1.0, label, color=colour, fontsize=7, va="bottom")


def localization_examples(panels, arms) -> bytes:
    """panels: one list per arm (in `arms` order) of dicts (image, gt [k,4], pred [m,5] with score, title)."""
    n = max(len(p) for p in panels)
    fig = Figure(figsize=(2.3 * n, 2.5 * len(arms)))
    axes = fig.subplots(len(arms), n, squeeze=False)
    for r, (arm, row) in enumerate(zip(arms, panels)):
        for c in range(n):
            ax = axes[r, c]
            if c >= len(row):
                ax.axis("off")
                continue
            panel = row[c]
            _grey(ax, panel["image"], panel["title"])
            for *box, score in panel["pred"]:
                _box(ax, box, PRED_COLOUR, f"{score:.2f}", style="--")
            for box in panel["gt"]:  # drawn last, so a prediction on top of a nodule does not hide it
                _box(ax, box, GT_COLOUR)
            if c == 0:
                ax.set_ylabel(ARM_NAMES.get(arm, arm), fontsize=8)
    return to_png(fig)


def froc_figure(curves, points=None) -> bytes:
    """The per-nodule FROC. curves: {arm: (FP per scan grid, mean sensitivity, sd)}; points: {arm: (rates, mean
    sensitivity)} from the metrics' froc_<rate> keys."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for arm, (fps, mean, sd) in curves.items():
        colour = ARM_COLOURS.get(arm)
        # each fold's curve is already interpolated linearly on the grid, as LUNA16 reads its operating points
        ax.plot(fps, mean, color=colour, label=ARM_NAMES.get(arm, arm))
        ax.fill_between(fps, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=colour, alpha=0.15)
    for arm, (rates, sens) in (points or {}).items():
        ax.plot(rates, sens, "o", color=ARM_COLOURS.get(arm), markersize=4,
                label=None if arm in curves else ARM_NAMES.get(arm, arm))
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.125, 8)
    rates = [0.125, 0.25, 0.5, 1, 2, 4, 8]
    ax.set_xticks(rates, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return to_png(fig)


def paired_folds(values, labels) -> bytes:
    """values: {metric: {arm: per-fold values}} (same fold order in every arm); a line per fold from A to B and
    from A to C, so each fold's change is visible, not only the means."""
    metrics = list(values)
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        by_arm = values[metric]
        a = np.asarray(by_arm["A"], float)
        for x, arm in ((1, "B"), (2, "C")):
            other = np.asarray(by_arm[arm], float)
            for k in range(len(a)):
                ax.plot([0, x], [a[k], other[k]], "-o", color=ARM_COLOURS[arm], alpha=0.6, markersize=3,
                        linewidth=1, label=f"A → {arm}" if k == 0 else None)
        if ax is axes[0]:
            ax.legend(fontsize=7)
        ax.set_xticks([0, 1, 2], ["A", "B", "C"])
        ax.set_xlim(-0.3, 2.3)
        ax.set_title(labels.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    return to_png(fig)


LOSS_COLUMNS = ("loss", "g_total", "d_real", "d_fake")  # SDM's total loss; SPADE's generator and critic terms


def loss_curves(curves) -> bytes:
    """curves: {generator: {fold: DataFrame with step and loss columns}}; one panel per generator and loss."""
    panels = []
    for generator, folds in curves.items():
        columns = []
        for table in folds.values():
            columns += [c for c in table.columns if c not in columns and c != "step" and c != "images_per_s"]
        shown = [c for c in LOSS_COLUMNS if c in columns] or columns
        panels += [(generator, column) for column in shown]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.4 * cols, 2.6 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (generator, column) in zip(axes, panels):
        for fold, table in curves[generator].items():
            if column in table:
                ax.plot(table["step"], table[column], linewidth=1, label=str(fold))
        ax.set_title(f"{generator.upper()}: {column}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, title="fold", title_fontsize=6)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return to_png(fig)


def memorisation_figure(table, threshold=None) -> bytes:
    """One panel per generator (rows) and fold (columns): each synthetic slice's nearest-neighbour score to the
    real slices of its generator's training patients (y) against that to the fold's test patients (x). A
    generator that memorises its training images puts its slices above the diagonal, near y = 1; `threshold`
    (the audit's near-duplicate threshold) is drawn as a dashed line on both axes."""
    generators = sorted(table["generator"].unique())
    folds = sorted(table["fold"].astype(str).unique(), key=lambda f: (len(f), f))
    fig = Figure(figsize=(2.4 * len(folds) + 0.6, 2.5 * len(generators)))
    axes = fig.subplots(len(generators), len(folds), squeeze=False, sharex=True, sharey=True)
    values = table[["to_train", "to_test"]].to_numpy(float)
    low = float(np.nanmin(values)) if np.isfinite(values).any() else 0.0
    low = min(low, threshold if threshold is not None else low) - 0.02
    for r, generator in enumerate(generators):
        for c, fold in enumerate(folds):
            ax = axes[r, c]
            rows = table[(table["generator"] == generator) & (table["fold"].astype(str) == fold)]
            ax.plot([low, 1], [low, 1], color="#888888", linewidth=0.8)
            if threshold is not None:
                ax.axhline(threshold, color="#cc0000", linewidth=0.6, linestyle="--")
                ax.axvline(threshold, color="#cc0000", linewidth=0.6, linestyle="--")
            ax.scatter(rows["to_test"], rows["to_train"], s=6, alpha=0.6, linewidths=0,
                       color=ARM_COLOURS["C" if generator == "sdm" else "B"])
            ax.set_xlim(low, 1.005)
            ax.set_ylim(low, 1.005)
            ax.set_title(f"{generator.upper()}, fold {fold} ({len(rows)})", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if r == len(generators) - 1:
                ax.set_xlabel("to test patients", fontsize=8)
            if c == 0:
                ax.set_ylabel("to training patients", fontsize=8)
    fig.tight_layout()
    return to_png(fig)
