"""The `ivf-distill` command: one subcommand per job.

  ivf-distill build --config demo --output URI [--set key=value ...]   # the pipeline
  ivf-distill search --index URI --queries FILE -k 10 --nprobe 32     # query a published index
  ivf-distill copy SRC DST                                            # copy a published version
  ivf-distill rollback URI VERSION                                    # point back at a version
  ivf-distill prepare --synthetic 4000 --dim 32 --out URI             # write the input contract
  ivf-distill presets [NAME]                                          # list or print presets

`ivf-distill SUBCOMMAND --help` describes each. On a Ray cluster, `jobs/distill.py` is the same
build command as a script for `ray job submit`.
"""
from __future__ import annotations

import sys

COMMANDS = {
    "build": "run the pipeline: ingest, teacher, training, encode, merge, evaluate, publish",
    "search": "query a published index",
    "copy": "copy a run's current version between local paths and s3://",
    "rollback": "point a run's manifest.json back at an earlier version",
    "prepare": "write a dataset in the input contract (Parquet id + embedding)",
    "presets": "list the shipped presets, or print one (to start your own config from)",
}


def _usage() -> str:
    lines = [__doc__.split("\n\n")[0], "", "subcommands:"]
    lines += [f"  {name:<9} {what}" for name, what in COMMANDS.items()]
    from importlib.metadata import PackageNotFoundError, version

    try:
        lines += ["", f"ivf-distill {version('ivf-distill')}"]
    except PackageNotFoundError:  # run from a checkout that was not installed
        pass
    return "\n".join(lines)


def _presets(argv: list[str]) -> int:
    from pipeline.config import preset_text, presets
    from pipeline.errors import InputError

    if not argv:
        print("\n".join(presets()))
        return 0
    try:
        sys.stdout.write(preset_text(argv[0]))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "build":
        from pipeline.cli import build

        return build.main(rest, exit_on_interrupt=True)
    if command == "rollback":
        from pipeline.cli import build

        if len(rest) < 2 or rest[0].startswith("-") or rest[1].startswith("-"):
            print("usage: ivf-distill rollback URI VERSION [--break-lease]", file=sys.stderr)
            return 2
        return build.main(["--output", rest[0], "--rollback", rest[1], *rest[2:]])
    if command == "search":
        from pipeline.cli import search

        return search.main(rest)
    if command == "copy":
        from pipeline.cli import copy

        return copy.main(rest)
    if command == "prepare":
        from pipeline.cli import prepare

        return prepare.main(rest)
    if command == "presets":
        return _presets(rest)
    print(f"error: no subcommand {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2
