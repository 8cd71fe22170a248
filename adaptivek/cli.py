"""Command line: ``adaptivek book run|build|check``, ``adaptivek extract`` and ``adaptivek data fetch``.

Exit status: 0 done; 1 a chapter failed or ``book check`` found problems; 2 the input is wrong (a
bad argument, a missing file, a bad profile...). Errors print one line, ``adaptivek: error: ...``,
without a traceback; ``--debug`` shows it. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# what a user can cause and fix from the message (bad input, missing file or package, a failed
# download or build): printed as one line, exit 2
INPUT_ERRORS = (ValueError, TypeError, OSError, ImportError, RuntimeError)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _layers(value: str) -> str:
    """``--layers 3`` or ``0,6,12``: checked to be non-negative ints, returned as written (spaces removed)."""
    try:
        layers = [int(x) for x in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of layer numbers; write e.g. 3 or 0,6,12") from None
    if any(x < 0 for x in layers):
        raise argparse.ArgumentTypeError(f"{value!r}: layer numbers count from 0; write e.g. 3 or 0,6,12")
    return ",".join(map(str, layers))


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return n


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} does not exist or is not a file")
    return path


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="adaptivek", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    book = sub.add_parser("book", help="run, check or build the Jupyter Book")
    bsub = book.add_subparsers(dest="action", required=True)
    run = bsub.add_parser("run", help="execute every chapter in _toc.yml with papermill")
    run.add_argument("--profile", default="quick", help="book/profiles/NAME.yaml (default: quick)")
    run.add_argument("--only", action="append", metavar="CHAPTER",
                     help="run only this chapter (repeatable), e.g. --only 01_activations")
    run.add_argument("--dry-run", action="store_true",
                     help="paper profiles: a random model of the same config and a small embedded corpus")
    bsub.add_parser("build", help="build HTML from the executed chapters into _build/html")
    check = bsub.add_parser("check", help="fail if an executed chapter has an error output, no figure, or a glue "
                                          "reference to a key no code cell glued")
    check.add_argument("notebooks", nargs="*", type=_existing_file)

    ex = sub.add_parser("extract", help="extract activations into a cache (shards under torchrun)")
    ex.add_argument("--model", default="smollm2-135m")
    ex.add_argument("--texts", required=True, type=_existing_file,
                    help=".txt (one per line), .jsonl, .csv or .parquet; every row needs a text")
    ex.add_argument("--column", default="text", help="text column of a table file")
    ex.add_argument("--layers", required=True, type=_layers, help="comma-separated, e.g. 3 or 0,6,12")
    ex.add_argument("--cache-dir", required=True, type=Path)
    ex.add_argument("--token", default="last", choices=["last", "all"])
    ex.add_argument("--max-length", type=_positive_int, default=128)
    ex.add_argument("--batch-size", type=_positive_int, default=32)
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--dtype", default=None, help="e.g. bfloat16")

    data = sub.add_parser("data", help="offline data")
    dsub = data.add_subparsers(dest="action", required=True)
    dsub.add_parser("fetch", help="download and verify the embedded corpus sources into the cache")
    return p


def check_texts_file(path: Path, column: str) -> None:
    """Refuse a texts file with an empty or non-text row, naming the rows, before a model is loaded.

    ``extract`` keeps one activation per row, in order, so it cannot drop such rows without
    shifting every later row: the fix is to fill or delete them in the file.
    """
    import pandas as pd

    from .distributed import read_texts

    texts = pd.Series(read_texts(path, column), dtype=object)
    bad = texts.map(lambda t: not isinstance(t, str) or not t.strip()).to_numpy(dtype=bool)
    if bad.any():
        rows = bad.nonzero()[0]
        raise ValueError(f"{path}: {len(rows)} rows of column {column!r} have no text (rows {rows[:5].tolist()}"
                         f"{' ...' if len(rows) > 5 else ''}, counted from 0 after the header); fill or delete "
                         "them (extract keeps one activation per row, so it does not skip rows)")


def _book_check(book, notebooks: list[Path]) -> int:
    paths = notebooks or book.executed_notebooks(book.repo_root())
    if not paths:
        print("adaptivek: error: no executed chapters found; run `adaptivek book run` first", file=sys.stderr)
        return 2
    problems = book.check_executed(paths)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    print(f"{len(paths)} executed chapters: no errors, every one has a figure, every glue reference resolves")
    return 0


def _dispatch(args) -> int:
    from . import book

    if args.command == "book" and args.action == "run":
        book.run_book(args.profile, only=args.only, dry_run=args.dry_run)
    elif args.command == "book" and args.action == "build":
        book.build_book()
    elif args.command == "book" and args.action == "check":
        return _book_check(book, args.notebooks)
    elif args.command == "extract":
        from .distributed import main_extract

        check_texts_file(args.texts, args.column)
        main_extract(args)
    elif args.command == "data" and args.action == "fetch":
        from .corpus import fetch_data

        fetch_data()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .book import ChapterFailed

    try:
        return _dispatch(args)
    except ChapterFailed as e:
        if args.debug:
            raise
        print(f"adaptivek: {e}", file=sys.stderr)
        return 1
    except INPUT_ERRORS as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"adaptivek: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
