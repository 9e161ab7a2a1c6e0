"""Copies a run's current published version (its index, baseline, report and config, and the
manifest that points at it) between a local path and an s3:// prefix, e.g. to keep a demo's
results after the local S3 endpoint stops.

  ivf-distill copy s3://demo/runs/demo runs/demo

The source's manifest is read once, so the copy is one whole version even while the source
is being republished. Every name in it must lie under its version's folder, and every file
copied must match the sha256 the manifest gives. The copy holds the destination's lease, as a
publishing job does, and points the destination's manifest at the new version with the same
conditional swap, so it never races a job publishing there.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from pipeline import lease, publish, storage
from pipeline.config import PublishConfig
from pipeline.errors import InputError
from pipeline.index import ondisk


def _copy_file(src: str, dst: str, rel: str, want: dict, tmp: str, held) -> None:
    local = os.path.join(tmp, rel.replace("/", "_"))
    storage.download_file(storage.join(src, rel), local)
    got = {"sha256": storage.sha256_file(local), "bytes": os.path.getsize(local)}
    if got != want:
        raise InputError(f"{storage.join(src, rel)}: {got} where its manifest gives {want}; "
                         "the source version is damaged")
    held.check(held.timeout)
    storage.upload_file(local, storage.join(dst, rel))
    print(f"copied {rel}")


def copy_run(src: str, dst: str, ttl_s: float, break_lease: bool = False) -> dict:
    """Copies src's current version into dst and makes it dst's current version."""
    storage.check_uri(dst, "destination", folder=True)
    manifest = publish.resolve(src)
    with lease.hold(dst, ttl_s, break_lease) as held, \
            tempfile.TemporaryDirectory() as tmp:
        current, tag = publish.read_pointer(dst)
        # headers after their data: a header names an .ivfdata that must already be there
        for rel in sorted(manifest["files"], key=lambda r: r.endswith(".index")):
            _copy_file(src, dst, rel, manifest["files"][rel], tmp, held)
        if not storage.is_s3(dst):  # local copies open with plain faiss.read_index
            for rel in [r for r in manifest["files"]
                        if ondisk.HEADER_RE.match(r.rsplit("/", 1)[-1])]:
                path = storage.get_fs(storage.join(dst, rel))[1]
                ondisk.retarget(path, ondisk.data_file(path), path)
                manifest["files"][rel] = {"sha256": storage.sha256_file(path),
                                          "bytes": os.path.getsize(path)}
        vdir = storage.join(dst, publish.VERSIONS, manifest["version"])
        data = storage.json_bytes(manifest)
        held.write(storage.join(vdir, publish.POINTER), data)
        publish.verify(dst, manifest["files"])
        publish.swap(dst, data, tag, manifest["version"], (current or {}).get("version"), held)
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ivf-distill copy", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--lease-seconds", type=float, default=PublishConfig().lease_seconds,
                    help="the destination lease's time to live")
    ap.add_argument("--break-lease", action="store_true",
                    help="take over the destination's lease even if a job seems to hold it")
    args = ap.parse_args(argv)
    try:
        manifest = copy_run(args.src, args.dst, args.lease_seconds, args.break_lease)
    except (InputError, lease.LeaseHeld) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dst}: version {manifest['version']}")
    report = f"{publish.VERSIONS}/{manifest['version']}/report.html"
    if report in manifest["files"]:
        print(f"report: {storage.join(args.dst, report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
