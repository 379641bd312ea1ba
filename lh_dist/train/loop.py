"""The training loop: Lighthouse then dense in one run, exact resume, stop signals, metrics."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lh_dist.assembly.model import (PhasedAttention, dense_layer_ids,
                                    lighthouse_length, phase_at, set_phase)
from lh_dist.checkpoint.checkpointer import Checkpointer
from lh_dist.checkpoint.format import load_model_state
from lh_dist.config import ConfigError, TrainConfig
from lh_dist.data.sources import data_sources, open_loaders, with_current_documents
from lh_dist.hf.mapping import HF_DIR, read_origin
from lh_dist.ops import resolve_backend
from lh_dist.parallel.device import local_device
from lh_dist.parallel.distributed import init_distributed
from lh_dist.parallel.mesh import init_parallel_layout, resolve_degrees
from lh_dist.train.engine import model_dtype
from lh_dist.train.init_from import check_data_tokenizer, copy_origin, open_init_source, record_init
from lh_dist.train.metrics import Metrics, ValidationLoss, flops_per_step_token, peak_flops
from lh_dist.train.step import StepResult, build_train_step

# Exit status after a stop signal (SIGTERM / SIGUSR1 / SIGINT) was handled by checkpointing:
# EX_TEMPFAIL from sysexits.h, "try again later". SLURM scripts requeue on it.
PREEMPTED_EXIT_CODE = 75


class StopRequest:
    """Remembers SIGTERM / SIGUSR1 / SIGINT; the loop acts on it at the next step boundary, on all ranks
    at once. A second SIGINT (Ctrl-C pressed again) interrupts at once, without a checkpoint."""

    def __init__(self):
        self.signum = None
        self.interrupts = 0
        # The ranks agree over a CPU (gloo) group, so that asking every step never waits for the GPU.
        self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            if dist.get_rank() == 0:
                print("Ctrl-C: checkpointing after this step, then exiting; press it again to stop at once "
                      "without a checkpoint", file=sys.stderr, flush=True)
        self.signum = signum

    def agreed(self) -> bool:
        """Whether any rank got a stop signal; every rank calls it at the same step."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


class NothingToTrain(Exception):
    """The run dir already holds a checkpoint at schedule.steps or later: nothing is written, lh-train
    says so and exits 0."""


class NonFiniteLossError(RuntimeError):
    """schedule.max_nonfinite_steps steps in a row had a non-finite loss or gradient."""


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the configured decay over the
    last schedule.decay_steps steps (every step after warmup when unset), the peak held in between."""
    s, base = cfg.schedule, cfg.optim.lr
    if step < s.warmup_steps:
        return base * (step + 1) / s.warmup_steps
    decay_steps = s.steps - s.warmup_steps if s.decay_steps is None else s.decay_steps
    start = s.steps - decay_steps
    if s.decay == "constant" or decay_steps == 0 or step < start:
        return base
    frac = (step - start) / max(decay_steps - 1, 1)
    floor = base * s.min_lr_ratio
    if s.decay == "linear":
        return floor + (base - floor) * (1 - frac)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def check_split_sizes(cfg: TrainConfig, info: dict, dp: int, key: str = "data.path", path: str | None = None) -> None:
    """ConfigError, before any work, when a split of a dataset (`info`, its lh_data.json; `key` and `path`
    name it) cannot fill what the run reads from it: one batch of training, and logging.eval_batches
    batches of validation, on every DP rank."""
    sample = cfg.data.seq_len + 1
    per_batch = cfg.data.micro_batch * dp
    larger_val = "retrieval --val-docs" if "retrieval" in info else "--val-tokens"  # a retrieval set counts documents
    for split, batches in (("train", 1), ("val", cfg.logging.eval_batches)):
        counts = info["splits"][split]
        samples = (counts["tokens"] + counts["documents"]) // sample  # each document ends with one EOD token
        if samples < batches * per_batch:
            raise ConfigError(
                f"{key}: split {split!r} of {path or cfg.data.path} holds {counts['tokens']:,} tokens, "
                f"{samples} samples of data.seq_len + 1 = {sample:,}; the run needs {batches * per_batch} "
                f"({batches} batch(es) x micro_batch {cfg.data.micro_batch} x dp {dp})"
                + (f"; rebuild it with a larger lh-data {larger_val} or lower logging.eval_batches"
                   if split == "val" else ""))


def retrieval_length_warning(cfg: TrainConfig, info: dict, key: str, path: str) -> str | None:
    """A line for a retrieval set (`info`, its lh_data.json) whose documents are not data.seq_len long: a
    sample then cuts a document, parting queries from the statements they ask for, or joins several."""
    doc_tokens = info.get("retrieval", {}).get("doc_tokens")
    if not doc_tokens or doc_tokens == cfg.data.seq_len:
        return None
    effect = ("cut each document, parting queries from the statements they ask for" if cfg.data.seq_len < doc_tokens
              else "join several documents")
    return (f"warning: {key}: {path} holds retrieval documents of {doc_tokens:,} tokens and data.seq_len is "
            f"{cfg.data.seq_len:,}, so samples {effect} (lh-data retrieval --doc-tokens {cfg.data.seq_len} makes "
            f"documents of one sample)")


def _all_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


@dataclass
class _PendingStep:
    """A step done on the device but not yet read on the host (the loop reads at log_interval)."""

    result: StepResult
    lr: float
    seconds: float


class Trainer:
    """One rank of `lh-train`: builds the run (layout, data, model, engine, step), resumes or starts
    it, and runs the schedule (the Lighthouse phase, then dense), logging, validating, checkpointing
    and stopping cleanly on SIGTERM / SIGUSR1."""

    def __init__(self, cfg: TrainConfig, resume: str = "auto", overwrite: bool = False, rewind: bool = False,
                 init_from: str | None = None, accept_changed_data: bool = False):
        """resume: 'auto', 'none' or a checkpoint folder; overwrite: archive a previous run's outputs first
        (with 'none' or another run's checkpoint); rewind: allow resuming from an older checkpoint of this run;
        init_from: a run directory or checkpoint whose weights a new run starts from (a run dir that holds
        checkpoints resumes instead); accept_changed_data: resume although a dataset's content differs from
        the checkpoint's record (its sample counters then index other documents)."""
        self.cfg = cfg
        self.run_dir = Path(cfg.logging.run_dir)
        if init_from is not None and resume not in ("auto", "none"):
            raise ConfigError(f"--init-from starts a new run from weights; it does not go with --resume {resume}")
        self.sources = data_sources(cfg.data)
        for source in self.sources:
            if source.info["vocab_size"] > cfg.model.vocab_size:
                raise ConfigError(f"model.vocab_size must be >= the data's vocabulary ({source.info['vocab_size']} in "
                                  f"{source.path}), got {cfg.model.vocab_size}")
            warning = retrieval_length_warning(cfg, source.info, source.key, source.path)
            if warning and os.environ.get("RANK", "0") == "0":
                print(f"lh-train: {warning}", file=sys.stderr)
        init = open_init_source(init_from, cfg) if init_from is not None else None
        # The model's tokenizer: this run's own origin (a resumed run started from an import), the source's.
        try:
            origins = [(self.run_dir, read_origin(self.run_dir))] + ([(init.run_dir, init.origin)] if init else [])
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for where, origin in origins:
            for source in self.sources:
                check_data_tokenizer(cfg, source.info, origin, where, f"{source.key}: {source.path}")
        self.device = local_device(cfg.device)  # too few GPUs stop every rank here, before NCCL starts
        try:  # a kernel that cannot run here stops the run before its run dir is written
            resolve_backend(cfg.model.attention_backend, self.device, model_dtype(self.device), cfg.model.head_dim)
        except RuntimeError as e:
            raise ConfigError(f"model.attention_backend: {e}") from None
        dp, cp = resolve_degrees(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        for source in self.sources:
            check_split_sizes(cfg, source.info, dp, source.key, source.path)
        init_distributed(self.device)
        world = dist.get_world_size()
        self.layout = init_parallel_layout(dp, cp)
        self.rank = dist.get_rank()

        # Rank 0 locks the run dir and checks what to resume against this config before anything is
        # written (config.yaml included); every rank gets its decision, or its error.
        self.checkpointer = Checkpointer(cfg, self.rank, world, dp)
        self.checkpointer.data_sources, self.checkpointer.accept_changed_data = self.sources, accept_changed_data
        plan = self.checkpointer.open(resume, overwrite=overwrite, rewind=rewind)
        if plan.folder is not None and plan.manifest["step"] >= cfg.schedule.steps:
            raise NothingToTrain(f"{self.run_dir} already holds step {plan.manifest['step']}, and schedule.steps "
                                 f"is {cfg.schedule.steps}; raise schedule.steps to train on, or start a new run "
                                 f"elsewhere (logging.run_dir=...) or over it (--resume none --overwrite)")
        self.tokens_per_step = cfg.data.seq_len * cfg.data.micro_batch * cfg.optim.grad_accum * dp
        cache = cfg.data.cache_dir or str(self.run_dir / "data_cache")
        self.loader, self.val_loaders = open_loaders(cfg.data, self.sources, eval_batches=cfg.logging.eval_batches,
                                                     dp_rank=self.layout.dp_rank, dp_degree=dp, seed=cfg.seed,
                                                     cache_dir=cache)
        if init is not None and plan.folder is not None:
            plan.messages.append(f"--init-from {init_from}: the run dir already holds {Path(plan.folder).name}; "
                                 f"resuming that run instead of starting over")
            init = None
        messages = plan.messages + self.checkpointer.start(plan)
        if init is not None:
            self.checkpointer.on_rank0(lambda: record_init(init, self.run_dir))
            if self.checkpointer.on_rank0(lambda: copy_origin(init, self.run_dir)):
                messages.append(f"copied {init.run_dir / HF_DIR} (the imported model's tokenizer and config) into "
                                f"the run dir")

        self.step_fn = build_train_step(cfg, self.layout, self.device,
                                        load_model_state(init.folder) if init is not None else None)
        if init is not None:
            messages += [f"--init-from {init_from}: {line}" for line in init.notes]
            messages.append(f"starting at step 0 from the weights of {init.folder}")
        self.engine = self.step_fn.engine
        self.n_params, self.n_matmul_params = self.step_fn.n_params, self.step_fn.n_matmul_params
        self.checkpointer.n_params = self.n_params
        start = plan.manifest["step"] if plan.folder is not None else 0
        # Now, not at the first save: the steps before it would be trained for nothing.
        interval = cfg.checkpoint.interval
        self.checkpointer.check_space(min((start // interval + 1) * interval, cfg.schedule.steps))
        self.pending: list[_PendingStep] = []

        self.step, self.nonfinite_total, self.nonfinite_run = 0, 0, 0
        self.metrics = Metrics(self.run_dir, self.rank, cfg.schedule.steps)
        for message in messages:
            self.metrics.log(message)
        if plan.folder is not None:
            state = self.checkpointer.load(self.engine, plan)
            self.step = state["step"]
            self.nonfinite_total = state["nonfinite_total"]
            data_state = state["data"]
            if accept_changed_data:  # the sample counters stay; the document counts are the rebuilt data's
                data_state = with_current_documents(data_state, self.loader.state_dict())
            self.loader.load_state_dict(data_state)
            self.metrics.log(f"resumed from {plan.folder} at step {self.step} ({phase_at(cfg, self.step)} phase)")
        self.stop = StopRequest()
        self.metrics.log(
            f"lh_dist: {self.n_params / 1e6:.2f}M parameters, world {world} = dp {dp} x cp {cp}, "
            f"{self.tokens_per_step:,} tokens/step, device {self.device}, run dir {self.run_dir}")

    # ---- one step ----------------------------------------------------------------------------

    def train_step(self, lr: float) -> StepResult:
        """One optimizer step on the next grad_accum micro-batches of the training data."""
        return self.step_fn([next(self.loader) for _ in range(self.cfg.optim.grad_accum)], lr)

    def validate(self) -> tuple[ValidationLoss, dict[str, ValidationLoss]]:
        """Validation loss over the same first eval_batches batches of each source every time, all ranks:
        (overall, {source name: its loss}).

        Each source's loss is the mean over its samples of their mean token loss, with the standard
        error of that mean; the overall loss is the mean of the sources' losses weighted by the mixture
        weights (the single dataset's loss without a mixture)."""
        names = list(self.val_loaders)
        sums = torch.stack([self.step_fn.validation_sums(self.val_loaders[n]) for n in names])  # [sources, 3]
        if dist.is_initialized():
            dist.all_reduce(sums)  # every DP replica's samples
        per_source = {name: ValidationLoss.from_sums(*row) for name, row in zip(names, sums.cpu().tolist())}
        weights = {s.name: s.weight for s in self.sources}
        return ValidationLoss.weighted(per_source, weights), per_source

    def trainer_state(self) -> dict:
        """What a checkpoint keeps besides the engine's state: step, data position, counters."""
        # tokens_seen and the last losses are for readers of the checkpoint (lh-export's model card).
        return {"step": self.step, "phase": phase_at(self.cfg, max(self.step - 1, 0)),
                "data": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total,
                "tokens_seen": self.step * self.tokens_per_step, "train_loss": self.metrics.last_train,
                "val_loss": self.metrics.last_val}

    def save(self) -> Path:
        """Checkpoint the current step (all ranks); returns its folder."""
        folder = self.checkpointer.save(self.engine, self.step, self.trainer_state())
        self.metrics.log(f"checkpoint {folder}")
        return folder

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Train to schedule.steps; 0 when done, PREEMPTED_EXIT_CODE after a stop signal. Every
        ending, a failure included, closes with a summary paragraph on the console."""
        self.metrics.start(self.step, self.cfg.to_dict())
        try:
            code = self._train()
            status = "complete" if code == 0 else f"stopped by {signal.Signals(self.stop.signum).name}"
            return code
        except BaseException as e:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed ({type(e).__name__})"
            raise
        finally:
            self.metrics.summary(status, self.step, self.tokens_per_step, self.cfg.schedule.lighthouse_steps,
                                 self.checkpointer.latest())
            self.metrics.close()

    def _train(self) -> int:
        cfg = self.cfg
        phase = None
        peak = peak_flops(self.device)
        while self.step < cfg.schedule.steps:
            step_phase = phase_at(cfg, self.step)
            if step_phase != phase:
                if phase is not None:
                    self._finish_pending()
                    self._log_step(phase, peak)  # each logged interval stays within one phase
                set_phase(self.engine.module, step_phase)
                # A switch, in this process or just before it (a resume at the boundary); not a resume
                # in mid-phase, whose "resumed from" line names its phase already.
                if phase is not None or (self.step > 0 and step_phase != phase_at(cfg, self.step - 1)):
                    self.metrics.log(f"step {self.step}: attention phase is now {step_phase}")
                phase = step_phase

            capture = self._selection_capture(phase)
            t0 = time.time()
            lr = lr_at(cfg, self.step)
            # A compiled model runs eagerly for a step that captures a selection map (a side effect
            # that compiled graphs do not make).
            stance = "force_eager" if capture is not None and cfg.parallel.compile else "default"
            with torch.compiler.set_stance(stance):
                result = self.train_step(lr)
            self.step += 1
            stopping = self.stop.agreed()
            log_now = stopping or self.step % cfg.logging.log_interval == 0 or self.step == cfg.schedule.steps
            if log_now and self.device.type == "cuda":
                torch.cuda.synchronize()  # the interval's steps, this one included, are done
            self.pending.append(_PendingStep(result, lr, time.time() - t0))

            if result.applied:
                self.nonfinite_run = 0
            else:
                self.nonfinite_total += 1
                self.nonfinite_run += 1
                self.metrics.log(f"step {self.step}: non-finite loss or gradient, step skipped "
                                 f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)")
                if self.nonfinite_run >= cfg.schedule.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_run} non-finite losses in a row (schedule.max_nonfinite_steps="
                        f"{cfg.schedule.max_nonfinite_steps}); stopping. The last good checkpoint is "
                        f"{self.checkpointer.latest()}")

            if capture is not None:
                capture.detach()
                if capture.captured is not None:
                    self._log_selection_map(*capture.captured, phase)
            if log_now:
                self._log_step(phase, peak)
            if self.step % cfg.logging.eval_interval == 0 or self.step == cfg.schedule.steps:
                overall, per_source = self.validate()
                self.metrics.validation(self.step, overall, per_source if self.cfg.data.sources else None)

            if stopping or self.step % cfg.checkpoint.interval == 0 or self.step == cfg.schedule.steps:
                self.save()
                # A signal that came during the save: the checkpoint just written is current, exit now
                # rather than after one more step and one more save (the grace period may be short).
                stopping = stopping or (self.step < cfg.schedule.steps and self.stop.agreed())
            if stopping:
                self.metrics.log(f"stop signal received: checkpointed step {self.step}, exiting with "
                                 f"{PREEMPTED_EXIT_CODE}")
                return PREEMPTED_EXIT_CODE
        return 0

    def _finish_pending(self) -> None:
        """Wait for the pending steps' GPU work; the wait counts as time of the last of them."""
        if self.pending and self.device.type == "cuda":
            t0 = time.time()
            torch.cuda.synchronize()
            self.pending[-1].seconds += time.time() - t0

    def _read_pending(self) -> None:
        """Hand the steps since the last read to the metrics: one collective for their losses."""
        if not self.pending:
            return
        losses = _all_mean(torch.stack([p.result.loss for p in self.pending]).float()).tolist()
        norms = [float(p.result.grad_norm) for p in self.pending]
        for p, loss, norm in zip(self.pending, losses, norms):
            self.metrics.step_done(loss=loss, grad_norm=norm, lr=p.lr, tokens=self.tokens_per_step,
                                   seconds=p.seconds, finite=p.result.applied)
        self.pending.clear()

    def _selection_capture(self, phase: str):
        """An observer of the first Lighthouse layer's scored q and k, on steps that log a selection map."""
        from lh_dist.train.selection_map import SelectionCapture

        every = self.cfg.logging.selection_map_interval
        # Armed for the step that ends on a multiple of `every`, so images share the scalars' steps.
        if phase != "lighthouse" or not every or self.rank != 0 or (self.step + 1) % every:
            return None
        layer = next((m for m in self.engine.module.modules()
                      if isinstance(m, PhasedAttention) and m.lighthouse_fn is not None), None)
        return None if layer is None else SelectionCapture(layer)

    def _log_selection_map(self, q: torch.Tensor, k: torch.Tensor, phase: str) -> None:
        from lh_dist.ops.lighthouse import LighthouseParams
        from lh_dist.train.selection_map import selection_map

        cp = self.layout.cp_degree
        chunk = q.shape[1] // 2 if cp > 1 else q.shape[1]  # under CP: this rank's first zigzag chunk
        layer_id = min(set(range(self.cfg.model.n_layers)) - dense_layer_ids(self.cfg))  # the first Lighthouse layer
        params = LighthouseParams.from_config(self.cfg.lighthouse)
        image = selection_map(q[:, :chunk].float(), k[:, :chunk].float(), params, chunks=2 * cp if cp > 1 else 1,
                              title=f"{self.run_dir.name}, step {self.step} ({phase} phase): layer {layer_id}, "
                                    f"KV head 0" + (", CP rank 0's first chunk" if cp > 1 else ""))
        self.metrics.image(self.step, "lighthouse/selection_map", image)

    def _log_step(self, phase: str, peak: float | None) -> None:
        """Scalars and the console line for the steps since the last log (the tags: docs/training.md,
        "Console and TensorBoard")."""
        self._read_pending()
        means = self.metrics.take_means(self.step)
        if means is None:
            return
        world = dist.get_world_size()
        tokens_per_s = means["tokens_per_s"]
        values = {
            "train/loss": means["loss"], "train/grad_norm": means["grad_norm"], "train/lr": means["lr"],
            "train/tokens_seen": self.step * self.tokens_per_step, "train/nonfinite_steps": self.nonfinite_total,
            "perf/step_time_s": means["step_time_s"], "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_device": tokens_per_s / world,
            "lighthouse/active": 1.0 if phase == "lighthouse" else 0.0,
        }
        if phase == "lighthouse":
            s = lighthouse_length(self.cfg)
            values |= {"lighthouse/S": s, "lighthouse/S_over_N": s / self.cfg.data.seq_len}
        if peak is not None:
            flops = flops_per_step_token(self.cfg, self.n_matmul_params, phase) * tokens_per_s / world
            values["perf/mfu"] = flops / peak
        if self.device.type == "cuda":
            values["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)  # the next line shows the next interval's peak
        self.metrics.scalars(self.step, values)
        self.metrics.progress(self.step, values, phase)
