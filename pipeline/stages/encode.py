"""export, encode, merge: learned parameters -> trained faiss index -> per-shard indexes ->
one on-disk index per method, in parts, in the merge stage's folder, which pipeline.publish
then publishes as a version.

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
from pipeline.distributed.placement import (
    Group,
    largest_node_cpus,
    largest_node_gpus,
    memory,
    placement,
)
from pipeline.distributed.tasks import pin_threads, task_window, wait_all, windowed
from pipeline.index import build, gpu, ondisk
from pipeline.index.params import Params
from pipeline.workflow.results import (
    Encoded,
    Exported,
    Ingested,
    Merged,
    MergedIndex,
)
from pipeline.workflow.stage import METHODS, Context, Stage, built_methods

log = logging.getLogger("ivf_distill.stages.encode")


@ray.remote(max_retries=2)
def _export(params_uri: str, metric: str, coarse, out_uri: str) -> int:
    """The student's parameters as a trained (empty) faiss index at out_uri; returns its d.
    A task, so that the driver never holds the centroids (nlist x d)."""
    pin_threads()
    params = Params.from_arrays(storage.load_npz(params_uri))
    index = build.index_from_params(params, metric, coarse)
    with storage.scratch("export") as scratch:
        local = os.path.join(scratch, "trained.index")
        faiss.write_index(index, local)
        storage.upload_file(local, out_uri)
    return index.d


def run_export(ctx: Context) -> Exported:
    params = ctx.upstream("train", "params.npz")
    # the parameters, the index built from them and its serialized copy
    need = 3 * storage.size(params)
    task = _export.options(resources=placement(ctx.cfg.ray, Group.CPU),
                           memory=memory(ctx.cfg.ray, Group.CPU, need))
    d = ray.get(task.remote(params, ctx.cfg.data.metric, ctx.cfg.index.coarse,
                            ctx.path("trained.index")))
    return Exported(d=d, bytes_per_vector=build.bytes_per_vector(ctx.cfg.index))


# Parts: about this many bytes of codes and ids each, when build.output_parts is 0.
PART_BYTES = 1 << 30


def n_parts(ctx: Context, n: int) -> int:
    """Parts of each index: build.output_parts, or one per GiB of codes and ids (so one for
    small corpora), never more than the lists."""
    cfg = ctx.cfg
    if cfg.build.output_parts:
        return min(cfg.build.output_parts, cfg.index.nlist)
    total = n * (build.bytes_per_vector(cfg.index) + 8)
    return int(min(cfg.index.nlist, max(1, -(-total // PART_BYTES))))


def _trained(ctx: Context, method: str) -> str:
    """The trained (empty) index of a method: init's baseline or export's student."""
    return ctx.upstream(*METHODS[method][0])


def _layout(ctx: Context, method: str, digest: str) -> str:
    """Folder of a method's encoded shards, named by the trained index's content and the
    files' layout, so that a retrained quantizer or a new layout never reuses stale codes."""
    return ctx.path(method, f"{digest[:12]}.v{ondisk.LISTS_LAYOUT}")


@ray.remote(num_returns=2)
def _load_index(uri: str) -> tuple[str, np.ndarray]:
    """A serialized index read once: (its sha256, its bytes). The bytes stay in the object
    store for _encode_shard tasks (shared zero-copy by the tasks of a node); the driver
    fetches the digest only, so it never holds the index (nlist x d centroids)."""
    data = storage.read_bytes(uri)
    return hashlib.sha256(data).hexdigest(), np.frombuffer(data, np.uint8)


@ray.remote(max_retries=3)
def _encode_shard(shard: dict, out_dirs: list[str], gpus: float, *trained: np.ndarray) -> dict:
    """Reads one shard once and encodes it with each trained index into its out_dir:
    <shard key>.lists (ondisk.write_lists), then done/<shard key>.json. A shard whose marker
    exists in an out_dir is already encoded there (a retry, a resumed run, or an unchanged
    shard in an incremental rebuild). Returns {"counts": vectors encoded per out_dir,
    "device": where it encoded (pipeline.index.gpu.encode; "" when nothing was left to do)}.

    trained: the serialized trained indexes (uint8), put in the object store once each and
    shared zero-copy by the tasks of a node."""
    s = Shard(**shard)
    markers = [storage.join(d, "done", f"{s.key}.json") for d in out_dirs]
    counts = [storage.read_json(m)["ntotal"] if storage.exists(m) else None for m in markers]
    if all(c is not None for c in counts):
        return {"counts": counts, "device": ""}
    pin_threads()
    device = ""
    ids, x = readers.read_shard(s)
    for i, (out_dir, blob) in enumerate(zip(out_dirs, trained)):
        if counts[i] is not None:
            continue
        index, device = gpu.encode(faiss.deserialize_index(blob), ids, x, use_gpu=gpus > 0)
        events.emit("encode")  # a shard encoded, not yet written
        with storage.scratch("encode") as scratch:
            local = os.path.join(scratch, "shard.lists")
            with open(local, "wb") as f:
                counts[i] = ondisk.write_lists(index, f)
            storage.upload_file(local, storage.join(out_dir, f"{s.key}.lists"))
        storage.write_json(markers[i], {"ntotal": counts[i], "shard": shard})
    return {"counts": counts, "device": device}


def run_encode(ctx: Context) -> Encoded:
    ingested: Ingested = ctx.inputs["ingest"]
    gpus = ctx.cfg.ray.gpus_per_task
    # Encoding on GPUs runs where the GPUs are: the GPU group's nodes.
    group = Group.GPU if gpus else Group.CPU
    methods = built_methods(ctx.cfg.build)
    sizes = [storage.size(_trained(ctx, m)) for m in methods]
    load = [_load_index.options(resources=placement(ctx.cfg.ray, group),
                                memory=memory(ctx.cfg.ray, group, 2 * size))
            .remote(_trained(ctx, m)) for m, size in zip(methods, sizes)]
    blobs = [blob for _, blob in load]
    layouts = {m: _layout(ctx, m, digest)
               for m, digest in zip(methods, ray.get([digest for digest, _ in load]))}
    # A task holds its shard (as read, and as float32), the trained indexes, and for each
    # method the encoded shard and its file.
    rows = max(Shard(**s).rows for s in ingested.shards)
    code = build.bytes_per_vector(ctx.cfg.index) + 8
    need = rows * (8 * ingested.d + 2 * code * len(methods)) + 2 * sum(sizes)
    # A GPU encode task takes its share of its node's CPUs too: the OPQ rotation and the
    # Parquet decode run there, and with one CPU they would starve the GPU.
    cpus = max(1, int(gpus * largest_node_cpus(ctx.cfg.ray, group) /
                      max(largest_node_gpus(ctx.cfg.ray, group), 1))) if gpus else 1
    encode = _encode_shard.options(num_gpus=gpus, num_cpus=cpus,
                                   resources=placement(ctx.cfg.ray, group),
                                   memory=memory(ctx.cfg.ray, group, need))
    # One task per shard encodes it for every method: the corpus is read once. The driver
    # holds the refs of a window of them, not of every shard.
    done = windowed([lambda s=s: encode.remote(s, list(layouts.values()), gpus, *blobs)
                     for s in ingested.shards], "encode: shards", task_window())
    totals = {m: sum(d["counts"][i] for d in done) for i, m in enumerate(methods)}
    devices = sorted({d["device"] for d in done if d["device"]})
    for m, t in totals.items():
        assert t == ingested.n, f"{m}: encoded {t} vectors, the corpus has {ingested.n}"
    where = f"{', '.join(devices) or 'nothing new to encode'}; {gpu.library()}"
    log.info("encode: %d shards on %s", len(ingested.shards), where)
    return Encoded(counts=totals, shards=len(ingested.shards), layouts=layouts, device=where)


@ray.remote(max_retries=2)
def _write_part(trained_uri: str, shards: list[tuple[str, int]], l0: int, l1: int, p: int,
                parts: int, out_uri: str, fastscan: bool) -> dict:
    """Part p of an index: lists [l0, l1) of every encoded shard (shards: (uri, rows), in
    shard order), read with two ranged requests per shard, written as a complete faiss index
    (out_uri/index[.p].index + .ivfdata, the header recording the bare data name, so the pair
    opens wherever it is copied, with IO_FLAG_ONDISK_SAME_DIR). With `fastscan` the part is
    also converted on its own (fastscan[.p].index), so no task holds more than one part.
    Each file's sha256 is taken here, where it is written. Returns {"ntotal", "files",
    "requests", "bytes_read"}."""
    pin_threads()
    trained = storage.read_index(trained_uri)
    ivf = faiss.extract_index_ivf(trained)
    header, data = ondisk.part_files(p, parts)
    counted = {"requests": 0, "bytes_read": 0}

    def reader(uri):
        def read(start, stop):
            counted["requests"] += stop > start
            counted["bytes_read"] += stop - start
            return storage.read_range(uri, start, stop)
        return read

    lists = [ondisk.ShardLists(reader(uri), ivf.nlist, ivf.code_size, rows, l0, l1)
             for uri, rows in shards]
    files = {}
    with storage.scratch("part") as scratch:
        local_data = os.path.join(scratch, data)
        sizes = np.zeros(ivf.nlist, np.int64)
        sizes[l0:l1] = ondisk.merge_part(lists, local_data)
        index_path, nbytes, ntotal = ondisk.lists_index(trained, sizes, scratch,
                                                        header[:-len(".index")], data)
        assert os.path.getsize(local_data) == nbytes, "the part's data does not match its lists"
        # The data goes first: a reader never finds a header whose data is missing.
        for name, local in ((data, local_data), (header, index_path)):
            files[name] = {"sha256": storage.sha256_file(local), "bytes": os.path.getsize(local)}
            storage.upload_file(local, storage.join(out_uri, name))
        if fastscan:
            name = ondisk.fastscan_file(p, parts)
            local = os.path.join(scratch, name)
            faiss.write_index(build.to_fastscan(ondisk.read_ondisk(index_path)), local)
            files[name] = {"sha256": storage.sha256_file(local), "bytes": os.path.getsize(local)}
            storage.upload_file(local, storage.join(out_uri, name))
    return {"ntotal": ntotal, "files": files, **counted}


def run_merge(ctx: Context) -> Merged:
    ingested: Ingested = ctx.inputs["ingest"]
    enc: Encoded = ctx.inputs["encode"]
    n = ingested.n
    shards = [Shard(**s) for s in ingested.shards]
    parts = n_parts(ctx, n)
    ranges = ondisk.list_ranges(ctx.cfg.index.nlist, parts)
    # A part task holds one shard's range at a time (at most the whole shard) and the trained
    # index; its part is written to disk, not held, except as a fast-scan export.
    code = build.bytes_per_vector(ctx.cfg.index) + 8
    trained = max(storage.size(_trained(ctx, m)) for m in enc.layouts)
    need = max(s.rows for s in shards) * code + 2 * trained + \
        (2 * code * -(-n // parts) if ctx.cfg.build.fastscan else 0)
    write = _write_part.options(resources=placement(ctx.cfg.ray, Group.CPU),
                                memory=memory(ctx.cfg.ray, Group.CPU, need))
    methods = list(enc.layouts)
    refs = []
    for method in methods:
        # A fresh run's folder: parts of an earlier, differently cut run never mix in.
        storage.delete(ctx.path(method))
        listed = [(storage.join(enc.layouts[method], f"{s.key}.lists"), s.rows) for s in shards]
        refs += [write.remote(_trained(ctx, method), listed, l0, l1, p, parts, ctx.path(method),
                              ctx.cfg.build.fastscan)
                 for p, (l0, l1) in enumerate(ranges)]
    done = wait_all(refs, "merge: parts")
    indexes, requests, read = {}, 0, 0
    for i, m in enumerate(methods):
        mine = done[i * parts:(i + 1) * parts]
        ntotal = sum(r["ntotal"] for r in mine)
        assert ntotal == n, f"{m}: merged {ntotal} vectors, the corpus has {n}"
        files = {name: meta for r in mine for name, meta in r["files"].items()}
        indexes[m] = MergedIndex(
            folder=METHODS[m][1], uri=ctx.path(m), ntotal=ntotal, files=files,
            parts=[ondisk.part_files(p, parts)[0] for p in range(parts)],
            fastscan=[ondisk.fastscan_file(p, parts) for p in range(parts)]
            if ctx.cfg.build.fastscan else [])
        requests += sum(r["requests"] for r in mine)
        read += sum(r["bytes_read"] for r in mine)
    log.info("merge: %d vectors per index in %d part(s); %d ranged reads of encoded shards "
             "(%d bytes)", n, parts, requests, read)
    return Merged(indexes=indexes, parts=parts, requests=requests, bytes_read=read)


# export: the student's learned parameters as a faiss index of the configured structure.
EXPORT = Stage("export", sections=("index", "data"), needs=("train",), result=Exported,
               run=run_export)
# encode: every corpus shard, once, with each built method's trained index (build.baseline
# says which are built; its other settings change no code). It reads index for the size of
# a code, which its upstream keys cover already.
ENCODE = Stage("encode", sections=("build", "index"), needs=("ingest", "init", "export"),
               result=Encoded, run=run_encode, format=2)
# merge: the encoded shards as one on-disk index per method, in build.output_parts parts (and
# their fast-scan exports).
MERGE = Stage("merge", sections=("build", "index"), needs=("ingest", "init", "export", "encode"),
              result=Merged, run=run_merge, format=2)
