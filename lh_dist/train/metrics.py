"""Metrics: TensorBoard scalars and images on rank 0, and a console progress line."""

from __future__ import annotations

import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peak, for MFU; unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class Metrics:
    """Every rank makes one; only rank 0 writes (TensorBoard events, console lines)."""

    def __init__(self, run_dir: str | Path, rank: int, total_steps: int):
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self._t0 = time.time()
        self._step0 = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, step: int, tag: str, image_hw3) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_hw3, step, dataformats="HWC")

    def text(self, step: int, tag: str, message: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, message, step)

    def progress(self, step: int, loss: float, tokens_per_s: float, phase: str, lr: float) -> None:
        """One console line per call: step, loss, throughput and time left at the current pace."""
        if not self.enabled:
            return
        if self._step0 is None:
            self._step0, self._t0 = step - 1, time.time()
        done = step - self._step0
        eta = (time.time() - self._t0) / max(done, 1) * (self.total_steps - step)
        print(f"step {step:>6}/{self.total_steps}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
              f"{phase}  eta {_duration(eta)}", flush=True)

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
