"""One optimizer step of lh-train: every micro-batch's forward and backward, then the update.

`build_train_step` builds it for lh-train's Trainer and for the benchmarks that time it
(benchmarks/train_throughput.py, scaling.py, cp_train.py), so they time what lh-train runs. It does not
wait for the GPU: the loss stays a device tensor, this rank's and not yet averaged over ranks,
and the caller reads it when it logs. The one wait per step is DeepSpeed's own test of the
gradient norm, which decides whether the update is applied (`Engine.step`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lh_dist.assembly.model import build_model
from lh_dist.config import TrainConfig
from lh_dist.parallel.mesh import ParallelLayout
from lh_dist.parallel.sharding import zigzag_positions, zigzag_shard
from lh_dist.train.engine import Engine


@dataclass
class StepResult:
    """What one optimizer step leaves for the loop to read when it logs."""

    loss: Tensor  # [] fp32 on the device: the mean loss of this rank's micro-batches
    grad_norm: Tensor | float  # global gradient norm before clipping (NaN or inf when not finite)
    applied: bool  # False: the loss or the gradient was not finite and nothing was updated


class TrainStep:
    """Forward and backward over the micro-batches of one optimizer step, then the update."""

    # The model's parameters (embedding included, tied weights once) and those of its matrix
    # products (all but the embedding), counted by build_train_step before ZeRO partitions them.
    n_params: int = 0
    n_matmul_params: int = 0

    def __init__(self, cfg: TrainConfig, engine: Engine, layout: ParallelLayout, device: torch.device):
        self.engine, self.layout, self.device = engine, layout, device
        self.grad_accum = cfg.optim.grad_accum
        self.seq_len = cfg.data.seq_len
        # This rank's global token positions (its two zigzag chunks under CP) [N_local].
        self.positions = zigzag_positions(cfg.data.seq_len, layout.cp_degree, layout.cp_rank, device)

    def split(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """A batch of samples [B, N + 1] -> this rank's inputs and targets [B, N_local]."""
        batch = batch.to(self.device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        cp = self.layout.cp_degree
        if cp > 1:
            inputs = zigzag_shard(inputs, 1, cp, self.layout.cp_rank)
            targets = zigzag_shard(targets, 1, cp, self.layout.cp_rank)
        return inputs, targets

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy [] (fp32) of this rank's tokens."""
        # No autocast here: the engine runs the model in its own precision (bf16 weights on GPUs).
        return self.engine(inputs, self.positions, targets).mean()  # per-token losses [B, N_local] -> []

    def __call__(self, micro_batches: Sequence[Tensor], lr: float) -> StepResult:
        """Train on `grad_accum` micro-batches [B, N + 1] at learning rate `lr`."""
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"a step takes optim.grad_accum = {self.grad_accum} micro-batches, "
                             f"got {len(micro_batches)}")
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            loss = self.loss(*self.split(batch))
            total += loss.detach()
            self.engine.backward(loss)
        grad_norm, applied = self.engine.step(lr)
        return StepResult(loss=total / self.grad_accum, grad_norm=grad_norm, applied=applied)

    @torch.no_grad()
    def validation_sums(self, batches) -> Tensor:
        """[3] float64 on the device, in eval mode: the sum over `batches`' samples of each sample's
        mean token loss, the sum of its squares, and the number of samples.

        Under CP a sample's tokens are spread over its CP group: their losses are summed across the
        group first, and only the group's first rank counts the sample, so that adding these sums
        over all ranks counts every sample of every DP replica once."""
        self.engine.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in batches:
            inputs, targets = self.split(batch)
            token_sums = self.engine(inputs, self.positions, targets).double().sum(dim=1)  # [B, N_local] -> [B]
            if self.layout.cp_degree > 1:
                dist.all_reduce(token_sums, group=self.layout.cp_group)
            if self.layout.cp_rank == 0:
                means = token_sums / self.seq_len  # [B]
                sums += torch.stack([means.sum(), means.square().sum(), means.new_tensor(float(len(means)))])
        self.engine.train()
        return sums


def build_train_step(cfg: TrainConfig, layout: ParallelLayout, device: torch.device,
                     weights: dict[str, Tensor] | None = None) -> TrainStep:
    """This rank's training step: the model (its attention over layout's CP group) with the weights of
    torch.manual_seed(cfg.seed), the same on every rank, or `weights` (a state dict), on `device`,
    under DeepSpeed (`Engine`)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, layout.cp_group if layout.cp_degree > 1 else None)
    if weights is not None:
        # Into the module before the engine wraps it: every ZeRO stage partitions these values.
        model.load_state_dict(weights)
    n_params = model.num_params()
    step = TrainStep(cfg, Engine(cfg, model.to(device), layout.world_size, device), layout, device)
    step.n_params, step.n_matmul_params = n_params, n_params - model.embed.weight.numel()
    return step
