"""Build the model for a run: choose each layer's attention, then apply activation checkpointing,
activation offloading and compile. This is the one place where the model meets parallelism."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lh_dist.assembly.offload import ActivationOffload
from lh_dist.config import TrainConfig
from lh_dist.model import Transformer
from lh_dist.ops.attention import attention

PHASES = ("lighthouse", "dense")


class PhasedAttention(nn.Module):
    """A layer's attention: Lighthouse or dense, switched by `phase` without touching weights."""

    def __init__(self, dense_fn, lighthouse_fn=None, score_inputs: bool = True):
        super().__init__()
        self.dense_fn, self.lighthouse_fn = dense_fn, lighthouse_fn
        # False: Lighthouse scores the q/k it attends with, not the model's score inputs.
        self.score_inputs = score_inputs
        self.phase = "dense"

    @property
    def selects(self) -> bool:
        """Whether this layer runs Lighthouse now (and so selects)."""
        return self.phase == "lighthouse" and self.lighthouse_fn is not None

    def scored(self, q: Tensor, k: Tensor, score_q: Tensor | None = None,
               score_k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The query and key vectors Lighthouse's scorer reads, given this layer's inputs."""
        if self.score_inputs and score_q is not None:
            return score_q, score_k
        return q, k

    def forward(self, q: Tensor, k: Tensor, v: Tensor, score_q: Tensor | None = None,
                score_k: Tensor | None = None) -> Tensor:
        """The model's `AttentionFn`: Lighthouse scores score_q/score_k where given; dense ignores them."""
        if self.selects:
            if not self.score_inputs:
                score_q = score_k = None
            return self.lighthouse_fn(q, k, v, score_q=score_q, score_k=score_k)
        return self.dense_fn(q, k, v)


def dense_layer_ids(cfg: TrainConfig) -> set[int]:
    """Layers that stay dense in the Lighthouse phase (lighthouse.dense_layers, negatives from the end)."""
    n = cfg.model.n_layers
    return {i % n for i in cfg.lighthouse.dense_layers}


def _attention_fns(cfg: TrainConfig, cp_group) -> tuple:
    """(dense_fn, lighthouse_fn) for local execution or for the CP group."""
    from lh_dist.ops.lighthouse import LighthouseParams, lighthouse_attention

    backend = cfg.model.attention_backend
    params = LighthouseParams.from_config(cfg.lighthouse, attention_backend=backend)
    if cp_group is None:
        return (partial(attention, causal=True, backend=backend), partial(lighthouse_attention, params=params))
    from lh_dist.parallel.lighthouse_cp import lighthouse_cp_attention
    from lh_dist.parallel.ring_attention import ring_attention

    return (partial(ring_attention, group=cp_group, backend=backend),
            partial(lighthouse_cp_attention, group=cp_group, params=params, exchange=cfg.parallel.lighthouse_exchange))


# What `parallel.activation_checkpointing: selective` keeps from the forward: the outputs of the
# attention kernels (output and LSE, or a Lighthouse layer's gathered tensors), so that backward
# recomputes the matmuls and the elementwise work of a block but never its attention.
KEPT_OPS = ("lh_dist::attention_forward", "lh_dist::lighthouse_forward")


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    name = op.name() if isinstance(op, torch._ops.OpOverload) else ""
    return CheckpointPolicy.MUST_SAVE if name in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, mode: str):
    """`forward` recomputed in backward: every op ("full"), or all but attention ("selective")."""
    # What "selective" keeps stays on the device, also under activation offloading's hooks
    # (respect_saved_tensors_hooks=False: torch's legacy behaviour, said explicitly).
    options = {} if mode == "full" else {"context_fn": partial(create_selective_checkpoint_contexts, _keep_attention),
                                         "respect_saved_tensors_hooks": False}

    # A function of this module, not a partial of `checkpoint`: torch.compile starts tracing at
    # this frame and turns the checkpoint into one region of its graph (it does not trace a
    # checkpoint entered from outside).
    def checkpointed_forward(*args):
        return checkpoint(forward, *args, use_reentrant=False, **options)

    return checkpointed_forward


def build_model(cfg: TrainConfig, cp_group=None) -> Transformer:
    """The run's Transformer: each layer's attention chosen (Lighthouse or dense, local or over
    `cp_group`), blocks checkpointed as `parallel.activation_checkpointing` says, their inputs
    offloaded to host memory if `parallel.activation_offload` is "cpu" (the first
    `parallel.activation_offload_layers` blocks, 0: all), then compiled block by
    block if `parallel.compile`. Weights are fp32 on the CPU; the caller moves them.
    `model.activation_offload` is the `ActivationOffload` in use, or None."""
    dense_fn, lighthouse_fn = _attention_fns(cfg, cp_group)
    always_dense = dense_layer_ids(cfg)
    score_inputs = cfg.lighthouse.score_from == "projections"
    attention_fns = [PhasedAttention(dense_fn, None if i in always_dense else lighthouse_fn, score_inputs)
                     for i in range(cfg.model.n_layers)]
    model = Transformer(cfg.model, attention_fns)
    mode = cfg.parallel.activation_checkpointing
    offload = ActivationOffload() if cfg.parallel.activation_offload == "cpu" else None
    # The first blocks' inputs wait longest for their backward: they are the ones offloaded.
    offloaded = (cfg.parallel.activation_offload_layers or cfg.model.n_layers) if offload is not None else 0
    for i, layer in enumerate(model.layers):
        if mode != "none":
            # Activation memory falls from every block's intermediates to each block's input
            # (plus, for "selective", its attention outputs).
            layer.forward = _checkpointed(layer.forward, mode)
        if i < offloaded:
            # The block's input goes to host memory. The hooks that move it must stay outside the
            # compiled region, so the block's forward is compiled, not the module's call around it.
            forward = torch.compile(layer.forward) if cfg.parallel.compile else layer.forward
            layer.forward = offload.wrap(forward)
        elif cfg.parallel.compile:
            # The attention kernels are custom ops, so each block, checkpoint included, traces as
            # one graph and its norms, RoPE, SwiGLU and casts fuse around them.
            layer.compile()
    # Read by benchmarks (host memory held); not a module, so not part of the state dict.
    model.activation_offload = offload
    return model


def set_phase(model: nn.Module, phase: str) -> None:
    """Switch every layer's attention to `phase` ("lighthouse" or "dense"); weights are untouched."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    for module in model.modules():
        if isinstance(module, PhasedAttention):
            module.phase = phase


def phase_at(cfg: TrainConfig, step: int) -> str:
    """Phase of optimizer step `step` (0-based): Lighthouse for the first schedule.lighthouse_steps."""
    return "lighthouse" if step < cfg.schedule.lighthouse_steps else "dense"


def lighthouse_length(cfg: TrainConfig) -> int:
    """Gathered length S = N / p^(L-1) + (L-1) p k of a Lighthouse layer for the training sequence."""
    from lh_dist.ops.lighthouse import LighthouseParams

    return LighthouseParams.from_config(cfg.lighthouse).gathered_length(cfg.data.seq_len)

