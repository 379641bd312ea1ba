"""`lh-train`: train from a YAML config plus `section.field=value` overrides.

    lh-train --config configs/tiny-cpu.yaml parallel.cp_degree=1 schedule.steps=100
    torchrun --nproc-per-node 2 -m lh_dist.train.cli --config configs/tiny-cpu.yaml parallel.cp_degree=2
    lh-train --config configs/paper-530m-98k.yaml --dry-run --world-size 16
    lh-train --config configs/tiny-cpu.yaml --print-config     # every field, resolved

Config sections: model, lighthouse, parallel, data, optim, schedule, checkpoint, logging
(fields and their meaning: lh_dist/config.py; --print-config lists them with their values).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from lh_dist.config import ConfigError, TrainConfig, load_config


def resolve_degrees(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(dp, cp) for this world size; ConfigError naming the field when they do not fit."""
    cp = cfg.parallel.cp_degree
    if world_size % cp:
        raise ConfigError(f"parallel.cp_degree={cp} must divide the world size {world_size}")
    dp = cfg.parallel.dp_degree or world_size // cp
    if dp * cp != world_size:
        raise ConfigError(f"parallel.dp_degree must be 0 (auto) or world size / parallel.cp_degree = "
                          f"{world_size // cp}, got {dp}")
    return dp, cp


def describe_plan(cfg: TrainConfig, world_size: int) -> str:
    """The run's layout and batch math, computed without any process group or device."""
    from lh_dist.parallel.mesh import plan_layout
    from lh_dist.train.build import dense_layer_ids, lighthouse_length

    dp, cp = resolve_degrees(cfg, world_size)
    plan = plan_layout(world_size, dp, cp)
    if cp > 1:
        sharding = (f"cut into {2 * cp} zigzag chunks, 2 per rank: {cfg.data.seq_len // cp:,} tokens per rank")
    else:
        sharding = "not sharded (cp 1)"
    seqs = cfg.data.micro_batch * cfg.optim.grad_accum * dp
    lines = [
        f"world size {world_size} = dp {dp} x cp {cp} (CP innermost: consecutive ranks share a sample)",
        f"CP groups (ranks sharing one sample): {list(plan.cp_group_ranks)}",
        f"DP groups: {list(plan.dp_group_ranks)}",
        f"sequence {cfg.data.seq_len:,} tokens, {sharding}",
        f"batch: micro_batch {cfg.data.micro_batch} x grad_accum {cfg.optim.grad_accum} x dp {dp} = {seqs} "
        f"sequences = {seqs * cfg.data.seq_len:,} tokens per step",
        f"steps {cfg.schedule.steps}: Lighthouse for {cfg.schedule.lighthouse_steps}, dense after",
    ]
    if cfg.schedule.lighthouse_steps:
        lh = cfg.lighthouse
        s = lighthouse_length(cfg)
        lines.append(f"Lighthouse L={lh.levels} p={lh.pooling} k={lh.topk}: S = {s:,} ({s / cfg.data.seq_len:.3f} N); "
                     f"dense layers {sorted(dense_layer_ids(cfg))}")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    if not str(text).isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"world size must be a positive integer, got {text!r}")
    return int(text)


def check_resume_arg(resume: str, overwrite: bool, rewind: bool) -> None:
    """ConfigError for a --resume / --overwrite / --rewind combination that cannot work (reads nothing big)."""
    from lh_dist.train.checkpoint import STEP_DIR

    if resume not in ("auto", "none"):
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"--resume must be 'auto', 'none' or an existing checkpoint folder, got {resume!r}")
        if not STEP_DIR.match(path.name):
            hint = (" (a run directory: resume it with --resume auto and logging.run_dir set to it)"
                    if (path / "checkpoints").is_dir() else
                    " (an incomplete save)" if path.name.startswith(".partial-") else "")
            raise ConfigError(f"--resume must be 'auto', 'none' or a checkpoint folder step_XXXXXXXX, got "
                              f"{resume!r}{hint}")
    if rewind and resume in ("auto", "none"):
        raise ConfigError("--rewind goes with --resume <checkpoint folder>")
    if overwrite and resume == "auto":
        raise ConfigError("--overwrite goes with --resume none (or another run's checkpoint folder)")


def _fail(kind: str, error: Exception) -> int:
    # Every rank fails the same way; one line is enough.
    if os.environ.get("RANK", "0") == "0":
        print(f"lh-train: {kind}: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lh-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="run file, e.g. configs/tiny-cpu.yaml (default: the "
                                                         "built-in defaults of lh_dist/config.py)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (newest valid checkpoint in the run dir, if any), 'none' (refused if the "
                             "run dir holds checkpoints, unless --overwrite), or a checkpoint folder (default: auto)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --resume none or another run's checkpoint: move the run dir's previous "
                             "checkpoints, events and config to <run_dir>/archive/<time>/ first")
    parser.add_argument("--rewind", action="store_true",
                        help="allow --resume from an older checkpoint of this run; the later ones are removed "
                             "once the first new checkpoint is complete")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print the DP x CP layout and batch math, and exit")
    parser.add_argument("--world-size", type=_positive_int, default=None,
                        help="number of ranks --dry-run plans for (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every field, overrides applied) as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. schedule.steps=100 parallel.cp_degree=1")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if args.dry_run:
            world = args.world_size or _positive_int(os.environ.get("WORLD_SIZE", "1"))
            try:
                print(describe_plan(cfg, world))
            except ConfigError as e:
                if args.world_size is None and "world size" in str(e):
                    raise ConfigError(f"{e} (--dry-run plans for {world} rank(s): pass --world-size N to plan "
                                      f"for N ranks)") from None
                raise
            return 0
        check_resume_arg(args.resume, args.overwrite, args.rewind)
        from lh_dist.train.run_dir import check_run_dir

        check_run_dir(cfg.logging.run_dir)
    except (ConfigError, argparse.ArgumentTypeError) as e:
        return _fail("config error", e)

    from lh_dist.data.loader import CorruptDataError
    from lh_dist.train.loop import Trainer
    from lh_dist.train.run_dir import RunDirError

    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, rewind=args.rewind)
        return trainer.run()
    except ConfigError as e:
        return _fail("config error", e)
    except RunDirError as e:
        return _fail("error", e)
    except CorruptDataError as e:
        return _fail("data error", e)


if __name__ == "__main__":
    sys.exit(main())
