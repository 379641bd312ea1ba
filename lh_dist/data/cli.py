"""`lh-data`: tokenize a corpus into MDS shards for training.

    lh-data stdlib --out runs/data/stdlib
    lh-data text --out runs/data/docs 'docs/**/*.md'
    lh-data jsonl --out runs/data/web --field text a.jsonl b.jsonl
    lh-data tree --out runs/data/code --include '*.py' --min-doc-tokens 65536 /usr/lib/python3/dist-packages
    lh-data retrieval --out runs/data/retrieval --filler runs/data/code --doc-tokens 65536 --train-docs 20000

The validation split is whole documents not in train: by default the ones that
reach --val-tokens (enough for eight 98,304-token samples plus margin); training
refuses a split too short for its evaluations.
"""

import argparse
import math
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


def _fraction(text: str) -> float:
    """A share strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # fails the test below
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {text!r}")
    return value


def _max_docs(text: str) -> int:
    """A document count of at least 2: one for each split."""
    count = _size(text)
    if count < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 (one train and one val document), got {text!r}")
    return count


def build_parser() -> argparse.ArgumentParser:
    """`lh-data`'s parser: one subcommand per source (stdlib, text, jsonl, tree, retrieval)."""
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
    split.add_argument("--val-fraction", type=_fraction, default=None,
                       help="instead: the share of documents, in (0, 1), that goes to validation")
    common.add_argument("--min-doc-tokens", type=_size, default=1,
                        help="skip documents shorter than this (default: 1, keep every non-empty one)")
    common.add_argument("--max-docs", type=_max_docs, default=None, help="stop after this many kept documents")
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
    _add_retrieval_parser(sources)
    return parser


def _add_retrieval_parser(sources) -> None:
    retrieval = sources.add_parser(
        "retrieval", help="long-range retrieval documents: key/value statements and later look-ups in real text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Documents of --doc-tokens tokens: filler from another lh-data dataset (train documents for "
                    "train,\nits val split for val) with statements  keys[\"kv-3f9a2c\"] = \"481516\"  inserted at "
                    "random\ndepths and, later, queries  assert keys[\"kv-3f9a2c\"] == \"481516\"  about some of "
                    "them (the\nfiller tokens between the two log-uniform in [--min-gap, document]; the other keys "
                    "are\ndistractors). --query-form restate makes a query its statement again and "
                    "--queries-per-key N\nasks each queried key N times (distances drawn alike, sorted), so "
                    "that copying reaches\nthe answers. The tokenizer is the filler's. Train with data.seq_len = "
                    "--doc-tokens\n"
                    "so that each sample is one document; lh-eval retrieval scores the queries' values.",
        epilog="example:\n  lh-data retrieval --out runs/data/retrieval-64k --filler runs/data/code "
               "--doc-tokens 65536 --train-docs 20000")
    retrieval.add_argument("--out", required=True, help="output directory (gets train/, val/, lh_data.json)")
    retrieval.add_argument("--filler", required=True,
                           help="local lh-data dataset directory whose token ids fill the documents")
    retrieval.add_argument("--doc-tokens", type=_size, required=True, help="tokens per document, e.g. 65536")
    retrieval.add_argument("--train-docs", type=_size, required=True, help="documents in the train split")
    retrieval.add_argument("--val-docs", type=_size, default=32, help="documents in the val split (default: 32)")
    retrieval.add_argument("--keys", type=_size, default=32, help="statements per document (default: 32)")
    retrieval.add_argument("--queries", type=_size, default=16,
                           help="keys queried per document; at most --keys (default: 16)")
    retrieval.add_argument("--min-gap", type=_size, default=64,
                           help="fewest filler tokens between a statement and its query (default: 64)")
    retrieval.add_argument("--value-digits", type=_size, default=6, help="digits of a value (default: 6)")
    # Checked by RetrievalSettings, so that a bad value is one line like the other settings' errors.
    retrieval.add_argument("--query-form", default="assert", metavar="{assert,restate}",
                           help="how a query reads: 'assert' (assert keys[k] == v) or 'restate' (its statement "
                                "again, token for token) (default: assert)")
    retrieval.add_argument("--queries-per-key", type=int, default=1,
                           help="queries of each queried key, at distances drawn alike and sorted; the document "
                                "holds --queries times this many (default: 1)")
    retrieval.add_argument("--seed", type=int, default=0, help="seed of the documents (default: 0)")
    retrieval.add_argument("--shard-size", default="64mb", help="largest shard size (default: 64mb)")
    retrieval.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def _retrieval(args) -> int:
    from lh_dist.data.retrieval import RetrievalSettings, write_retrieval_dataset

    try:
        settings = RetrievalSettings(doc_tokens=args.doc_tokens, keys=args.keys, queries=args.queries,
                                     min_gap=args.min_gap, value_digits=args.value_digits, seed=args.seed,
                                     query_form=args.query_form, queries_per_key=args.queries_per_key)
        write_retrieval_dataset(args.out, args.filler, settings, train_docs=args.train_docs,
                                val_docs=args.val_docs, overwrite=args.overwrite,
                                shard_size=int(args.shard_size) if args.shard_size.isdigit() else args.shard_size)
    except (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError) as e:
        print(f"lh-data: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """`lh-data`; 0 on success, 2 (one line on stderr, nothing left written) on an error."""
    args = build_parser().parse_args(argv)
    if args.source == "retrieval":
        return _retrieval(args)
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
