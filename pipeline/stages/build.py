"""export, encode, merge: learned parameters -> trained faiss index -> per-shard indexes ->
one on-disk index, published under the output with a manifest.

Two indexes go through encode and merge: the faiss baseline ("faiss-ivfpq") and the distilled
student ("distilled-ivfpq"), so evaluation compares like with like.
"""
from __future__ import annotations

import logging
import os
import shutil

import faiss
import ray

from pipeline import storage
from pipeline.data import readers
from pipeline.data.plan import Shard
from pipeline.index import build, ondisk
from pipeline.stages.common import Run, pin_threads, wait_all
from pipeline.stages.init import load_index

log = logging.getLogger("pipeline.stages.build")

# method name -> (trained index in the run folder, published folder)
METHODS = {
    "faiss-ivfpq": (("init", "baseline.index"), "baseline"),
    "distilled-ivfpq": (("export", "trained.index"), "index"),
}


def method_names(cfg) -> dict:
    """Report names: faiss-ivf-opq / distilled-ivf-opq when a rotation is learned."""
    suffix = "ivf-opq" if cfg.index.opq else "ivfpq"
    return {"faiss-ivfpq": f"faiss-{suffix}", "distilled-ivfpq": f"distilled-{suffix}"}


def run_export(run: Run) -> dict:
    params = storage.load_npz(run.stage_path("train", "params.npz"))
    index = build.index_from_params(params, run.cfg.index.metric)
    scratch = storage.local_scratch("export")
    local = os.path.join(scratch, "trained.index")
    faiss.write_index(index, local)
    storage.upload_file(local, run.stage_path("export", "trained.index"))
    shutil.rmtree(scratch)
    return {"d": index.d, "bytes_per_vector": build.bytes_per_vector(run.cfg.index)}


@ray.remote(max_retries=3)
def _encode_shard(shard: dict, trained_uri: str, out_uri: str) -> int:
    pin_threads()
    s = Shard(**shard)
    ids, x = readers.read_rows(s.uri, s.start, s.stop, s.id_offset)
    index = ondisk.encode_shard(load_index(trained_uri), ids, x)
    scratch = storage.local_scratch("encode")
    local = os.path.join(scratch, "shard.index")
    faiss.write_index(index, local)
    storage.upload_file(local, out_uri)  # atomic: a retried task overwrites whole files
    shutil.rmtree(scratch)
    return index.ntotal


def run_encode(run: Run) -> dict:
    shards = run.stage_info("ingest")["shards"]
    refs, names = [], []
    for method, (trained, _) in METHODS.items():
        for s in shards:
            out = run.stage_path("encode", method, f"shard-{s['shard_id']:05d}.index")
            refs.append(_encode_shard.remote(s, run.stage_path(*trained), out))
            names.append(method)
    counts = wait_all(refs, "encode: shards")
    totals = {m: sum(c for c, n in zip(counts, names) if n == m) for m in METHODS}
    n = run.stage_info("ingest")["n"]
    for m, t in totals.items():
        assert t == n, f"{m}: encoded {t} vectors, the corpus has {n}"
    return {"counts": totals, "shards": len(shards)}


@ray.remote(max_retries=2)
def _merge_method(trained_uri: str, shard_uris: list[str], publish_uri: str) -> dict:
    pin_threads()
    scratch = storage.local_scratch("merge")
    local_shards = []
    for i, u in enumerate(shard_uris):
        p = os.path.join(scratch, f"shard-{i:05d}.index")
        storage.download_file(u, p)
        local_shards.append(p)
    out = os.path.join(scratch, "out")
    os.makedirs(out)
    # Local outputs record the final absolute .ivfdata path, so plain faiss.read_index works;
    # S3 outputs record the bare name (open with IO_FLAG_ONDISK_SAME_DIR after download).
    stored = "index.ivfdata" if storage.is_s3(publish_uri) else \
        os.path.join(os.path.abspath(publish_uri), "index.ivfdata")
    index_path, ivfdata, ntotal = ondisk.merge_ondisk(load_index(trained_uri), local_shards, out,
                                                      "index", stored)
    files = {}
    # The .ivfdata goes first: a reader never finds an .index whose data is missing.
    for p in (ivfdata, index_path):
        name = os.path.basename(p)
        files[name] = {"sha256": storage.sha256_file(p), "bytes": os.path.getsize(p)}
        storage.upload_file(p, storage.join(publish_uri, name))
    shutil.rmtree(scratch)
    return {"ntotal": ntotal, "files": files}


def run_merge(run: Run) -> dict:
    shards = run.stage_info("ingest")["shards"]
    storage.delete(run.path("manifest.json"))  # nothing is advertised while files change
    refs = []
    for method, (trained, folder) in METHODS.items():
        uris = [run.stage_path("encode", method, f"shard-{s['shard_id']:05d}.index")
                for s in shards]
        refs.append(_merge_method.remote(run.stage_path(*trained), uris, run.path(folder)))
    results = dict(zip(METHODS, wait_all(refs, "merge")))
    n = run.stage_info("ingest")["n"]
    for m, r in results.items():
        assert r["ntotal"] == n, f"{m}: merged {r['ntotal']} vectors, the corpus has {n}"
    log.info("merge: %d vectors per index published under %s", n, run.output)
    return {m: {"folder": METHODS[m][1], **r} for m, r in results.items()}


def publish_manifest(run: Run, report_sha: str | None, stage_seconds: dict) -> dict:
    merged = run.stage_info("merge")
    ingest = run.stage_info("ingest")
    files = {}
    for m, r in merged.items():
        for name, meta in r["files"].items():
            files[f"{r['folder']}/{name}"] = meta
    if report_sha:
        files["report.json"] = {"sha256": report_sha}
    manifest = {
        "index": "index/index.index",
        "ivfdata": "index/index.ivfdata",
        "baseline_index": "baseline/index.index",
        "counts": {"vectors": ingest["n"], "shards": len(ingest["shards"]), "d": ingest["d"]},
        "parameters": {**run.cfg.to_dict()["index"],
                       "bytes_per_vector": build.bytes_per_vector(run.cfg.index)},
        "config_hash": run.cfg.hash(),
        "files": files,
        "stage_seconds": stage_seconds,
        "open_with": "faiss.read_index(path) for a local output, or "
                     "faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR) after copying "
                     "index.index and index.ivfdata into one folder",
    }
    storage.write_json(run.path("manifest.json"), manifest)
    return manifest


