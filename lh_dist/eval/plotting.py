"""PNG figures of the evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def passkey_heatmap(accuracy, depths, lengths, path: Path, title: str = "") -> Path:
    """Heatmap of accuracy [depths][lengths], depth down the rows, mean in the title."""
    acc = np.asarray(accuracy, dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.55 * len(depths) + 1.8))
    image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.1f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"{title}  pass-key retrieval, mean {acc.mean():.2f}".strip())
    fig.colorbar(image, ax=ax, label="accuracy (chance 0.1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def position_loss_plot(buckets: list[dict], overall: float, path: Path, log_x: bool = False, title: str = "") -> Path:
    """Step plot of the loss of each position bucket, with the overall loss as a dashed line."""
    starts = [b["start"] for b in buckets]
    ends = [b["end"] for b in buckets]
    losses = [b["loss"] for b in buckets]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    # Positions counted from 1 (the first predicted token), so that a log axis can show them all.
    ax.stairs(losses, [s + 1 for s in starts] + [ends[-1] + 1], baseline=None, linewidth=2, label="bucket mean")
    ax.axhline(overall, color="gray", linestyle="--", label=f"overall {overall:.4f}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("token position (1 = first predicted token)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{title}  loss by position, overall {overall:.4f}".strip())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
