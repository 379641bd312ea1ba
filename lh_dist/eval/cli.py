"""`lh-eval`: evaluate a checkpoint (a step_XXXXXXXX folder, or a run directory for its newest one).

    lh-eval passkey runs/tiny-cpu --lengths 256,512,1024
    lh-eval loss runs/tiny-cpu --batches 16 --buckets 8 --spacing log
    lh-eval loss runs/tiny-cpu --phase lighthouse lighthouse.topk=512   # with a config override
    torchrun --nproc-per-node 4 -m lh_dist.eval.cli passkey RUN --cp 4 --lengths 65536,98304
    lh-eval retrieval RUN --data runs/data/retrieval-64k --lengths 16384,65536

Outputs go under the root --out (default <run_dir>/eval), one JSON and one PNG of the same
name per evaluation, named by what was evaluated (defaults left out), so that nothing
overwrites anything else; `output_path(argv)` returns the JSON path for a command line:

  step_XXXXXXXX/passkey-<lengths joined by _>[-depths<d_d..>][-seed<s>][-cfg<hash>].json
      e.g. passkey-256_512_1024.json. lengths [L], depths [D], accuracy [D][L], predictions
      [D][L][10] (the digit predicted for needle 0..9), mean; always dense attention.
  step_XXXXXXXX/loss-<phase>[-seq<N>][-<spacing><buckets>][-batches<B>x<micro>][-cfg<hash>].json
      e.g. loss-dense.json, loss-lighthouse-log16.json. loss (nats/token), tokens, sequences,
      bits_per_byte and bytes (byte-level tokenizer), buckets [{start, end (exclusive), tokens,
      loss, stderr (over sequences), bytes, bits_per_byte}].
  step_XXXXXXXX/retrieval-<lengths>[-docs<D>][-bins<B>][-cfg<hash>].json
      e.g. retrieval-4096_8192.json. lengths, depth_edges [B + 1], accuracy, stderr (binomial, over
      queries), queries [B][L], by_length, by_distance (octaves), mean, mean_stderr, num_queries,
      chance; always dense attention.
  index.json  {"outputs": [{json, png, written, kind, run, step, checkpoint, trained_phase,
      eval_phase, result (the headline number), args}]}, one entry per JSON under the root.

`-cfg<hash>` stands for config overrides, --data, --tokenizer or --filler (held in full in the JSON).
Every JSON also records run, checkpoint, step, trained_phase, eval_phase, cp_degree and
device; floats are rounded to 6 significant digits.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from lh_dist.config import ConfigError
from lh_dist.eval.outputs import (DEFAULT_DEPTHS, DEFAULT_LOSS, DEFAULT_RETRIEVAL, loss_name, passkey_name,
                                  retrieval_name, update_index, write_json)
from lh_dist.eval.tokenizer_check import check_tokenizer, model_tokenizer
from lh_dist.parallel.device import DEVICES, use_expandable_segments

SPACINGS = ("linear", "log")


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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; adds "(default: X)" where the help does not say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.option_strings and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lh-eval", description=__doc__, formatter_class=_HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{passkey,loss,retrieval}")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("checkpoint", type=Path, help="checkpoint folder step_XXXXXXXX, or a run directory "
                                                      "(its newest checkpoint)")
    common.add_argument("--out", type=Path, default=None,
                        help="output root: results go to <out>/step_XXXXXXXX/, the index to <out>/index.json "
                             "(default: <run_dir>/eval)")
    common.add_argument("--device", default="auto", metavar="{" + ",".join(DEVICES) + "}", help="device to run on")
    common.add_argument("--cp", type=int, default=1,
                        help="context-parallel degree; run under torchrun with this many ranks")
    common.add_argument("overrides", nargs="*", help="config overrides section.field=value")

    passkey = commands.add_parser(
        "passkey", parents=[common], formatter_class=_HelpFormatter, help="pass-key retrieval heatmap",
        description="Pass-key retrieval (needle in a haystack): one digit hidden at several depths of prompts\n"
                    "of several lengths; accuracy per cell, chance 0.1. Always dense attention.",
        epilog="example:\n  lh-eval passkey runs/tiny-cpu --lengths 256,512,1024 --depths 0,50,100\n"
               "  -> runs/tiny-cpu/eval/step_00000060/passkey-256_512_1024-depths0_50_100.json (+ .png)")
    passkey.add_argument("--lengths", type=_int_list("--lengths"), default=None,
                         help="context lengths in tokens, comma-separated (default: the paper's 4K..96K scaled to "
                              "the training seq_len: seq_len x 1/24, 1/12, 1/6, 1/3, 2/3, 1)")
    passkey.add_argument("--depths", type=_int_list("--depths"), default=DEFAULT_DEPTHS,
                         help="needle depths in percent, comma-separated (default: "
                              + ",".join(map(str, DEFAULT_DEPTHS)) + ")")
    passkey.add_argument("--seed", type=int, default=0, help="filler seed")
    passkey.add_argument("--batch-size", type=int, default=1, help="prompts per forward pass")
    passkey.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json, which must be the model's "
                                                           "(default: the model's own: an imported model's hf/ folder, "
                                                           "else the one the training dataset's lh_data.json records)")

    loss = commands.add_parser(
        "loss", parents=[common], formatter_class=_HelpFormatter, help="validation loss by position bucket",
        description="Validation loss overall and by position bucket, with standard errors over sequences,\n"
                    "token counts and (byte-level tokenizer) bits per byte.",
        epilog="examples:\n  lh-eval loss runs/tiny-cpu                      -> .../step_00000060/loss-dense.json\n"
               "  lh-eval loss runs/tiny-cpu --phase lighthouse --buckets 16 --spacing log\n"
               "                                                  -> .../loss-lighthouse-log16.json")
    loss.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the config's data.seq_len)")
    loss.add_argument("--batches", type=int, default=DEFAULT_LOSS["batches"], help="validation batches")
    loss.add_argument("--micro-batch", type=int, default=DEFAULT_LOSS["micro_batch"], help="sequences per batch")
    loss.add_argument("--buckets", type=int, default=DEFAULT_LOSS["buckets"], help="position buckets")
    loss.add_argument("--spacing", default=DEFAULT_LOSS["spacing"], metavar="{linear,log}",
                      help="bucket widths: equal, or octaves ending at the sequence length (log: each twice the one before)")
    loss.add_argument("--phase", default="dense", metavar="{dense,lighthouse}",
                      help="attention of the layers not listed in lighthouse.dense_layers")
    loss.add_argument("--data", default=None, help="dataset folder or URL (default: the config's data.path, or its "
                                                   "first data.sources entry)")
    loss.add_argument("--bits-per-byte", action="store_true",
                      help="plot bits per byte instead of nats per token (byte-level tokenizer; the JSON holds both)")
    _add_retrieval_parser(commands, common)
    return parser


def _add_retrieval_parser(commands, common) -> None:
    retrieval = commands.add_parser(
        "retrieval", parents=[common], formatter_class=_HelpFormatter, help="key/value retrieval over long distances",
        description="Held-out documents of an `lh-data retrieval` dataset (its generator, val stream) at each\n"
                    "length; a query counts when every value token is the argmax prediction (teacher-forced).\n"
                    "Accuracy by depth of the key's statement and length, by distance, and overall, with\n"
                    "binomial standard errors. Always dense attention.",
        epilog="example:\n  lh-eval retrieval runs/ret --lengths 4096,8192   -> runs/ret/eval/step_XXXXXXXX/"
               "retrieval-4096_8192.json (+ .png)")
    retrieval.add_argument("--data", default=None,
                           help="lh-data retrieval dataset folder (default: the config's data.path, or its first "
                                "data.sources entry)")
    retrieval.add_argument("--filler", default=None,
                           help="the filler dataset, if moved since the retrieval dataset was written "
                                "(default: the path its lh_data.json records)")
    retrieval.add_argument("--lengths", type=_int_list("--lengths"), default=None,
                           help="context lengths in tokens, comma-separated (default: the training seq_len x "
                                "1/24, 1/12, 1/6, 1/3, 2/3, 1, those long enough for the statements and queries)")
    retrieval.add_argument("--docs", type=int, default=DEFAULT_RETRIEVAL["docs"], help="documents per length")
    retrieval.add_argument("--depth-bins", type=int, default=DEFAULT_RETRIEVAL["depth_bins"],
                           help="equal bins of the depth of a key's statement in its document")
    retrieval.add_argument("--batch-size", type=int, default=1, help="documents per forward pass")


def _tokenizer_spec(args, cfg, folder: Path) -> tuple[str, bool, dict | None]:
    """(the prompts' tokenizer spec: --tokenizer, else the model's own; whether it differs from the model's;
    the model's tokenizer identity, None where unknown)."""
    recorded, identity = model_tokenizer(folder, cfg)
    if recorded is None and not args.tokenizer:
        from lh_dist.data.loader import relative_note

        path = cfg.data.primary_path
        raise ValueError(f"the training data {path} of {folder} is not found{relative_note(path)}, and with it the "
                         f"record of the model's tokenizer: run lh-eval where the run was trained, or pass "
                         f"--tokenizer")
    return args.tokenizer or recorded, bool(args.tokenizer) and args.tokenizer != recorded, identity


def _tokenizer(args, cfg, folder: Path):
    """The prompts' tokenizer; ValueError if --tokenizer names another than the model's."""
    from lh_dist.data.tokenizer import load_tokenizer

    spec, _, model = _tokenizer_spec(args, cfg, folder)
    tokenizer = load_tokenizer(spec)
    if args.tokenizer:
        check_tokenizer(f"--tokenizer {args.tokenizer}", tokenizer.identity(), model, cfg.model.vocab_size)
    return tokenizer


def _passkey_lengths(args, cfg, tokenizer, notes: list[str] | None = None) -> list[int]:
    """--lengths, or the default lengths that hold a prompt; `notes` gets a line naming those left out."""
    from lh_dist.eval.passkey import default_lengths, min_prompt_length, scaled_lengths

    if args.lengths:
        return args.lengths
    lengths = default_lengths(cfg.data.seq_len, tokenizer, multiple=2 * args.cp)
    left_out = [n for n in scaled_lengths(cfg.data.seq_len, multiple=2 * args.cp) if n not in lengths]
    why = (f"shorter than a pass-key prompt without filler ({min_prompt_length(tokenizer)} tokens of tokenizer "
           f"{tokenizer.spec})")
    if not lengths:
        raise ValueError(f"the training seq_len {cfg.data.seq_len} is too short for the default lengths (each is "
                         f"{why}); pass --lengths")
    if left_out and notes is not None:
        notes.append(f"default lengths {', '.join(map(str, left_out))} left out: {why}")
    return lengths


def _retrieval_lengths(args, cfg, notes: list[str] | None = None) -> list[int]:
    """--lengths, or the default lengths that hold a retrieval document; `notes` gets a line naming those
    left out."""
    from lh_dist.data.loader import read_dataset_info
    from lh_dist.data.retrieval import RetrievalSettings, min_document_length
    from lh_dist.data.tokenizer import load_tokenizer
    from lh_dist.eval.passkey import scaled_lengths
    from lh_dist.eval.retrieval import default_lengths

    if args.lengths:
        return args.lengths
    data = args.data or cfg.data.primary_path
    info = read_dataset_info(data)
    try:
        settings = RetrievalSettings.from_info(info)
    except ValueError as e:
        raise ValueError(f"{data}: {e}; pass --data") from None
    shortest = min_document_length(settings, load_tokenizer(info.get("tokenizer", "byte")))
    lengths = default_lengths(cfg.data.seq_len, shortest, multiple=2 * args.cp)
    if not lengths:
        raise ValueError(f"the training seq_len {cfg.data.seq_len} is shorter than a retrieval document needs "
                         f"({shortest} tokens); pass --lengths")
    left_out = [n for n in scaled_lengths(cfg.data.seq_len, multiple=2 * args.cp) if n not in lengths]
    if left_out and notes is not None:
        notes.append(f"default lengths {', '.join(map(str, left_out))} left out: shorter than a retrieval document "
                     f"of {data} needs ({shortest} tokens)")
    return lengths


def _json_path(args, folder: Path, cfg, lengths: list[int] | None = None) -> Path:
    if args.command == "retrieval":
        data = args.data if args.data and args.data != cfg.data.primary_path else None
        name = retrieval_name(lengths or _retrieval_lengths(args, cfg), args.docs, args.depth_bins, args.overrides,
                              data, args.filler)
    elif args.command == "passkey":
        lengths = lengths or _passkey_lengths(args, cfg, _tokenizer(args, cfg, folder))
        spec, differs, _ = _tokenizer_spec(args, cfg, folder)
        name = passkey_name(lengths, args.depths, args.seed, args.overrides, spec if differs else None)
    else:
        seq_len = args.seq_len if args.seq_len != cfg.data.seq_len else None
        data = args.data if args.data != cfg.data.primary_path else None
        name = loss_name(args.phase, seq_len, args.buckets, args.spacing, args.batches, args.micro_batch,
                         args.overrides, data)
    root = args.out or folder.parent.parent / "eval"
    return root / folder.name / f"{name}.json"


def output_path(argv: list[str]) -> Path:
    """The JSON file that `lh-eval <argv>` writes (its PNG has the same stem). Reads the checkpoint's
    config (and, for default passkey lengths, the dataset's tokenizer); evaluates nothing."""
    from lh_dist.checkpoint.format import resolve_checkpoint
    from lh_dist.eval.runner import eval_config

    args = parse_args(argv)
    folder = resolve_checkpoint(args.checkpoint)
    return _json_path(args, folder, eval_config(folder, args.overrides))


def _header(runner) -> dict:
    return {"run": runner.folder.parent.parent.name, "checkpoint": str(runner.folder), "step": runner.step,
            "trained_phase": runner.trained_phase, "eval_phase": runner.phase, "cp_degree": runner.cp_degree,
            "device": str(runner.device)}


def _title(runner) -> str:
    return (f"{runner.folder.parent.parent.name}, step {runner.step:,} "
            f"(trained: {runner.trained_phase or 'unknown'} phase; evaluated: {runner.phase} attention)")


def _write(args, runner, path: Path, result: dict, headline: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    update_index(path.parent.parent, path, {"kind": args.command, **{k: result[k] for k in (
        "run", "step", "checkpoint", "trained_phase", "eval_phase")}, "result": headline, "args": settings})


def _open_runner(args, phase: str):
    """The checkpoint's model on this rank, in `phase` attention; says which newer checkpoints of a run
    directory were passed over."""
    from lh_dist.eval.runner import ModelRunner

    runner = ModelRunner(args.checkpoint, device=args.device, cp_degree=args.cp, phase=phase,
                         overrides=args.overrides)
    if runner.is_main:
        for line in runner.skipped:
            print(f"lh-eval {args.command}: {line}", file=sys.stderr)
    return runner


def _warn_untrained_lengths(runner, lengths: list[int], name: str) -> None:
    trained = runner.cfg.data.seq_len
    longer = [n for n in lengths if n > trained]
    if longer and runner.is_main:
        ratio = max(longer) / trained
        print(f"lh-eval: warning: {name} {', '.join(f'{n:,}' for n in longer)} longer than the trained length "
              f"{trained:,} (data.seq_len): the model never saw those positions, and a dense forward pass over "
              f"{max(longer):,} tokens takes up to {ratio ** 2:,.0f}x as long as one over {trained:,}",
              file=sys.stderr)


def _check_data_tokenizer(args, runner, data: str, identity: dict) -> None:
    """ValueError unless the evaluation data (--data, else the training data) uses the model's tokenizer."""
    check_tokenizer(f"--data {data}" if args.data else f"data.path {data}", identity,
                    model_tokenizer(runner.folder, runner.cfg)[1], runner.cfg.model.vocab_size)


def _check_positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")


def run_passkey(args) -> Path | None:
    """`lh-eval passkey`: the JSON written (and its PNG beside it), on the main rank; None on the others."""
    from lh_dist.eval.passkey import passkey_grid
    from lh_dist.eval.plotting import passkey_heatmap

    if any(not 0 <= d <= 100 for d in args.depths):
        raise ValueError(f"--depths must be percentages in [0, 100], got {args.depths}")
    _check_positive(args, "batch_size")
    runner = _open_runner(args, "dense")
    tokenizer = _tokenizer(args, runner.cfg, runner.folder)
    notes: list[str] = []
    lengths = _passkey_lengths(args, runner.cfg, tokenizer, notes)
    for line in notes if runner.is_main else []:
        print(f"lh-eval passkey: {line}", file=sys.stderr)
    for n in lengths:
        runner.check_length(n, "--lengths")
    _warn_untrained_lengths(runner, lengths, "--lengths")
    log = print if runner.is_main else None
    grid = passkey_grid(runner.last_logits, tokenizer, lengths, args.depths, seed=args.seed,
                        batch_size=args.batch_size, log=log)
    runner.close()
    if not runner.is_main:
        return None
    path = _json_path(args, runner.folder, runner.cfg, lengths)
    result = _header(runner) | {"lengths": lengths, "depths": args.depths, "seed": args.seed,
                                "tokenizer": tokenizer.spec, "overrides": args.overrides} | grid
    _write(args, runner, path, result, {"mean_accuracy": grid["mean"]})
    passkey_heatmap(grid["accuracy"], args.depths, lengths, path.with_suffix(".png"), title=_title(runner))
    print(f"passkey mean accuracy {grid['mean']:.3f} (chance 0.1); wrote {path} and .png")
    return path


def run_loss(args) -> Path | None:
    """`lh-eval loss`: the JSON written (and its PNG beside it), on the main rank; None on the others."""
    from lh_dist.data.loader import PackedLoader, read_dataset_info
    from lh_dist.data.tokenizer import recorded_identity
    from lh_dist.eval.plotting import position_loss_plot
    from lh_dist.eval.position_loss import bucket_edges, evaluate_position_loss

    _check_positive(args, "batches", "micro_batch", "buckets")
    if args.spacing not in SPACINGS:
        raise ValueError(f"--spacing must be one of {SPACINGS}, got {args.spacing!r}")
    runner = _open_runner(args, args.phase)
    seq_len = runner.cfg.data.seq_len if args.seq_len is None else args.seq_len
    if seq_len < 2:
        raise ValueError(f"--seq-len must be an integer >= 2, got {seq_len}")
    runner.check_length(seq_len, "--seq-len")
    _warn_untrained_lengths(runner, [seq_len], "--seq-len")
    try:
        edges = bucket_edges(seq_len, args.buckets, args.spacing)
    except ValueError as e:
        raise ValueError(f"--buckets {args.buckets}: {e}") from None
    if len(edges) - 1 < args.buckets and runner.is_main:
        print(f"lh-eval loss: {len(edges) - 1} buckets, not {args.buckets}: over {seq_len:,} tokens {args.spacing} "
              f"spacing leaves buckets of under one position, which are merged", file=sys.stderr)
    data = args.data or runner.cfg.data.primary_path
    info = read_dataset_info(data)
    _check_data_tokenizer(args, runner, data, recorded_identity(info))
    if args.bits_per_byte and info.get("tokenizer", "byte") != "byte":
        raise ValueError(f"--bits-per-byte needs the byte-level tokenizer; {data} uses {info['tokenizer']}")
    # A byte-level target is one byte, except the end-of-document token.
    token_bytes = (lambda t: (t != info["eod_id"]).long()) if info.get("tokenizer", "byte") == "byte" else None
    # Every rank reads the same batches: evaluation has no data parallelism.
    loader = PackedLoader(data, "val", seq_len=seq_len, micro_batch=args.micro_batch, dp_rank=0, dp_degree=1,
                          seed=runner.cfg.seed, max_batches=args.batches,
                          cache_dir=str(runner.folder.parent.parent / "data_cache"))
    if len(loader) < args.batches and runner.is_main:
        print(f"lh-eval loss: {len(loader)} batches, not {args.batches}: the validation split of {data} holds "
              f"{len(loader) * args.micro_batch} samples of {seq_len + 1:,} tokens", file=sys.stderr)
    log = print if runner.is_main else None
    result = evaluate_position_loss(runner.token_losses, loader, seq_len, edges, log=log, token_bytes_fn=token_bytes)
    runner.close()
    if not runner.is_main:
        return None
    path = _json_path(args, runner.folder, runner.cfg)
    result = _header(runner) | {"data": str(data), "seq_len": seq_len, "batches": len(loader),
                                "micro_batch": args.micro_batch, "spacing": args.spacing,
                                "overrides": args.overrides} | result
    headline = {"loss": result["loss"]} | ({"bits_per_byte": result["bits_per_byte"]} if token_bytes else {})
    _write(args, runner, path, result, headline)
    overall = result["bits_per_byte"] if args.bits_per_byte else result["loss"]
    position_loss_plot(result["buckets"], overall, path.with_suffix(".png"), log_x=args.spacing == "log",
                       title=_title(runner), bits_per_byte=args.bits_per_byte)
    bpb = f" ({result['bits_per_byte']:.4f} bits/byte)" if token_bytes else ""
    print(f"validation loss {result['loss']:.4f}{bpb} over {result['tokens']:,} tokens; wrote {path} and .png")
    return path


def run_retrieval(args) -> Path | None:
    """`lh-eval retrieval`: the JSON written (and its PNG beside it), on the main rank; None on the others."""
    from lh_dist.data.retrieval import dataset_generator
    from lh_dist.eval.plotting import retrieval_heatmap
    from lh_dist.eval.retrieval import retrieval_grid

    _check_positive(args, "docs", "depth_bins", "batch_size")
    runner = _open_runner(args, "dense")
    data = args.data or runner.cfg.data.primary_path
    notes: list[str] = []
    lengths = _retrieval_lengths(args, runner.cfg, notes)
    for line in notes if runner.is_main else []:
        print(f"lh-eval retrieval: {line}", file=sys.stderr)
    generator = dataset_generator(data, "val", args.filler)
    _check_data_tokenizer(args, runner, data, generator.tokenizer.identity())
    for n in lengths:
        runner.check_length(n, "--lengths")
        generator.check_length(n)
    _warn_untrained_lengths(runner, lengths, "--lengths")
    log = print if runner.is_main else None
    grid = retrieval_grid(runner.next_token_argmax, generator, lengths, args.docs, args.depth_bins,
                          batch_size=args.batch_size, log=log)
    generator.close()
    runner.close()
    if not runner.is_main:
        return None
    path = _json_path(args, runner.folder, runner.cfg, lengths)
    result = _header(runner) | {"data": str(data), "filler": generator.filler.path, "lengths": lengths,
                                "docs": args.docs, "settings": dataclasses.asdict(generator.settings),
                                "tokenizer": generator.tokenizer.spec, "overrides": args.overrides} | grid
    _write(args, runner, path, result, {"mean_accuracy": grid["mean"]})
    retrieval_heatmap(grid["accuracy"], grid["queries"], grid["depth_edges"], lengths, grid["mean"],
                      path.with_suffix(".png"), title=_title(runner))
    print(f"retrieval mean accuracy {grid['mean']:.3f} +- {grid['mean_stderr']:.3f} over {grid['num_queries']} "
          f"queries (chance of guessing a value {grid['chance']:.0e}; value tokens right "
          f"{grid['token_accuracy']:.3f}); wrote {path} and .png")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`lh-eval`'s arguments; config overrides may stand before or after the options."""
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
    """`lh-eval`; 0 on success, 2 (one line on stderr) for a bad argument, config or checkpoint."""
    use_expandable_segments()  # before CUDA starts: long sequences fragment the default allocator
    args = parse_args(argv)
    try:
        {"passkey": run_passkey, "loss": run_loss, "retrieval": run_retrieval}[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # Under torchrun every rank of the CP group fails the same way; one line is enough.
        if os.environ.get("RANK", "0") == "0":
            print(f"lh-eval {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
