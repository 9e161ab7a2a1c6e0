"""export, encode, merge: learned parameters -> trained faiss index -> per-shard indexes ->
one on-disk index per method in the merge stage's folder, which pipeline.publish then
publishes as a version.

The distilled student ("distilled-ivfpq") goes through encode and merge, and with
build.baseline=full the faiss baseline ("faiss-ivfpq") too, so that evaluation compares like
with like over the whole corpus.
"""
from __future__ import annotations

import hashlib
import logging
import os

import faiss
import numpy as np
import ray

from pipeline import events, storage
from pipeline.data import readers
from pipeline.data.plan import Shard
from pipeline.distributed.placement import Group, placement
from pipeline.distributed.tasks import pin_threads, wait_all
from pipeline.index import build, ondisk
from pipeline.index.params import Params
from pipeline.workflow.results import (
    Encoded,
    Exported,
    Ingested,
    Merged,
    MergedIndex,
)
from pipeline.workflow.stage import METHODS, Context, Stage, built_methods

log = logging.getLogger("pipeline.stages.encode")


def run_export(ctx: Context) -> Exported:
    params = Params.from_arrays(storage.load_npz(ctx.upstream("train", "params.npz")))
    index = build.index_from_params(params, ctx.cfg.data.metric)
    with storage.scratch("export") as scratch:
        local = os.path.join(scratch, "trained.index")
        faiss.write_index(index, local)
        storage.upload_file(local, ctx.path("trained.index"))
    return Exported(d=index.d, bytes_per_vector=build.bytes_per_vector(ctx.cfg.index))


def n_ranges(ctx: Context, n: int) -> int:
    """Inverted-list ranges for the parallel merge of `n` vectors: ray.merge_ranges, or one
    per GiB of codes and ids and at least one per cluster CPU. Range tasks stream, so size
    bounds no memory."""
    cfg = ctx.cfg
    if cfg.ray.merge_ranges:
        return min(cfg.ray.merge_ranges, cfg.index.nlist)
    total = n * (build.bytes_per_vector(cfg.index) + 8)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return min(cfg.index.nlist, max(cpus, -(-total // (1 << 30))))


def _trained(ctx: Context, method: str) -> str:
    """The trained (empty) index of a method: init's baseline or export's student."""
    return ctx.upstream(*METHODS[method][0])


def _layout(ctx: Context, method: str) -> str:
    """Folder of a method's encoded shards, named by the trained index's content, so that a
    retrained quantizer never reuses stale codes."""
    digest = hashlib.sha256(storage.read_bytes(_trained(ctx, method))).hexdigest()[:12]
    return ctx.path(method, digest)


def put_index(uri: str) -> ray.ObjectRef:
    """The index file at `uri`, read once into the object store for _encode_shard tasks."""
    return ray.put(np.frombuffer(storage.read_bytes(uri), np.uint8))


@ray.remote(max_retries=3)
def _encode_shard(shard: dict, out_dirs: list[str], gpus: float, *trained: np.ndarray) -> list:
    """Reads one shard once and encodes it with each trained index into its out_dir:
    <shard key>.lists (ondisk.write_lists), then done/<shard key>.json. A shard whose marker
    exists in an out_dir is already encoded there (a retry, a resumed run, or an unchanged
    shard in an incremental rebuild). Returns the vectors encoded per out_dir.

    trained: the serialized trained indexes (uint8), put in the object store once each and
    shared zero-copy by the tasks of a node."""
    s = Shard(**shard)
    markers = [storage.join(d, "done", f"{s.key}.json") for d in out_dirs]
    counts = [storage.read_json(m)["ntotal"] if storage.exists(m) else None for m in markers]
    if all(c is not None for c in counts):
        return counts
    pin_threads()
    ids, x = readers.read_rows(s.uri, s.start, s.stop, s.id_offset)
    for i, (out_dir, blob) in enumerate(zip(out_dirs, trained)):
        if counts[i] is not None:
            continue
        index = ondisk.encode_shard(faiss.deserialize_index(blob), ids, x, use_gpu=gpus > 0)
        events.emit("encode")  # a shard encoded, not yet written
        with storage.scratch("encode") as scratch:
            local = os.path.join(scratch, "shard.lists")
            with open(local, "wb") as f:
                counts[i] = ondisk.write_lists(index, f)
            storage.upload_file(local, storage.join(out_dir, f"{s.key}.lists"))
        storage.write_json(markers[i], {"ntotal": counts[i], "shard": shard})
    return counts


def run_encode(ctx: Context) -> Encoded:
    ingested: Ingested = ctx.inputs["ingest"]
    gpus = ctx.cfg.ray.gpus_per_task
    # Encoding on GPUs runs where the GPUs are: the GPU group's nodes.
    group = Group.GPU if gpus else Group.CPU
    encode = _encode_shard.options(num_gpus=gpus, resources=placement(ctx.cfg.ray, group))
    if gpus and not ondisk.gpu_count():
        log.warning("encode: ray.gpus_per_task=%s but this faiss has no GPU support "
                    "(faiss-cpu): encoding on the CPU", gpus)
    methods = built_methods(ctx.cfg.build)
    layouts = {m: _layout(ctx, m) for m in methods}
    blobs = [put_index(_trained(ctx, m)) for m in methods]
    # One task per shard encodes it for every method: the corpus is read once.
    refs = [encode.remote(s, list(layouts.values()), gpus, *blobs) for s in ingested.shards]
    counts = wait_all(refs, "encode: shards")
    totals = {m: sum(c[i] for c in counts) for i, m in enumerate(methods)}
    for m, t in totals.items():
        assert t == ingested.n, f"{m}: encoded {t} vectors, the corpus has {ingested.n}"
    return Encoded(counts=totals, shards=len(ingested.shards), layouts=layouts)


@ray.remote(max_retries=2)
def _merge_range(shard_uris: list[str], l0: int, l1: int, slice_uri: str) -> np.ndarray:
    """Lists l0..l1 of every encoded shard -> one slice file; returns the list sizes."""
    pin_threads()
    with storage.scratch("range") as scratch:
        local = os.path.join(scratch, "slice.ivfdata")
        openers = [lambda u=u: storage.open_ranged(u) for u in shard_uris]
        sizes = ondisk.merge_range(openers, l0, l1, local)
        storage.upload_file(local, slice_uri)
    return sizes


@ray.remote(max_retries=2)
def _stitch(trained_uri: str, slice_uris: list[str], sizes: np.ndarray, out_uri: str) -> dict:
    """Joins the slices into out_uri/index.ivfdata where they lie (storage.concat: S3
    UploadPartCopy, or copy_file_range locally: no node copies the index) and writes
    out_uri/index.index, which records the bare name "index.ivfdata": the pair opens wherever
    it is copied, with IO_FLAG_ONDISK_SAME_DIR (publishing gives local copies their absolute
    path)."""
    pin_threads()
    data_uri = storage.join(out_uri, "index.ivfdata")
    # The .ivfdata goes first: a reader never finds an .index whose data is missing.
    moved = storage.concat(slice_uris, data_uri)
    with storage.scratch("merge") as scratch:
        index_path, nbytes, ntotal = ondisk.lists_index(
            storage.read_index(trained_uri), sizes, scratch, "index", "index.ivfdata")
        assert storage.size(data_uri) == nbytes, "slice files do not add up to the lists"
        files = {"index.ivfdata": {"sha256": storage.sha256_uri(data_uri), "bytes": nbytes},
                 "index.index": {"sha256": storage.sha256_file(index_path),
                                 "bytes": os.path.getsize(index_path)}}
        storage.upload_file(index_path, storage.join(out_uri, "index.index"))
    return {"ntotal": ntotal, "files": files, "bytes_through_task": moved["through_here"]}


@ray.remote(max_retries=2)
def _export_fastscan(folder_uri: str) -> dict:
    """folder_uri's merged on-disk 4-bit IVF-PQ, converted to faiss IndexIVFPQFastScan and
    written beside it as fastscan.index; returns its {sha256, bytes}. The task holds the
    whole fast-scan index (codes and ids) in memory: faiss keeps fast-scan lists nowhere
    else."""
    pin_threads()
    with storage.scratch("fastscan") as scratch:
        folder = storage.local_folder(folder_uri, ondisk.PAIR, scratch)
        index = build.to_fastscan(ondisk.read_ondisk(os.path.join(folder, "index.index")))
        local = os.path.join(scratch, ondisk.FASTSCAN)
        faiss.write_index(index, local)
        del index
        meta = {"sha256": storage.sha256_file(local), "bytes": os.path.getsize(local)}
        storage.upload_file(local, storage.join(folder_uri, ondisk.FASTSCAN))
    return meta


def run_merge(ctx: Context) -> Merged:
    ingested: Ingested = ctx.inputs["ingest"]
    enc: Encoded = ctx.inputs["encode"]
    n = ingested.n
    keys = [Shard(**s).key for s in ingested.shards]
    ranges = ondisk.list_ranges(ctx.cfg.index.nlist, n_ranges(ctx, n))
    where = placement(ctx.cfg.ray, Group.CPU)
    merge_range = _merge_range.options(resources=where)
    methods = list(enc.layouts)
    refs = []
    for method in methods:
        uris = [storage.join(enc.layouts[method], f"{k}.lists") for k in keys]
        refs += [merge_range.remote(uris, l0, l1, _slice_uri(ctx, method, r))
                 for r, (l0, l1) in enumerate(ranges)]
    flat = wait_all(refs, "merge: list ranges")
    R = len(ranges)
    sizes = {m: np.concatenate(flat[i * R:(i + 1) * R]) for i, m in enumerate(methods)}
    stitch = _stitch.options(resources=where)
    refs = [stitch.remote(_trained(ctx, m), [_slice_uri(ctx, m, r) for r in range(R)],
                          sizes[m], ctx.path(m)) for m in methods]
    results = dict(zip(methods, wait_all(refs, "merge: stitch")))
    if ctx.cfg.build.fastscan:
        export = _export_fastscan.options(resources=where)
        refs = [export.remote(ctx.path(m)) for m in methods]
        for m, meta in zip(methods, wait_all(refs, "merge: fast-scan export")):
            results[m]["files"]["fastscan.index"] = meta
    for m, r in results.items():
        assert r["ntotal"] == n, f"{m}: merged {r['ntotal']} vectors, the corpus has {n}"
    storage.delete(ctx.path("slices"))  # copied into the indexes
    log.info("merge: %d vectors per index, %d list ranges; stitched where they lie (%d bytes "
             "passed through the stitch tasks)", n, R,
             sum(r["bytes_through_task"] for r in results.values()))
    return Merged(indexes={m: MergedIndex(folder=METHODS[m][1], uri=ctx.path(m), **r)
                           for m, r in results.items()}, ranges=R)


def _slice_uri(ctx: Context, method: str, r: int) -> str:
    return ctx.path("slices", method, f"slice-{r:05d}.ivfdata")


# export: the student's learned parameters as a faiss index of the configured structure.
EXPORT = Stage("export", sections=("index", "data"), needs=("train",), result=Exported,
               run=run_export)
# encode: every corpus shard, once, with each built method's trained index (build.baseline
# says which are built; its other settings change no code).
ENCODE = Stage("encode", sections=("build",), needs=("ingest", "init", "export"),
               result=Encoded, run=run_encode)
# merge: the encoded shards as one on-disk index per method (and its fast-scan export).
MERGE = Stage("merge", sections=("build", "index"), needs=("ingest", "init", "export", "encode"),
              result=Merged, run=run_merge)
