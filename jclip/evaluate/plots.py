"""The figures of the evaluation report, as PNG files (matplotlib, no display needed)."""

from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import numpy as np  # noqa: E402

MOST_CLASSES_SHOWN = 40  # with more classes, the worst and best 20 are drawn


def _save(figure, path: str) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def bars(path: str, labels: Sequence[str], values: Sequence[float], title: str, ylabel: str,
         chance: Optional[float] = None) -> None:
    """One bar per setting, values as percentages, labelled on top."""
    figure, axes = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 3.6))
    heights = 100 * np.asarray(values, float)
    drawn = axes.bar(range(len(labels)), heights, color="#4878a8")
    axes.bar_label(drawn, fmt="%.1f")
    if chance is not None:
        axes.axhline(100 * chance, color="grey", linestyle="--", linewidth=1, label="chance")
        axes.legend(loc="lower right")
    axes.set_xticks(range(len(labels)), labels)
    axes.set_ylim(0, 105)
    axes.set_ylabel(f"{ylabel} (%)")
    axes.set_title(title, fontsize=10)
    _save(figure, path)


def per_class_bars(path: str, names: Sequence[str], accuracy: np.ndarray, title: str) -> None:
    """Horizontal bars of accuracy per class, worst first (the worst and best 20 when there are many)."""
    present = ~np.isnan(accuracy)
    order = np.flatnonzero(present)[np.argsort(accuracy[present], kind="stable")]
    if len(order) > MOST_CLASSES_SHOWN:
        half = MOST_CLASSES_SHOWN // 2
        order = np.concatenate([order[:half], order[-half:]])
        title += f"\n(the {half} worst and {half} best of {int(present.sum())} classes)"
    figure, axes = plt.subplots(figsize=(7, 0.22 * len(order) + 1.4))
    axes.barh(range(len(order)), 100 * accuracy[order], color="#4878a8")
    axes.set_yticks(range(len(order)), [names[i] for i in order], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("accuracy (%)")
    axes.set_title(title, fontsize=10)
    _save(figure, path)


def similarity_matrix(path: str, similarity: np.ndarray, captions: Sequence[str], title: str) -> None:
    """A heat map of image (rows) × caption (columns) cosine similarities; the diagonal holds the true pairs."""
    figure, axes = plt.subplots(figsize=(0.45 * len(captions) + 4, 0.45 * len(captions) + 2.5))
    image = axes.imshow(similarity, cmap="viridis")
    figure.colorbar(image, ax=axes, fraction=0.046, label="cosine similarity")
    axes.set_xticks(range(len(captions)), [c[:40] for c in captions], rotation=70, ha="right", fontsize=7)
    axes.set_ylabel("image")
    axes.set_title(title, fontsize=10)
    _save(figure, path)


def line_panels(path: str, panels: Sequence[tuple[str, dict]], xlabel: str, title: str) -> None:
    """A grid of panels, each `(title, {line name: [[x, value], ...]})`, values as percentages; a single
    point is drawn as a marker."""
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows + 0.6), squeeze=False)
    for axes, (name, lines) in zip(grid.flat, panels):
        for label, points in lines.items():
            axes.plot(points[:, 0], 100 * points[:, 1], marker="o", markersize=3, label=label)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel(xlabel, fontsize=8)
        axes.set_ylabel("%", fontsize=8)
        axes.tick_params(labelsize=7)
        if len(lines) > 1:
            axes.legend(fontsize=7)
    for axes in list(grid.flat)[len(panels):]:
        axes.set_visible(False)
    figure.suptitle(title, fontsize=11)
    _save(figure, path)
