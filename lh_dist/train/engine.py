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


def deepspeed_clips(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether DeepSpeed clips the gradients and keeps their norm.

    Its ZeRO and bf16 optimizers compute the global norm while clipping and keep it
    (`get_global_grad_norm`). Plain fp32 without ZeRO clips with a helper that throws the
    norm away, so there `optimizer_step` clips instead.
    """
    return cfg.parallel.zero_stage > 0 or device.type == "cuda"


def deepspeed_config(cfg: TrainConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config for this run; DeepSpeed counts every rank (DP x CP) as data parallel."""
    bf16 = device.type == "cuda"
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


def build_engine(cfg: TrainConfig, model: nn.Module, world_size: int, device: torch.device):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=deepspeed_config(cfg, world_size, device),
    )
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def save_engine(engine, folder: Path) -> None:
    """Write DeepSpeed's model and optimizer shards into `folder` (all ranks call this)."""
    engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)


def load_engine(engine, folder: Path) -> None:
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")


def optimizer_step(engine, cfg: TrainConfig, device: torch.device) -> float:
    """`engine.step()` at the end of a gradient accumulation: clip, update, and return the global
    gradient norm before clipping, the one the clipping used (NaN if DeepSpeed kept none).

    On the plain fp32 path DeepSpeed has averaged the gradients over all ranks (DP x CP)
    during the last backward, so every rank holds the full gradient and its local norm
    is the global one.
    """
    if deepspeed_clips(cfg, device):
        engine.step()
        norm = engine.get_global_grad_norm()
    else:
        max_norm = cfg.optim.grad_clip or math.inf  # 0 disables clipping; the norm is still measured
        norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), max_norm)
        engine.step()
    return float(norm) if norm is not None else math.nan
