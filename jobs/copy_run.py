"""Copies a run's published artifacts (manifest, report, config, index/, baseline/) between a
local path and an s3:// prefix, e.g. to keep a demo's results after the local S3 endpoint stops.

  python jobs/copy_run.py s3://demo/runs/demo runs/demo
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import storage  # noqa: E402

PUBLISHED = ["index/index.ivfdata", "index/index.index", "baseline/index.ivfdata",
             "baseline/index.index", "report.json", "report.html", "report-recall.png",
             "report-loss.png", "config.json", "manifest.json"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    if not storage.exists(storage.join(args.src, "manifest.json")):
        print(f"{args.src} has no manifest.json: the run is not published", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for name in PUBLISHED:  # manifest.json last: the copy is whole once it appears
            src = storage.join(args.src, name)
            if not storage.exists(src):
                continue
            local = os.path.join(tmp, name.replace("/", "_"))
            storage.download_file(src, local)
            storage.upload_file(local, storage.join(args.dst, name))
            print(f"copied {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
