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


def passkey_heatmap(accuracy, depths, lengths, path: Path, title: str = "") -> Path:
    """Heatmap of accuracy [depths][lengths], depth down the rows, each cell labelled."""
    acc = np.asarray(accuracy, dtype=float)
    cmap = plt.get_cmap("cividis")
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.6 * len(depths) + 2))
    image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            # Dark text on the light end of the map, white on the dark end.
            r, g, b, _ = cmap(acc[i, j])
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=11, color=color,
                    fontweight="bold")
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title}\npass-key retrieval, mean accuracy {acc.mean():.2f}".strip(), fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy (chance 0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
