"""Metrics: TensorBoard events and console lines, written by rank 0.

Every `logging.log_interval` steps the trainer logs the means over the steps since its
last log (loss, grad norm, throughput), as TensorBoard scalars and as one console line:

    step     20/60  loss 4.1234  grad 0.842  lr 3.00e-03  3,612 tok/s  mem 1.2 GiB  lighthouse  elapsed 0:00:41  eta 0:01:22

`mem` (peak GPU memory of the interval) appears on GPUs only. The time left assumes the
pace since this process started, checkpoints and validation included. Every
`logging.eval_interval` steps a validation line gives the loss with its standard error:

    step 30: val 2.4561 ± 0.0213 over 16 samples

(with a mixture, the weighted loss, then each source's). A run ends with a one-paragraph
summary, also when it is stopped or fails.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lh_dist.assembly.model import dense_layer_ids, lighthouse_length
from lh_dist.config import TrainConfig

# Dense bf16 tensor-core peak, for MFU; unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU (by its name), for MFU; None on CPU and on unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_step_token(cfg: TrainConfig, n_params_matmul: int, phase: str) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) counting the attention actually run."""
    m, n = cfg.model, cfg.data.seq_len
    # Causal attention forward: QK^T and PV over all query heads, 2 FLOPs per MAC, half the pairs.
    width = m.n_heads * m.head_dim
    dense_attn = 2 * 2 * n * n / 2 * width
    n_lh_layers = m.n_layers - len(dense_layer_ids(cfg)) if phase == "lighthouse" else 0
    s = lighthouse_length(cfg)
    lh_attn = 2 * 2 * s * s / 2 * width
    attn_per_seq = (m.n_layers - n_lh_layers) * dense_attn + n_lh_layers * lh_attn
    return 6 * n_params_matmul + 3 * attn_per_seq / n


@dataclass(frozen=True)
class ValidationLoss:
    """A validation loss: the mean over samples of each sample's mean token loss, and the standard
    error of that mean (NaN with fewer than two samples)."""

    loss: float
    stderr: float
    samples: int

    @classmethod
    def from_sums(cls, total: float, total_sq: float, count: float) -> ValidationLoss:
        """From the sum of the samples' losses, the sum of their squares and their number."""
        n = int(round(count))
        if n == 0:
            return cls(math.nan, math.nan, 0)
        mean = total / n
        if n == 1:
            return cls(mean, math.nan, 1)
        variance = max(total_sq - total * mean, 0.0) / (n - 1)  # unbiased sample variance (Bessel)
        return cls(mean, math.sqrt(variance / n), n)

    @classmethod
    def weighted(cls, parts: dict[str, ValidationLoss], weights: dict[str, float]) -> ValidationLoss:
        """The mixture's loss: the sources' losses weighted by their mixture weights (normalized),
        so that it estimates the loss on the training distribution, whatever each source's sample
        count. The sources' samples are independent, so the standard errors add in quadrature:
        se = sqrt(sum_s (w_s / W)^2 se_s^2)."""
        total = sum(weights[name] for name in parts)
        loss = sum(weights[name] / total * part.loss for name, part in parts.items())
        stderr = math.sqrt(sum((weights[name] / total * part.stderr) ** 2 for name, part in parts.items()))
        return cls(loss, stderr, sum(part.samples for part in parts.values()))

    def text(self) -> str:
        """'2.4561 ± 0.0213 over 16 samples' (no ± with one sample)."""
        spread = "" if math.isnan(self.stderr) else f" ± {self.stderr:.4f}"
        return f"{self.loss:.4f}{spread} over {self.samples} sample{'s' if self.samples != 1 else ''}"

    def scalars(self, prefix: str) -> dict[str, float]:
        """TensorBoard scalars: `prefix`/loss and, with two samples or more, `prefix`/loss_stderr."""
        values = {f"{prefix}/loss": self.loss}
        if not math.isnan(self.stderr):
            values[f"{prefix}/loss_stderr"] = self.stderr
        return values


class StepMeans:
    """Per-step values since the last log; `take` returns their means and starts over.

    Steps whose loss was not finite (skipped updates) count for time and tokens only,
    so that one bad step does not hide the loss of the others.
    """

    def __init__(self):
        self._clear()

    def _clear(self) -> None:
        self.steps = self.finite = self.tokens = 0
        self.seconds = self.loss = self.grad_norm = 0.0
        self.lr = math.nan

    def add(self, *, loss: float, grad_norm: float, lr: float, tokens: int, seconds: float, finite: bool = True):
        """Count one optimizer step: its mean loss, gradient norm, learning rate, tokens and seconds."""
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.lr = lr
        if finite:
            self.finite += 1
            self.loss += loss
            self.grad_norm += grad_norm

    def take(self) -> dict | None:
        """{loss, grad_norm, lr (the last step's), tokens_per_s, step_time_s, steps}, or None without steps."""
        if not self.steps:
            return None
        n = self.finite or math.nan  # no finite step: NaN means
        out = {"loss": self.loss / n, "grad_norm": self.grad_norm / n, "lr": self.lr,
               "tokens_per_s": self.tokens / max(self.seconds, 1e-9), "step_time_s": self.seconds / self.steps,
               "steps": self.steps}
        self._clear()
        return out


def duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total_steps: int, values: dict[str, float], phase: str, elapsed: float,
                  eta: float) -> str:
    """The console line of a logged step, from its TensorBoard values (see the module docstring)."""
    parts = [f"step {step:>6}/{total_steps}", f"loss {values['train/loss']:.4f}",
             f"grad {values['train/grad_norm']:#.3g}", f"lr {values['train/lr']:.2e}",
             f"{values['perf/tokens_per_s']:,.0f} tok/s"]
    if "perf/peak_memory_gib" in values:
        parts.append(f"mem {values['perf/peak_memory_gib']:.1f} GiB")
    parts += [phase, f"elapsed {duration(elapsed)}", f"eta {duration(eta)}"]
    return "  ".join(parts)


def run_summary(*, status: str, step: int, total_steps: int, start_step: int, seconds: float,
                tokens_per_step: int, lighthouse_steps: int, train_loss: tuple[int, int, float] | None,
                val_loss: tuple[int, float] | None, checkpoint: Path | None) -> str:
    """One paragraph on a finished, stopped or failed run.

    train_loss is (first step, last step, mean loss) of the last logged interval;
    val_loss is (step, loss) of the last validation in this process.
    """
    done = step - start_step
    lighthouse = max(0, min(step, lighthouse_steps) - min(start_step, lighthouse_steps))
    tokens = done * tokens_per_step
    sentences = [
        f"run {status} at step {step:,}/{total_steps:,} after {duration(seconds)}"
        + (f" (resumed at step {start_step:,})" if start_step else "") + ".",
        f"This process trained {done:,} steps ({lighthouse:,} Lighthouse, {done - lighthouse:,} dense) on "
        f"{tokens:,} tokens, {tokens / max(seconds, 1e-9):,.0f} tokens/s overall; {step * tokens_per_step:,} tokens "
        f"in total.",
    ]
    if train_loss is not None:
        first, last, loss = train_loss
        steps = f"step {last:,}" if first == last else f"mean of steps {first:,}-{last:,}"
        sentences.append(f"Final train loss {loss:.4f} ({steps})"
                         + (f", validation loss {val_loss[1]:.4f} (step {val_loss[0]:,})." if val_loss else
                            "; no validation in this process."))
    sentences.append(f"Newest checkpoint: {checkpoint}." if checkpoint else "No checkpoint was written.")
    return "lh_dist: " + " ".join(sentences)


class Metrics:
    """Every rank makes one and feeds it the same values; only rank 0 writes (events, console)."""

    def __init__(self, run_dir: str | Path, rank: int, total_steps: int, clock=time.monotonic):
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.clock = clock
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.means = StepMeans()
        self.start_step, self._t0 = 0, clock()
        self._interval_start = 1
        self.last_train: tuple[int, int, float] | None = None  # (first step, last step, mean loss)
        self.last_val: tuple[int, float] | None = None  # (step, loss)

    def start(self, step: int, config: dict) -> None:
        """The loop begins at `step`: times count from now; the resolved config goes to TensorBoard."""
        self.start_step, self._t0 = step, self.clock()
        self._interval_start = step + 1
        # Indented four spaces: TensorBoard renders text as Markdown, and this keeps it a code block.
        text = "\n".join("    " + line for line in yaml.safe_dump(config, sort_keys=False).splitlines())
        self.text(step, "train/config", text)

    @property
    def elapsed(self) -> float:
        """Seconds since `start` (or since this object was made)."""
        return self.clock() - self._t0

    def eta(self, step: int) -> float:
        """Seconds left at the pace since `start`."""
        return self.elapsed / max(step - self.start_step, 1) * (self.total_steps - step)

    def step_done(self, **values) -> None:
        """Record one optimizer step (see `StepMeans.add`)."""
        self.means.add(**values)

    def take_means(self, step: int) -> dict | None:
        """The means since the last call (see `StepMeans.take`), remembered for the summary."""
        means = self.means.take()
        if means is not None:
            self.last_train = (self._interval_start, step, means["loss"])
            self._interval_start = step + 1
        return means

    def validation(self, step: int, overall: ValidationLoss, sources: dict[str, ValidationLoss] | None = None) -> None:
        """Record the validation loss of `step`: TensorBoard `val/loss` and `val/loss_stderr`, with a
        mixture also `val/<source>/loss` and `val/<source>/loss_stderr`, and a console line."""
        self.last_val = (step, overall.loss)
        values = overall.scalars("val")
        line = f"step {step}: val {overall.text()}"
        if sources:
            line = f"step {step}: val {overall.text()} (the sources' losses weighted by the mixture)"
            for name, part in sources.items():
                values |= part.scalars(f"val/{name}")
                line += f"; {name} {part.text()}"
        self.scalars(step, values)
        self.log(line)

    def progress(self, step: int, values: dict[str, float], phase: str) -> None:
        """Print the console line of a logged step (`progress_line`)."""
        if self.enabled:
            print(progress_line(step, self.total_steps, values, phase, self.elapsed, self.eta(step)), flush=True)

    def summary(self, status: str, step: int, tokens_per_step: int, lighthouse_steps: int,
                checkpoint: Path | None) -> None:
        """Print the run's closing paragraph (`run_summary`) with what this object has seen."""
        self.log(run_summary(status=status, step=step, total_steps=self.total_steps, start_step=self.start_step,
                             seconds=self.elapsed, tokens_per_step=tokens_per_step,
                             lighthouse_steps=lighthouse_steps, train_loss=self.last_train,
                             val_loss=self.last_val, checkpoint=checkpoint))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars {tag: value} at `step`."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def image(self, step: int, tag: str, image_hw3) -> None:
        """A TensorBoard image at `step`: a uint8 RGB array [H, W, 3]."""
        if self.writer is not None:
            self.writer.add_image(tag, image_hw3, step, dataformats="HWC")

    def text(self, step: int, tag: str, message: str) -> None:
        """A TensorBoard text (rendered as Markdown) at `step`."""
        if self.writer is not None:
            self.writer.add_text(tag, message, step)

    def log(self, message: str) -> None:
        """A console line (rank 0 only)."""
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        """Flush and close the event file; later writes are dropped."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
