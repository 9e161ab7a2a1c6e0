"""Copies a run's current published version (its index, baseline, report and config, and the
manifest that points at it) between a local path and an s3:// prefix, e.g. to keep a demo's
results after the local S3 endpoint stops.

  python jobs/copy_run.py s3://demo/runs/demo runs/demo

The source's manifest is read once, so the copy is one whole version even while the source
is being republished. The destination's manifest is written last.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline import publish, storage  # noqa: E402
from pipeline.index import ondisk  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    try:
        manifest = publish.resolve(args.src)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        for rel in sorted(manifest["files"], key=lambda r: r.endswith(".index")):
            local = os.path.join(tmp, rel.replace("/", "_"))
            storage.download_file(storage.join(args.src, rel), local)
            storage.upload_file(local, storage.join(args.dst, rel))
            print(f"copied {rel}")
        if not storage.is_s3(args.dst):  # local copies open with plain faiss.read_index
            for rel in (manifest["index"], manifest["baseline_index"]):
                path = storage.get_fs(storage.join(args.dst, rel))[1]
                ondisk.retarget(path, os.path.join(os.path.dirname(path), "index.ivfdata"),
                                path)
                manifest["files"][rel] = {"sha256": storage.sha256_file(path),
                                          "bytes": os.path.getsize(path)}
        version = storage.join(args.dst, publish.VERSIONS, manifest["version"],
                               publish.POINTER)
        storage.write_json(version, manifest)
        storage.write_json(storage.join(args.dst, publish.POINTER), manifest)
    print(f"{args.dst}: version {manifest['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
