"""ivf-distill build --config PRESET_OR_FILE --output URI [--set key=value ...]

Runs ingest -> init -> teacher -> train -> export -> encode -> merge -> evaluate over a local
Ray cluster (or RAY_ADDRESS / ray.address), writing everything under --output (a local path or
an s3:// prefix), and publishes the result as a new version (URI/versions/<version>/, with
URI/manifest.json pointing at it). On a rerun, a stage runs only when a setting or input it
reads changed; --from-stage forces a stage and the later ones.

  ivf-distill rollback URI VERSION   # point back at an earlier version (or: --rollback VERSION)

On a Ray cluster the same command is a script: ray job submit ... -- python jobs/distill.py ...

Exit codes: 0 done; 1 the job lost its lease on the output (it was taken over, or the storage
stopped answering) and stopped writing, or an unexpected error; 2 a mistake in the input, the
config or the arguments, or another job holds the output; 128 + signal number when interrupted
(a rerun resumes).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from pipeline import publish
from pipeline.config import PublishConfig, load_config
from pipeline.console import Console
from pipeline.errors import InputError
from pipeline.lease import LeaseHeld, LeaseLost
from pipeline.report import format_table
from pipeline.runner import STAGES, Interrupted, dry_run, rollback, run_pipeline


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="ivf-distill build", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", help="a preset (demo, smoke, example: ivf-distill presets) or "
                                     "a YAML file")
    ap.add_argument("--output", required=True, help="run folder: local path or s3://bucket/prefix")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set index.M=16 (repeatable)")
    ap.add_argument("--from-stage", choices=STAGES, help="rerun this stage and all later ones")
    ap.add_argument("--incremental", action="store_true",
                    help="after corpus files were added, changed or removed: keep the trained "
                         "quantizers, encode only new or changed shards, merge, evaluate")
    ap.add_argument("--rollback", metavar="VERSION",
                    help="point URI/manifest.json back at this earlier version and exit")
    ap.add_argument("--log", metavar="FILE",
                    help="write everything the job, Ray and faiss print to stderr to FILE, and "
                         "show only the job's own progress, warnings and errors")
    ap.add_argument("--dry-run", action="store_true",
                    help="print what the job would build and an estimate of its size and "
                         "stage times, from the inputs' metadata; start nothing, write nothing")
    ap.add_argument("--memory-budget", metavar="SIZE",
                    help="the index's size at most SIZE (e.g. 4GB): picks index.M "
                         "(index.memory_budget=SIZE, index.M=auto)")
    ap.add_argument("--break-lease", action="store_true",
                    help="take over the output's lease even if another job seems to hold it "
                         "(only when that job is known to be dead)")
    args = ap.parse_args(argv)
    if not args.rollback and not args.config:
        ap.error("--config is required (except with --rollback)")
    return args


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("aiobotocore", "botocore", "s3fs", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _summary(output: str, result: dict, total: float) -> None:
    if result["rows"]:
        print("\n" + format_table(result["rows"]))
    m = result["manifest"]
    parts = m["index_parts"]
    folder = parts[0].rsplit("/", 1)[0] + "/"
    size = sum(f["bytes"] for n, f in m["files"].items() if n.startswith(folder))
    root = output.rstrip("/")
    where = f"{root}/{parts[0]} (+ index.ivfdata)" if len(parts) == 1 else \
        f"{root}/{folder} ({len(parts)} parts, index.<p>.index + .ivfdata)"
    print(f"\nversion: {m['version']}")
    print(f"index: {where}, {m['counts']['vectors']} vectors, {size / 1e6:.1f} MB")
    report = f"{publish.VERSIONS}/{m['version']}/report.html"
    if report in m["files"]:
        print(f"report: {output.rstrip('/')}/{report}")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    print(f"total wall time: {total:.1f}s")


def _execute(args) -> None:
    if args.rollback:
        publish_cfg = load_config(args.config, args.overrides).publish if args.config \
            else PublishConfig()
        m = rollback(args.output, args.rollback, publish_cfg.lease_seconds, args.break_lease)
        print(f"rolled back: {args.output.rstrip('/')}/manifest.json -> {m['version']}")
        return
    budget = [f"index.memory_budget={args.memory_budget}", "index.M=auto"] \
        if args.memory_budget else []
    cfg = load_config(args.config, budget + args.overrides)
    if args.dry_run:
        print("\n".join(dry_run(cfg, args.output)))
        return
    t0 = time.time()
    result = run_pipeline(cfg, args.output, args.from_stage, args.incremental,
                          break_lease=args.break_lease)
    _summary(args.output, result, time.time() - t0)


def main(argv=None, exit_on_interrupt: bool = False) -> int:
    """Runs the job; returns its exit code. With exit_on_interrupt (the command line), an
    interrupted job ends the process at once: its stage is still running in a helper thread
    inside Ray calls, and a normal interpreter exit would wait on them."""
    args = parse_args(argv)
    console = Console(args.log) if args.log else None
    _setup_logging()
    try:
        return _run(args, exit_on_interrupt, console)
    finally:
        if console is not None:
            _shutdown_ray()  # the workers' last lines, which Ray relays late, reach the log
            console.close()


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _exit_now(code: int, console: Console | None) -> None:
    logging.shutdown()
    if console is not None:
        console.close()
    os._exit(code)


def _run(args, exit_on_interrupt: bool, console: Console | None) -> int:
    try:
        _execute(args)
    except InputError as e:  # the input, the config or the arguments: the message says the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LeaseHeld as e:
        print(f"output busy: {e}", file=sys.stderr)
        return 2
    except LeaseLost as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        if exit_on_interrupt:  # a stage may still run in its helper thread: end it with us
            _exit_now(1, console)
        return 1
    except Interrupted as e:
        where = f"during stage {e.stage}" if e.stage else "between stages"
        print(f"interrupted by {e} {where}; nothing new was published. Rerun the same command "
              "to resume: finished stages are kept" +
              (", and training continues from its last checkpoint" if e.stage == "train"
               else ""), file=sys.stderr, flush=True)
        if exit_on_interrupt:
            _exit_now(128 + e.signum, console)
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    sys.exit(main(exit_on_interrupt=True))
