"""`lh-eval`: evaluate a checkpoint (a step_XXXXXXXX folder, or a run directory for its newest one).

    lh-eval passkey runs/tiny-cpu --lengths 256,512,1024
    lh-eval loss runs/tiny-cpu --batches 16 --buckets 8 --spacing log
    lh-eval loss runs/tiny-cpu --phase lighthouse lighthouse.topk=512   # with a config override
    torchrun --nproc-per-node 4 -m lh_dist.eval.cli passkey RUN --cp 4 --lengths 65536,98304

Results go to --out (default <run_dir>/eval/step_XXXXXXXX/), each JSON beside its PNG:
  passkey.json        lengths [L], depths [D], accuracy [D][L], predictions [D][L][10] (the digit
                      predicted for needle 0..9), mean; the pass-key test always runs dense attention.
  position_loss.json  loss (token mean), tokens, sequences, buckets [{start, end (exclusive), tokens, loss}].
Both also record checkpoint, step, trained_phase, eval_phase, cp_degree and device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lh_dist.config import ConfigError


def _int_list(name: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} must list at least one value")
        return values
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lh-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", type=Path, help="checkpoint folder step_XXXXXXXX, or a run directory")
    common.add_argument("--out", type=Path, help="output folder (default: <run_dir>/eval/<checkpoint name>)")
    common.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    common.add_argument("--cp", type=int, default=1,
                        help="context-parallel degree; run under torchrun with this many ranks (default: 1)")
    common.add_argument("overrides", nargs="*", help="config overrides section.field=value")

    passkey = commands.add_parser("passkey", parents=[common], help="pass-key retrieval heatmap (dense attention)")
    passkey.add_argument("--lengths", type=_int_list("--lengths"),
                         help="context lengths in tokens (default: the paper's 4K..96K scaled to the training "
                              "seq_len: seq_len x 1/24, 1/12, 1/6, 1/3, 2/3, 1)")
    passkey.add_argument("--depths", type=_int_list("--depths"), default=[0, 15, 30, 50, 70, 85, 100],
                         help="needle depths in percent (default: 0,15,30,50,70,85,100)")
    passkey.add_argument("--seed", type=int, default=0, help="filler seed (default: 0)")
    passkey.add_argument("--batch-size", type=int, default=1, help="prompts per forward pass (default: 1)")
    passkey.add_argument("--tokenizer", help="tokenizer spec: 'byte' or a tokenizer.json (default: the one "
                                             "recorded in the training dataset's lh_data.json)")

    loss = commands.add_parser("loss", parents=[common], help="validation loss by position bucket")
    loss.add_argument("--seq-len", type=int, help="sequence length (default: the config's data.seq_len)")
    loss.add_argument("--batches", type=int, default=8, help="validation batches (default: 8)")
    loss.add_argument("--micro-batch", type=int, default=1, help="sequences per batch (default: 1)")
    loss.add_argument("--buckets", type=int, default=8, help="position buckets (default: 8)")
    loss.add_argument("--spacing", default="linear", help="bucket spacing: linear or log (default: linear)")
    loss.add_argument("--phase", default="dense",
                      help="attention of the non-dense layers: dense or lighthouse (default: dense)")
    loss.add_argument("--data", help="dataset folder or URL (default: the config's data.path)")
    return parser


def _out_dir(args, runner) -> Path:
    out = args.out or runner.folder.parent.parent / "eval" / runner.folder.name
    out.mkdir(parents=True, exist_ok=True)
    return out


def _header(runner) -> dict:
    return {"checkpoint": str(runner.folder), "step": runner.step, "trained_phase": runner.trained_phase,
            "eval_phase": runner.phase, "cp_degree": runner.cp_degree, "device": str(runner.device)}


def _warn_untrained_lengths(runner, lengths: list[int], name: str) -> None:
    trained = runner.cfg.data.seq_len
    longer = [n for n in lengths if n > trained]
    if longer and runner.is_main:
        ratio = max(longer) / trained
        print(f"lh-eval: warning: {name} {', '.join(f'{n:,}' for n in longer)} longer than the trained length "
              f"{trained:,} (data.seq_len): the model never saw those positions, and a dense forward pass over "
              f"{max(longer):,} tokens takes up to {ratio ** 2:,.0f}x as long as one over {trained:,}",
              file=sys.stderr)


def run_passkey(args) -> Path | None:
    from lh_dist.data.loader import read_dataset_info
    from lh_dist.data.tokenizer import load_tokenizer
    from lh_dist.eval.passkey import default_lengths, passkey_grid
    from lh_dist.eval.plotting import passkey_heatmap
    from lh_dist.eval.runner import ModelRunner

    if any(not 0 <= d <= 100 for d in args.depths):
        raise ValueError(f"--depths must be percentages in [0, 100], got {args.depths}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    runner = ModelRunner(args.checkpoint, device=args.device, cp_degree=args.cp, phase="dense",
                         overrides=args.overrides)
    tokenizer = load_tokenizer(args.tokenizer or read_dataset_info(runner.cfg.data.path).get("tokenizer", "byte"))
    lengths = args.lengths or default_lengths(runner.cfg.data.seq_len, tokenizer, multiple=2 * args.cp)
    if not lengths:
        raise ValueError(f"the training seq_len {runner.cfg.data.seq_len} is too short for the default lengths; "
                         f"pass --lengths")
    for n in lengths:
        runner.check_length(n, "--lengths")
    _warn_untrained_lengths(runner, lengths, "--lengths")
    log = print if runner.is_main else None
    grid = passkey_grid(runner.last_logits, tokenizer, lengths, args.depths, seed=args.seed,
                        batch_size=args.batch_size, log=log)
    runner.close()
    if not runner.is_main:
        return None
    out = _out_dir(args, runner)
    result = _header(runner) | {"lengths": lengths, "depths": args.depths, "seed": args.seed,
                                "tokenizer": tokenizer.spec} | grid
    (out / "passkey.json").write_text(json.dumps(result, indent=1))
    passkey_heatmap(grid["accuracy"], args.depths, lengths, out / "passkey.png", title=f"step {runner.step}")
    print(f"passkey mean accuracy {grid['mean']:.3f} (chance 0.1); wrote {out}/passkey.json, passkey.png")
    return out


def run_loss(args) -> Path | None:
    from lh_dist.data.loader import PackedLoader
    from lh_dist.eval.plotting import position_loss_plot
    from lh_dist.eval.position_loss import SPACINGS, bucket_edges, evaluate_position_loss
    from lh_dist.eval.runner import ModelRunner

    for name in ("batches", "micro_batch", "buckets"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.spacing not in SPACINGS:
        raise ValueError(f"--spacing must be one of {SPACINGS}, got {args.spacing!r}")
    runner = ModelRunner(args.checkpoint, device=args.device, cp_degree=args.cp, phase=args.phase,
                         overrides=args.overrides)
    seq_len = args.seq_len or runner.cfg.data.seq_len
    if seq_len < 2:
        raise ValueError(f"--seq-len must be an integer >= 2, got {seq_len}")
    runner.check_length(seq_len, "--seq-len")
    _warn_untrained_lengths(runner, [seq_len], "--seq-len")
    edges = bucket_edges(seq_len, args.buckets, args.spacing)
    data = args.data or runner.cfg.data.path
    # Every rank reads the same batches: evaluation has no data parallelism.
    loader = PackedLoader(data, "val", seq_len=seq_len, micro_batch=args.micro_batch, dp_rank=0, dp_degree=1,
                          cp_degree=args.cp, seed=runner.cfg.seed, max_batches=args.batches,
                          cache_dir=str(runner.folder.parent.parent / "data_cache"))
    log = print if runner.is_main else None
    result = evaluate_position_loss(runner.token_losses, loader, seq_len, edges, log=log)
    runner.close()
    if not runner.is_main:
        return None
    out = _out_dir(args, runner)
    result = _header(runner) | {"data": str(data), "seq_len": seq_len, "batches": len(loader),
                                "micro_batch": args.micro_batch, "spacing": args.spacing} | result
    (out / "position_loss.json").write_text(json.dumps(result, indent=1))
    position_loss_plot(result["buckets"], result["loss"], out / "position_loss.png", log_x=args.spacing == "log",
                       title=f"step {runner.step} ({args.phase})")
    print(f"validation loss {result['loss']:.4f} over {result['tokens']:,} tokens; "
          f"wrote {out}/position_loss.json, position_loss.png")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    # argparse stops filling a '*' positional at the first option, so overrides placed after
    # options come back as unknown arguments: accept those that look like section.field=value.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = args.overrides + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        (run_passkey if args.command == "passkey" else run_loss)(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"lh-eval {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
