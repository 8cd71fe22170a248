"""Command line: ``adaptivek book run|build|check``, ``adaptivek extract`` and ``adaptivek data fetch``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptivek", description=__doc__)
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
    check = bsub.add_parser("check", help="fail if an executed chapter has an error output or no figure")
    check.add_argument("notebooks", nargs="*", type=Path)

    ex = sub.add_parser("extract", help="extract activations into a cache (shards under torchrun)")
    ex.add_argument("--model", default="smollm2-135m")
    ex.add_argument("--texts", required=True, type=Path, help=".txt (one per line), .jsonl, .csv or .parquet")
    ex.add_argument("--column", default="text", help="text column of a table file")
    ex.add_argument("--layers", required=True, help="comma-separated, e.g. 3 or 0,6,12")
    ex.add_argument("--cache-dir", required=True, type=Path)
    ex.add_argument("--token", default="last", choices=["last", "all"])
    ex.add_argument("--max-length", type=int, default=128)
    ex.add_argument("--batch-size", type=int, default=32)
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--dtype", default=None, help="e.g. bfloat16")

    data = sub.add_parser("data", help="offline data")
    dsub = data.add_subparsers(dest="action", required=True)
    dsub.add_parser("fetch", help="download and verify the embedded corpus sources into the cache")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from . import book

    try:
        if args.command == "book" and args.action == "run":
            book.run_book(args.profile, only=args.only, dry_run=args.dry_run)
        elif args.command == "book" and args.action == "build":
            book.build_book()
        elif args.command == "book" and args.action == "check":
            root = book.repo_root()
            paths = args.notebooks or sorted((root / "_build" / "executed" / "book").glob("*.ipynb"))
            paths = [p for p in paths if not p.name.endswith(".failed.ipynb")]
            if not paths:
                print("no executed chapters found; run `adaptivek book run` first", file=sys.stderr)
                return 1
            problems = book.check_executed(paths)
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                return 1
            print(f"{len(paths)} executed chapters: no errors, every one has a figure")
        elif args.command == "extract":
            from .distributed import main_extract

            main_extract(args)
        elif args.command == "data" and args.action == "fetch":
            from .corpus import fetch_data

            fetch_data()
    except (book.ChapterFailed, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"adaptivek: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
