"""`lh-data`: tokenize a corpus into MDS shards for training.

    lh-data stdlib --out runs/data/stdlib
    lh-data text --out runs/data/docs 'docs/**/*.md'
    lh-data jsonl --out runs/data/web --field text a.jsonl b.jsonl
    lh-data tree --out runs/data/code --include '*.py' --min-doc-tokens 65536 /usr/lib/python3/dist-packages

The validation split is whole documents not in train: by default the ones that
reach --val-tokens (enough for eight 98,304-token samples plus margin); training
refuses a split too short for its evaluations.
"""

import argparse
import sys

from lh_dist.data.corpus import jsonl_documents, stdlib_documents, stdlib_root, text_documents, tree_documents
from lh_dist.data.shards import DEFAULT_VAL_TOKENS, write_dataset
from lh_dist.data.tokenizer import load_tokenizer


def _size(text: str) -> int:
    """A token count: digits, with optional _ or , separators (2_000_000, 2,000,000)."""
    digits = text.replace("_", "").replace(",", "")
    if not digits.isdigit() or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(digits)


def build_parser() -> argparse.ArgumentParser:
    """`lh-data`'s parser: one subcommand per source (stdlib, text, jsonl, tree)."""
    parser = argparse.ArgumentParser(
        prog="lh-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory (gets train/, val/, lh_data.json)")
    common.add_argument("--tokenizer", default="byte",
                        help="'byte' (default), a Hugging Face tokenizer.json, or a folder holding one (a model "
                             "folder, or an imported run's hf/: the eos of its tokenizer_config.json ends documents)")
    common.add_argument("--eod-token", default=None, help="end-of-document token of a tokenizer.json (default: eos)")
    split = common.add_mutually_exclusive_group()
    split.add_argument("--val-tokens", type=_size, default=None,
                       help=f"validation split size in tokens, whole documents (default: {DEFAULT_VAL_TOKENS:,})")
    split.add_argument("--val-fraction", type=float, default=None,
                       help="instead: the share of documents, in (0, 1), that goes to validation")
    common.add_argument("--min-doc-tokens", type=_size, default=1,
                        help="skip documents shorter than this (default: 1, keep every non-empty one)")
    common.add_argument("--max-docs", type=int, default=None, help="stop after this many kept documents")
    common.add_argument("--shard-size", default="64mb", help="largest shard size, e.g. 64mb or 1048576 (default: 64mb)")
    common.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")

    sources = parser.add_subparsers(dest="source", required=True)
    sources.add_parser("stdlib", parents=[common], help="Python's standard-library sources (built in)")
    text = sources.add_parser("text", parents=[common], help="text files: one document per file")
    text.add_argument("inputs", nargs="+", help="folders (read recursively) or globs such as 'docs/**/*.md'")
    jsonl = sources.add_parser("jsonl", parents=[common], help="JSON Lines: one document per line")
    jsonl.add_argument("inputs", nargs="+", help="JSONL files, folders or globs")
    jsonl.add_argument("--field", "--jsonl-field", dest="field", default="text", help="field holding the text")
    tree = sources.add_parser(
        "tree", parents=[common], help="directory trees: files grouped into documents by directory",
        description="One document per directory (its own files), or with --doc-depth N per directory N "
                    "levels below a root (its whole subtree: --doc-depth 1 on site-packages gives one "
                    "document per package). Files are concatenated in path order, each after a line "
                    "'# file: <path>'. Globs follow fnmatch: '*' also matches '/'.")
    tree.add_argument("roots", nargs="+", help="root directories")
    tree.add_argument("--include", action="append", required=True, metavar="GLOB",
                      help="relative paths to take, e.g. '*.py' (repeatable)")
    tree.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                      help="relative paths to drop, e.g. '*/tests/*' (repeatable)")
    tree.add_argument("--doc-depth", type=int, default=None,
                      help="group whole subtrees this many levels below a root (default: one document per directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`lh-data`; 0 on success, 2 (one line on stderr, nothing left written) on an error."""
    args = build_parser().parse_args(argv)
    if args.source == "stdlib":
        documents, source = stdlib_documents, f"stdlib:{stdlib_root()}"
    elif args.source == "text":
        documents, source = lambda: text_documents(args.inputs), "text:" + " ".join(args.inputs)
    elif args.source == "jsonl":
        documents = lambda: jsonl_documents(args.inputs, args.field)  # noqa: E731
        source = f"jsonl[{args.field}]:" + " ".join(args.inputs)
    else:
        documents = lambda: tree_documents(args.roots, args.include, args.exclude, args.doc_depth)  # noqa: E731
        depth = "dir" if args.doc_depth is None else f"depth {args.doc_depth}"
        source = (f"tree[{depth}; include {','.join(args.include)}; exclude {','.join(args.exclude) or '-'}]:"
                  + " ".join(args.roots))
    shard_size = int(args.shard_size) if args.shard_size.isdigit() else args.shard_size
    try:
        write_dataset(
            documents,
            args.out,
            load_tokenizer(args.tokenizer, args.eod_token),
            source=source,
            val_tokens=args.val_tokens,
            val_fraction=args.val_fraction,
            min_doc_tokens=args.min_doc_tokens,
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
