"""`lh-data`: tokenize a corpus into MDS shards for training.

    lh-data stdlib --out runs/data/stdlib
    lh-data text --out runs/data/docs 'docs/**/*.md'
    lh-data jsonl --out runs/data/web --field text a.jsonl b.jsonl
"""

import argparse
import sys

from lh_dist.data.corpus import jsonl_documents, stdlib_documents, stdlib_root, text_documents
from lh_dist.data.shards import write_dataset
from lh_dist.data.tokenizer import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lh-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory (gets train/, val/, lh_data.json)")
    common.add_argument("--tokenizer", default="byte", help="'byte' (default) or a Hugging Face tokenizer.json")
    common.add_argument("--eod-token", default=None, help="end-of-document token of a tokenizer.json (default: eos)")
    common.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for validation (>= 1)")
    common.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    common.add_argument("--shard-size", default="64mb", help="largest shard size, e.g. 64mb or 1048576")
    common.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")

    sources = parser.add_subparsers(dest="source", required=True)
    sources.add_parser("stdlib", parents=[common], help="Python's standard-library sources (built in)")
    text = sources.add_parser("text", parents=[common], help="text files: one document per file")
    text.add_argument("inputs", nargs="+", help="folders (read recursively) or globs such as 'docs/**/*.md'")
    jsonl = sources.add_parser("jsonl", parents=[common], help="JSON Lines: one document per line")
    jsonl.add_argument("inputs", nargs="+", help="JSONL files, folders or globs")
    jsonl.add_argument("--field", "--jsonl-field", dest="field", default="text", help="field holding the text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.source == "stdlib":
        documents, source = stdlib_documents(), f"stdlib:{stdlib_root()}"
    elif args.source == "text":
        documents, source = text_documents(args.inputs), "text:" + " ".join(args.inputs)
    else:
        documents, source = jsonl_documents(args.inputs, args.field), f"jsonl[{args.field}]:" + " ".join(args.inputs)
    shard_size = int(args.shard_size) if args.shard_size.isdigit() else args.shard_size
    try:
        write_dataset(
            documents,
            args.out,
            load_tokenizer(args.tokenizer, args.eod_token),
            source=source,
            val_fraction=args.val_fraction,
            max_docs=args.max_docs,
            shard_size=shard_size,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as e:
        print(f"lh-data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
