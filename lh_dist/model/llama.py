"""Llama-3-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU.

The attention kernel of every layer is injected from outside (`AttentionFn`), so
this file knows nothing of Lighthouse, ring attention or process groups.

Options (in `ModelConfig`) let it compute what transformers computes for Llama,
Mistral, Qwen2 and Qwen3 checkpoints: `head_dim` apart from dim / n_heads,
`attention_bias` (q/k/v projections only), `qk_norm` (per-head RMSNorm of q and k
before RoPE), `rope_scaling` (linear, llama3, yarn; see `rope.py`) and
`tie_embeddings`. Parameter names: `layers.{i}.attention.{wq,wk,wv,wo}.weight`,
`wq/wk/wv.bias`, `attention.q_norm.weight`, `attention.k_norm.weight`.

Shape legend: B batch, N tokens (of this rank's shard), H query heads,
K key/value heads, D head dim, E model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lh_dist.config import ModelConfig
from lh_dist.model.loss import LMHead
from lh_dist.model.rope import apply_rope, rope_tables


class AttentionFn(Protocol):
    """Causal attention over rotated q [B, N, H, D], k/v [B, N, K, D] -> [B, N, H, D].

    score_q/score_k (q's and k's shapes), where given, are the vectors that importance scorers
    read instead of q and k; dense kernels ignore them. The model passes them only with qk_norm:
    its projections before the norm and RoPE (the norm sets every vector's rms to 1 before its
    gain, so lengths after it vary only through the gain; RoPE does not change lengths).
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, score_q: Tensor | None = None,
                 score_k: Tensor | None = None) -> Tensor: ...


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim [..., E], computed in at least fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in fp32 (fp64 stays fp64): bf16 sums of squares lose too much over large dims.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query self-attention [B, N, E] -> [B, N, E]: projections (q/k/v biases if
    attention_bias), per-head q/k RMSNorm (if qk_norm), RoPE, the injected kernel."""

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attention_fn = attention_fn

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim)  # [B, N, H, D]
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim)  # [B, N, K, D]
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim)  # [B, N, K, D]
        scored = {}
        if self.q_norm is not None:
            scored = {"score_q": q, "score_k": k}  # for scorers that read the lengths the norm removes
            q, k = self.q_norm(q), self.k_norm(k)  # over D, per token and head
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attention_fn(q, k, v, **scored)  # [B, N, H, D]
        return self.wo(out.reshape(b, n, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), [B, N, E] -> [B, N, E]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed-forward(norm(x)); [B, N, E]."""

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, attention_fn)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_hidden)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. `attention_fns[i]` is the attention of layer i."""

    def __init__(self, cfg: ModelConfig, attention_fns: list[AttentionFn]):
        super().__init__()
        if len(attention_fns) != cfg.n_layers:
            raise ValueError(f"attention_fns has {len(attention_fns)} entries, model.n_layers is {cfg.n_layers}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, fn) for fn in attention_fns)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = LMHead(cfg.dim, cfg.vocab_size)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """Normal(0, init_std) matrices, residual outputs scaled by 1/sqrt(2 n_layers), unit norm gains,
        zero biases."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                # Residual-branch outputs scaled down with depth keep the residual stream's variance flat.
                nn.init.normal_(p, std=std / (2 * self.cfg.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)

    def forward(self, tokens: Tensor, positions: Tensor, targets: Tensor | None = None) -> Tensor:
        """Logits [B, N, V] for tokens [B, N] at global positions [N]; with targets [B, N], the
        next-token losses [B, N] (fp32) instead, without holding every logit at once."""
        h = self.embed(tokens)  # [B, N, E]
        # Tables in float64, rotations in fp32 (fp64 for an fp64 model).
        cos, sin = (t.to(torch.promote_types(h.dtype, torch.float32)) for t in rope_tables(positions, self.cfg))
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.output(self.norm(h), targets)  # [B, N, V] or [B, N]

    def num_params(self) -> int:
        """Parameters, tied embeddings counted once."""
        return sum(p.numel() for p in self.parameters())
