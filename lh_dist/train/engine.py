"""DeepSpeed engine: building it, its config, saving and loading its state.

The DeepSpeed config dict is derived from `TrainConfig` (`deepspeed_config`),
never kept beside it. Gradients are averaged over the whole world, that is
DP x CP: CP ranks hold equally many tokens of the same sample, so the mean of
their local mean losses is the sample's mean loss.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lh_dist.config import TrainConfig
from lh_dist.parallel.comm import device_guessing_barriers


def deepspeed_clips(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether DeepSpeed clips the gradients and keeps their norm.

    Its ZeRO and bf16 optimizers compute the global norm while clipping and keep it
    (`get_global_grad_norm`). Plain fp32 without ZeRO clips with a helper that throws the
    norm away, so there `Engine.step` clips instead.
    """
    return cfg.parallel.zero_stage > 0 or device.type == "cuda"


def model_dtype(device: torch.device) -> torch.dtype:
    """The precision the engine runs the model in: bf16 on GPUs, float32 on CPUs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def deepspeed_config(cfg: TrainConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config for this run; DeepSpeed counts every rank (DP x CP) as data parallel."""
    bf16 = model_dtype(device) == torch.bfloat16
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "train_batch_size": cfg.data.micro_batch * cfg.optim.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip if deepspeed_clips(cfg, device) else 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                # The torch implementation needs no JIT-built extension (none exist on CPU machines).
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norm gains (1-D) are not regularized."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """The model under DeepSpeed, seen through what a training step needs: a forward, the backward
    of one micro-batch, and one optimizer step (learning rate, clipping, skipping a bad step).

    DeepSpeed averages gradients over every rank (DP x CP) in the backward of the last
    micro-batch, and counts micro-batches itself; nothing of that leaks out of here.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, world_size: int, device: torch.device):
        import deepspeed

        self.cfg, self.device = cfg, device
        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.optim.weight_decay),
            config=deepspeed_config(cfg, world_size, device),
        )

    @property
    def module(self) -> nn.Module:
        """The model itself (its parameters in the engine's precision)."""
        return self.ds.module

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (DeepSpeed divides by grad_accum)."""
        self.ds.backward(loss)
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # between boundaries DeepSpeed only counts the micro-step

    def step(self, lr: float) -> tuple[torch.Tensor | float, bool]:
        """Update with learning rate `lr` after the last micro-batch's backward; returns (the
        global gradient norm before clipping, whether the update was applied).

        A non-finite gradient (from a non-finite loss, or an overflow in backward) skips the
        update on every rank alike, since the norm is global: parameters and optimizer state stay
        as they were. The norm stays on the device (a tensor) where DeepSpeed keeps it so; the
        only wait for the GPU is DeepSpeed's own test of that norm.
        """
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        if deepspeed_clips(self.cfg, self.device):
            self.ds.step()
            norm = self.ds.get_global_grad_norm()
            return (math.nan if norm is None else norm), self.ds.was_step_applied()
        # Plain fp32 without ZeRO (CPU): DeepSpeed steps torch's AdamW directly, so clip and skip here.
        # The gradients are already averaged over all ranks, so the local norm is the global one.
        params = list(self.ds.module.parameters())
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip or math.inf)
        applied = bool(torch.isfinite(norm))
        if not applied:
            for p in params:
                p.grad = None  # AdamW skips parameters without a gradient, state included
        self.ds.step()
        return norm, applied

    def save(self, folder: Path) -> None:
        """Write DeepSpeed's model and optimizer shards into `folder` (all ranks call this)."""
        with device_guessing_barriers():
            self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        """Read what `save` wrote into `folder` (all ranks call this)."""
        with device_guessing_barriers():
            path, _ = self.ds.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
