"""PNG figures of the evaluation results (matplotlib, Agg backend: no display needed).

Colours are safe for colour-blind readers: the heatmap uses cividis (readable in every common
colour-vision deficiency and in grey scale), the line plots Okabe-Ito blue.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

BLUE = "#0072B2"


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def _accuracy_heatmap(acc: np.ndarray, row_labels: list[str], col_labels: list[str], ylabel: str, title: str,
                      colorbar_label: str, path: Path, cell_format: str, notes=None) -> Path:
    """Heatmap of accuracies [rows][columns] in [0, 1], each cell labelled (NaN cells: a dash), with
    notes [rows][columns] in small print under the labels if given."""
    cmap = plt.get_cmap("cividis")
    fig, ax = plt.subplots(figsize=(1.2 * len(col_labels) + 3, 0.6 * len(row_labels) + 2))
    image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            if not np.isfinite(acc[i, j]):
                ax.text(j, i, "–", ha="center", va="center", fontsize=11)
                continue
            # Dark text on the light end of the map, white on the dark end.
            r, g, b, _ = cmap(acc[i, j])
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, format(acc[i, j], cell_format), ha="center", va="center", fontsize=11, color=color,
                    fontweight="bold")
            if notes is not None:
                ax.text(j, i + 0.3, notes[i][j], ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def passkey_heatmap(accuracy, depths, lengths, path: Path, title: str = "") -> Path:
    """Heatmap of accuracy [depths][lengths], depth down the rows, each cell labelled."""
    acc = np.asarray(accuracy, dtype=float)
    return _accuracy_heatmap(acc, [f"{d:g}%" for d in depths], [_length_label(n) for n in lengths], "needle depth",
                             f"{title}\npass-key retrieval, mean accuracy {acc.mean():.2f}".strip(),
                             "accuracy (chance 0.1)", path, ".1f")


def retrieval_heatmap(accuracy, queries, depth_edges, lengths, mean: float, path: Path, title: str = "") -> Path:
    """Heatmap of key/value retrieval accuracy [depth bins][lengths] (None: no query in the cell),
    each cell with its number of queries."""
    acc = np.array([[np.nan if a is None else a for a in row] for row in accuracy], dtype=float)
    rows = [f"{100 * lo:g}-{100 * hi:g}%" for lo, hi in zip(depth_edges, depth_edges[1:])]
    return _accuracy_heatmap(acc, rows, [_length_label(n) for n in lengths], "depth of the key's statement",
                             f"{title}\nkey/value retrieval, mean accuracy {mean:.2f}".strip(), "accuracy", path,
                             ".2f", notes=[[f"n={n}" for n in row] for row in queries])


def position_loss_plot(buckets: list[dict], overall: float, path: Path, log_x: bool = False, title: str = "",
                       bits_per_byte: bool = False) -> Path:
    """Loss of each position bucket with +-1 standard error (top), and tokens per bucket (bottom).

    bits_per_byte: plot the buckets' bits per byte (and `overall` is taken as such) instead of nats per token.
    """
    key, unit = ("bits_per_byte", "bits/byte") if bits_per_byte else ("loss", "nats/token")
    edges = [b["start"] + 1 for b in buckets] + [buckets[-1]["end"] + 1]  # positions from 1, for a log axis
    values = np.array([b[key] for b in buckets], dtype=float)
    # The standard error is of the loss in nats/token; bits per byte scales it like the mean.
    scale = values / np.array([b["loss"] for b in buckets])
    errors = np.array([b["stderr"] if b["stderr"] is not None else np.nan for b in buckets]) * scale
    centers = np.sqrt(np.multiply(edges[:-1], edges[1:])) if log_x else (np.add(edges[:-1], edges[1:]) / 2)

    fig, (ax, counts) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    ax.stairs(values, edges, baseline=None, linewidth=2, color=BLUE, label="bucket mean")
    if np.isfinite(errors).any():
        ax.errorbar(centers, values, yerr=errors, fmt="none", ecolor="black", capsize=3, label="±1 standard error")
    ax.axhline(overall, color="gray", linestyle="--", label=f"overall {overall:.4f}")
    ax.set_ylabel(f"validation loss ({unit})")
    ax.set_title(f"{title}\nloss by position, overall {overall:.4f} {unit}".strip(), fontsize=10)
    ax.legend()
    counts.stairs([b["tokens"] for b in buckets], edges, fill=True, color=BLUE, alpha=0.5)
    counts.set_ylabel("tokens")
    counts.set_xlabel("token position (1 = first predicted token)")
    if log_x:
        counts.set_xscale("log")
        counts.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
