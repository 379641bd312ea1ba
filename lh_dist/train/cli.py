r"""`lh-train`: train from a YAML config plus `section.field=value` overrides.

    lh-train --config configs/tiny-cpu.yaml parallel.cp_degree=1 schedule.steps=100
    torchrun --nproc-per-node 2 -m lh_dist.train.cli --config configs/tiny-cpu.yaml parallel.cp_degree=2
    lh-train --config configs/paper-530m-98k.yaml --dry-run --world-size 16
    lh-train --config configs/paper-530m-98k.yaml --dry-run --world-size 16 --json   # for scripts
    lh-train --config configs/tiny-cpu.yaml --print-config     # every field, resolved
    lh-train --config runs/qwen3-import/config.yaml --init-from runs/qwen3-import logging.run_dir=runs/qwen3-long \
        data.path=runs/data/web     # a new run from an imported model's weights (lh-import)

Config sections: model, lighthouse, parallel, data, optim, schedule, checkpoint, logging
(fields and their meaning: lh_dist/config.py; --print-config lists them with their values).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import yaml

from lh_dist.config import ConfigError, TrainConfig, load_config
from lh_dist.parallel.device import use_expandable_segments


def plan_run(cfg: TrainConfig, world_size: int) -> dict:
    """The run's layout and batch math on `world_size` ranks, computed without any process group or
    device: what `--dry-run --json` prints (and `describe_plan` puts in words)."""
    from lh_dist.parallel.mesh import plan_layout, resolve_degrees
    from lh_dist.assembly.model import dense_layer_ids, lighthouse_length

    dp, cp = resolve_degrees(cfg, world_size)
    layout = plan_layout(world_size, dp, cp)
    sequences = cfg.data.micro_batch * cfg.optim.grad_accum * dp
    plan = {
        "world_size": world_size, "dp_degree": dp, "cp_degree": cp,
        "cp_groups": [list(ranks) for ranks in layout.cp_group_ranks],
        "dp_groups": [list(ranks) for ranks in layout.dp_group_ranks],
        "seq_len": cfg.data.seq_len, "tokens_per_rank": cfg.data.seq_len // cp,
        "micro_batch": cfg.data.micro_batch, "grad_accum": cfg.optim.grad_accum,
        "sequences_per_step": sequences, "tokens_per_step": sequences * cfg.data.seq_len,
        "steps": cfg.schedule.steps, "lighthouse_steps": cfg.schedule.lighthouse_steps, "lighthouse": None,
    }
    if cfg.schedule.lighthouse_steps:
        lh = cfg.lighthouse
        plan["lighthouse"] = {"levels": lh.levels, "pooling": lh.pooling, "topk": lh.topk,
                              "gathered_length": lighthouse_length(cfg), "dense_layers": sorted(dense_layer_ids(cfg))}
    return plan


def describe_plan(plan: dict) -> str:
    """`plan_run`'s plan for people: one line per fact."""
    dp, cp, n = plan["dp_degree"], plan["cp_degree"], plan["seq_len"]
    if cp > 1:
        sharding = f"cut into {2 * cp} zigzag chunks, 2 per rank: {plan['tokens_per_rank']:,} tokens per rank"
    else:
        sharding = "not sharded (cp 1)"
    lines = [
        f"world size {plan['world_size']} = dp {dp} x cp {cp} (CP innermost: consecutive ranks share a sample)",
        f"CP groups (ranks sharing one sample): {[tuple(g) for g in plan['cp_groups']]}",
        f"DP groups: {[tuple(g) for g in plan['dp_groups']]}",
        f"sequence {n:,} tokens, {sharding}",
        f"batch: micro_batch {plan['micro_batch']} x grad_accum {plan['grad_accum']} x dp {dp} = "
        f"{plan['sequences_per_step']} sequences = {plan['tokens_per_step']:,} tokens per step",
        f"steps {plan['steps']}: Lighthouse for {plan['lighthouse_steps']}, dense after",
    ]
    if plan["lighthouse"] is not None:
        lh = plan["lighthouse"]
        s = lh["gathered_length"]
        lines.append(f"Lighthouse L={lh['levels']} p={lh['pooling']} k={lh['topk']}: S = {s:,} ({s / n:.3f} N); "
                     f"dense layers {lh['dense_layers']}")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    if not str(text).isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"world size must be a positive integer, got {text!r}")
    return int(text)


def _say(line: str, file=None) -> None:
    """Print on rank 0 only (to stdout unless `file`): every rank ends the same way, and one line is enough."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=file)


def _fail(kind: str, error: Exception) -> int:
    _say(f"lh-train: {kind}: {error}", sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """`lh-train`: the trainer's exit status (0, or 75 after a stop signal), 2 for a user error (one line),
    130 when interrupted (Ctrl-C before the first step, or twice)."""
    use_expandable_segments()  # before CUDA starts: long sequences fragment the default allocator
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
    parser.add_argument("--init-from", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="start a new run at step 0 from the weights of a run directory's newest checkpoint "
                             "(e.g. one written by lh-import) or of a checkpoint folder: fresh optimizer and data "
                             "order; the model must match but for model.rope_theta, model.rope_scaling, "
                             "model.attention_backend and model.init_std. A run dir that holds checkpoints "
                             "resumes instead")
    parser.add_argument("--accept-changed-data", action="store_true",
                        help="resume although a dataset's content differs from what the checkpoint recorded (it was "
                             "rebuilt in place): the data order restarts from the recorded sample counter over "
                             "different documents, so the resume is not exact")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print the DP x CP layout and batch math, and exit")
    parser.add_argument("--world-size", type=_positive_int, default=None,
                        help="number of ranks --dry-run plans for (default: $WORLD_SIZE, else 1)")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: print the plan as one JSON object (its numbers, and its words "
                             "under \"text\"), for scripts")
    parser.add_argument("--ranks-per-node", action="store_true",
                        help="print how many ranks a node starts when nobody says (one per visible GPU; 2 "
                             "without GPUs or with device=cpu) and exit")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every field, overrides applied) as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. schedule.steps=100 parallel.cp_degree=1")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.json and not args.dry_run:
            raise ConfigError("--json goes with --dry-run")
        world = None  # --print-config and --ranks-per-node alone plan for no world
        if args.dry_run or not (args.print_config or args.ranks_per_node):
            world = (args.world_size if args.dry_run else None) or _positive_int(os.environ.get("WORLD_SIZE", "1"))
        try:
            cfg = load_config(args.config, args.overrides, world)
            plan = plan_run(cfg, world) if args.dry_run else None
        except ConfigError as e:
            if args.dry_run and args.world_size is None and "world size" in str(e):
                raise ConfigError(f"{e} (--dry-run plans for {world} rank(s): pass --world-size N to plan "
                                  f"for N ranks)") from None
            raise
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if args.ranks_per_node:
            import torch

            from lh_dist.parallel.device import default_ranks_per_node

            print(default_ranks_per_node(cfg.device, torch.cuda.device_count()))
            return 0
        if args.dry_run:
            print(json.dumps(plan | {"text": describe_plan(plan)}) if args.json else describe_plan(plan))
            return 0
        from lh_dist.checkpoint.checkpointer import check_resume_arg
        from lh_dist.checkpoint.run_dir import check_run_dir

        # Checked again where the run dir is opened (Trainer); here it fails before any process group.
        check_resume_arg(args.resume, args.overwrite, args.rewind, cfg.logging.run_dir)
        if args.init_from is not None and args.resume not in ("auto", "none"):
            raise ConfigError(f"--init-from starts a new run from weights; it does not go with --resume "
                              f"{args.resume}")

        check_run_dir(cfg.logging.run_dir)
    except (ConfigError, argparse.ArgumentTypeError) as e:
        return _fail("config error", e)

    from lh_dist.data.loader import CorruptDataError
    from lh_dist.parallel.distributed import close_distributed
    from lh_dist.train.loop import NothingToTrain, Trainer
    from lh_dist.checkpoint.run_dir import RunDirError

    ended_together = False  # every rank returned from the trainer: finished, or stopped on a signal
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, rewind=args.rewind,
                          init_from=args.init_from, accept_changed_data=args.accept_changed_data)
        code = trainer.run()
        ended_together = True
        return code
    except KeyboardInterrupt:  # Ctrl-C before training started, or pressed twice: the summary said the rest
        _say("lh-train: interrupted", sys.stderr)
        return 128 + signal.SIGINT
    except NothingToTrain as e:
        ended_together = True
        _say(f"lh-train: nothing to train: {e}")
        return 0
    except ConfigError as e:
        return _fail("config error", e)
    except RunDirError as e:
        return _fail("error", e)
    except CorruptDataError as e:
        return _fail("data error", e)
    finally:
        close_distributed(clean=ended_together)


if __name__ == "__main__":
    sys.exit(main())
