"""Entry point: python jobs/distill.py --config jobs/configs/demo.yaml --output URI [--set k=v]

Runs ingest -> init -> teacher -> train -> export -> encode -> merge -> evaluate over a local
Ray cluster (or RAY_ADDRESS / ray.address), writing everything under --output (a local path or
an s3:// prefix). Finished stages are skipped on a rerun; --from-stage forces a rerun.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import load_config  # noqa: E402
from pipeline.runner import STAGES, run_pipeline  # noqa: E402
from pipeline.stages.evaluate import format_table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML preset, e.g. jobs/configs/demo.yaml")
    ap.add_argument("--output", required=True, help="run folder: local path or s3://bucket/prefix")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set index.M=16 (repeatable)")
    ap.add_argument("--from-stage", choices=STAGES, help="rerun this stage and all later ones")
    ap.add_argument("--incremental", action="store_true",
                    help="after corpus files were added, changed or removed: keep the trained "
                         "quantizers, encode only new or changed shards, merge, evaluate")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("aiobotocore", "botocore", "s3fs", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        result = run_pipeline(cfg, args.output, args.from_stage, args.incremental)
    except ValueError as e:
        print(f"input error: {e}", file=sys.stderr)
        return 2
    total = time.time() - t0
    if result["rows"]:
        print("\n" + format_table(result["rows"]))
    m = result["manifest"]
    size = sum(f.get("bytes", 0) for n, f in m["files"].items() if n.startswith("index/"))
    print(f"\nindex: {args.output.rstrip('/')}/{m['index']} (+ index.ivfdata), "
          f"{m['counts']['vectors']} vectors, {size / 1e6:.1f} MB")
    if "report.html" in m["files"]:
        print(f"report: {args.output.rstrip('/')}/report.html")
    print("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    print(f"total wall time: {total:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
