"""Load a trained checkpoint and run its model for evaluation, on one device or across a CP group.

`ModelRunner` is the only evaluation code that touches devices and process groups; the
evaluations themselves (`passkey`, `position_loss`, `retrieval`) see plain functions:
`last_logits(tokens [B, N]) -> [B, V]`, `token_losses(batch [B, N + 1]) -> [B, N]` and
`next_token_argmax(tokens [B, N], positions [P]) -> [B, P]`.

Under context parallelism (`torchrun --nproc-per-node W`, cp_degree W) every rank holds the
whole prompt, keeps its zigzag shard (chunks r and 2W-1-r) and runs ring attention for the
dense layers. The last token lies in chunk 2W-1, which CP rank 0 holds at its last local
position; rank 0 broadcasts those logits so that every rank returns the same answer.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from lh_dist.assembly.model import PHASES, build_model, set_phase
from lh_dist.checkpoint.format import (STEP_DIR, checkpoint_config, flat_config, load_model_state, resolve_checkpoint,
                                      setting_changes, trainer_state)
from lh_dist.config import TrainConfig, validate_lighthouse_shape
from lh_dist.parallel.device import local_device
from lh_dist.parallel.distributed import close_distributed, init_distributed
from lh_dist.parallel.sharding import check_zigzag_length, zigzag_positions, zigzag_shard, zigzag_unshard


def eval_config(folder: Path, overrides: list[str] = ()) -> TrainConfig:
    """The config of checkpoint `folder` with `overrides`, loaded as for one rank whatever the training
    run's layout: the weakest of the layout's rules (a Lighthouse tiling that fits some CP degree fits one
    rank). What an evaluation needs of its own layout, `ModelRunner.check_length` checks for its phase."""
    return checkpoint_config(folder, [*overrides, "parallel.cp_degree=1"])


def _model_changes(saved: TrainConfig, cfg: TrainConfig) -> str:
    """The model fields in which `cfg` differs from the checkpoint's own config, "name old -> new"."""
    old, new = flat_config({"model": saved.to_dict()["model"]}), flat_config({"model": cfg.to_dict()["model"]})
    return ", ".join(setting_changes(old, new, new))


def check_eval_world(cp_degree: int) -> None:
    """ValueError unless this job has exactly cp_degree ranks (evaluation's CP group is the world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cp_degree < 1:
        raise ValueError(f"--cp must be a positive integer, got {cp_degree}")
    if world != cp_degree:
        raise ValueError(f"--cp {cp_degree} needs exactly {cp_degree} ranks (torchrun --nproc-per-node "
                         f"{cp_degree}); this job has {world}")


def init_eval_distributed(cp_degree: int, device: torch.device) -> tuple:
    """(cp_group, cp_rank, initialized_here): (None, 0, False) on one device, else the whole world
    as the CP group, initializing torch.distributed if nobody has yet.

    Evaluation has no data parallelism: all ranks work on the same prompt or batch. The world's size
    is the caller's to check first (`check_eval_world`), before it loads anything.
    """
    if cp_degree == 1:
        return None, 0, False
    initialized_here = not dist.is_initialized()
    if initialized_here:
        init_distributed(device)  # as training starts it
    return dist.group.WORLD, dist.get_rank(), initialized_here


class ModelRunner:
    """A checkpoint's model in eval mode, in one attention phase, on one device or a CP group."""

    def __init__(self, checkpoint: str | Path, *, device: str = "auto", cp_degree: int = 1,
                 phase: str = "dense", overrides: list[str] = ()):
        if phase not in PHASES:
            raise ValueError(f"--phase must be one of {PHASES}, got {phase!r}")
        self.device = local_device(device, option="--device", cp_option="--cp")
        self.skipped: list[str] = []  # for a run directory: its newer checkpoints passed over, and why
        self.folder = resolve_checkpoint(checkpoint, self.skipped)
        check_eval_world(cp_degree)
        cfg = eval_config(self.folder, overrides)
        # Evaluation needs neither recomputation nor compilation.
        self.cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, cp_degree=cp_degree, activation_checkpointing="none", compile=False))
        self.cp_degree, self.phase = cp_degree, phase
        self.cp_group, self.cp_rank, self._owns_group = init_eval_distributed(cp_degree, self.device)
        self.step = int(STEP_DIR.match(self.folder.name).group(1))
        self.trained_phase = trainer_state(self.folder).get("phase")  # None if not recorded

        self.model = build_model(self.cfg, self.cp_group)
        try:
            self.model.load_state_dict(load_model_state(self.folder))
        except RuntimeError:  # missing, unexpected or resized weights: an override changed the model's shape
            raise ValueError(f"the weights of {self.folder} do not fit the model with "
                             f"{_model_changes(eval_config(self.folder), self.cfg)} (the checkpoint's value -> "
                             f"this one's): override only settings that keep the weights' shapes") from None
        self.model.to(self.device).eval()
        set_phase(self.model, phase)

    @property
    def is_main(self) -> bool:
        """Whether this rank writes files and prints."""
        return self.cp_rank == 0

    def check_length(self, seq_len: int, name: str) -> None:
        """Raise ValueError if `seq_len` cannot be sharded over the CP group or tiled by Lighthouse."""
        if self.cp_degree > 1:
            try:
                check_zigzag_length(seq_len, self.cp_degree)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.phase == "lighthouse":
            cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, seq_len=seq_len))
            validate_lighthouse_shape(cfg)

    def _forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N_local, V] (bf16 on GPUs) of this rank's shard of tokens [B, N], or with this
        rank's targets [B, N_local] its next-token losses [B, N_local] (fp32, from the model's chunked
        loss: no [N, V] logits)."""
        n = tokens.shape[1]
        tokens = tokens.to(self.device)
        if self.cp_degree > 1:
            tokens = zigzag_shard(tokens, 1, self.cp_degree, self.cp_rank)
        positions = zigzag_positions(n, self.cp_degree, self.cp_rank, self.device) if self.cp_degree > 1 \
            else torch.arange(n, device=self.device)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.device.type == "cuda"):
            return self.model(tokens, positions, targets)

    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (fp32, on CPU) at the last position of tokens [B, N]; the same on every rank."""
        last = self._forward(tokens)[:, -1].float()  # on CP rank 0 this is global position N - 1
        if self.cp_degree > 1:
            last = last.contiguous()
            dist.broadcast(last, src=dist.get_global_rank(self.cp_group, 0), group=self.cp_group)
        return last.cpu()

    def next_token_argmax(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Argmax over the vocabulary [B, P] (int64, on CPU) of the logits at global `positions` [P] of
        tokens [B, N]: the token each position predicts next. The same on every rank."""
        n = tokens.shape[1]
        local = zigzag_positions(n, self.cp_degree, self.cp_rank) if self.cp_degree > 1 else torch.arange(n)
        index_of = torch.full((n,), -1, dtype=torch.long)
        index_of[local] = torch.arange(len(local))
        local_index = index_of[positions]  # [P]: index in this rank's shard, -1 where another rank holds it
        mine = local_index >= 0

        # The output head sees only the hidden states of the positions asked for, so that the logits
        # are [B, P_local, V], not the whole shard's [B, N_local, V] (at 64K tokens and a 50K
        # vocabulary, 13 GB in fp32). The model taking output positions itself would spare the hook.
        def select(head, args):
            return (args[0][:, local_index[mine].to(args[0].device)], *args[1:])

        hook = self.model.output.register_forward_pre_hook(select)
        try:
            predicted = self._forward(tokens).argmax(dim=-1).cpu()  # [B, P_local]
        finally:
            hook.remove()
        result = torch.full((tokens.shape[0], len(positions)), -1, dtype=torch.long)  # [B, P]
        result[:, mine] = predicted
        if self.cp_degree > 1:
            result = result.to(self.device)
            dist.all_reduce(result, op=dist.ReduceOp.MAX, group=self.cp_group)  # each position: its rank's id
            result = result.cpu()
        return result

    def token_losses(self, batch: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy [B, N] (fp32, on CPU) of batch [B, N + 1]; the same on every rank."""
        inputs, targets = batch[:, :-1], batch[:, 1:].to(self.device)
        if self.cp_degree > 1:
            targets = zigzag_shard(targets, 1, self.cp_degree, self.cp_rank)
        losses = self._forward(inputs, targets)  # [B, N_local]
        if self.cp_degree > 1:
            shards = [torch.empty_like(losses) for _ in range(self.cp_degree)]
            dist.all_gather(shards, losses.contiguous(), group=self.cp_group)
            losses = zigzag_unshard(shards, dim=1)
        return losses.cpu()

    def close(self) -> None:
        """Tear down the process group if this runner started it."""
        if self._owns_group:
            close_distributed(clean=True)
