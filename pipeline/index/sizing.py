"""Index sizes from the data and a budget, and what a build will cost, before any work.

`resolve` turns index.nlist: auto and index.M: auto (with index.memory_budget) into numbers;
`plan_lines` is what `ivf-distill build --dry-run` prints. The stage times come from the unit
costs measured on this project's 2-core machine (docs/scale.md, "Measured unit costs"),
scaled by each stage's arithmetic: the steady rates of large runs. Small runs pay fixed costs
besides (task start-up, Ray Data, the teacher's per-block work): the demo's stages take
tens of seconds each where these rates give seconds (docs/benchmarks.md).
"""
from __future__ import annotations

import math

from pipeline.config import IndexConfig, PipelineConfig, Quantizer
from pipeline.config.modes import AUTO, parse_size
from pipeline.errors import InputError

LIST_MIN_POINTS = 39  # faiss's k-means warns below this many training points per centroid
MAX_AUTO_NLIST = 1 << 18
ID_BYTES = 8  # an on-disk list stores each vector's int64 id beside its code

# Unit costs per core, measured with bench/scale.py on 2 cores (docs/scale.md).
KNN_PAIRS_PER_CORE_D128 = 1.76e8  # exact kNN query-document pairs/s at d = 128
ENCODE_PER_CORE = 8.5e4  # vectors/s at d = 128, nlist 1,024, 16 B
INGEST_PER_CORE = 5.0e4  # vectors/s read, checked and sampled
KMEANS_FLOPS_PER_CORE = 4.0e9  # sample x nlist x d x 2 x niter, as init runs it
TRAIN_QUERIES_PER_WORKER_D384 = 226.0  # training queries/s per 2-core worker at d = 384, 8 B


def auto_nlist(n: int, sample: int) -> int:
    """A power of two near 4 sqrt(n) (faiss's rule of thumb), at most the sample over 39
    points per list and at most n / 39, at least 1."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    cap = max(1, min(sample, n) // LIST_MIN_POINTS)
    while nlist > cap or nlist > MAX_AUTO_NLIST:
        nlist //= 2
    return max(1, nlist)


def index_bytes(n: int, d: int, ix: IndexConfig) -> int:
    """The published index's size: codes and ids of n vectors, the centroids, the codebooks
    and the OPQ rotation."""
    codes = n * (ix.M * ix.nbits // 8 + ID_BYTES)
    quantizers = ix.nlist * d * 4 + ix.M * (1 << ix.nbits) * max(d // ix.M, 1) * 4
    return codes + quantizers + (d * d * 4 if ix.opq else 0)


def _M_candidates(d: int, ix: IndexConfig) -> list[int]:
    ms = range(1, 129)
    if ix.quantizer == Quantizer.PQ:
        ms = [m for m in ms if d % m == 0]
    if ix.quantizer == Quantizer.LSQ:
        ms = [m for m in ms if m >= 4]
    return list(ms)


def resolve(ix: IndexConfig, n: int, d: int, sample: int) -> tuple[dict, list[str]]:
    """({"index.nlist": .., "index.M": ..} for the auto values, lines saying why); raises
    InputError when the budget cannot hold the index at any size."""
    changes, notes = {}, []
    nlist = ix.nlist
    if nlist == AUTO:
        nlist = auto_nlist(n, sample)
        changes["index.nlist"] = nlist
        notes.append(f"index.nlist: auto -> {nlist} (about 4 sqrt({n:,}) as a power of two, "
                     f"at least {LIST_MIN_POINTS} of the {min(sample, n):,} sample vectors a "
                     "list)")
    budget = parse_size(ix.memory_budget, "index.memory_budget") if ix.memory_budget else 0
    sized = IndexConfig(nlist=nlist, M=8 if ix.M == AUTO else ix.M, nbits=ix.nbits,
                        opq=ix.opq, quantizer=ix.quantizer)
    if ix.M == AUTO:
        fits = [m for m in _M_candidates(d, ix)
                if index_bytes(n, d, IndexConfig(nlist=nlist, M=m, nbits=ix.nbits, opq=ix.opq,
                                                 quantizer=ix.quantizer)) <= budget]
        if not fits:
            least = IndexConfig(nlist=nlist, M=1, nbits=ix.nbits, opq=ix.opq)
            raise InputError(
                f"index.memory_budget={ix.memory_budget}: even the smallest codes need "
                f"{_size(index_bytes(n, d, least))} for {n:,} vectors ({ID_BYTES} B of id "
                "each); raise the budget")
        sized = IndexConfig(nlist=nlist, M=max(fits), nbits=ix.nbits, opq=ix.opq,
                            quantizer=ix.quantizer)
        changes["index.M"] = sized.M
        notes.append(f"index.M: auto -> {sized.M} ({sized.M * ix.nbits // 8} B a code: "
                     f"{_size(index_bytes(n, d, sized))} of the {ix.memory_budget} budget)")
    elif budget and index_bytes(n, d, sized) > budget:
        raise InputError(
            f"the index needs {_size(index_bytes(n, d, sized))} at index.M={ix.M}, over "
            f"index.memory_budget={ix.memory_budget}; set index.M=auto to fit it, or lower "
            "index.M")
    return changes, notes


def _size(b: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if b < 1000 or unit == "TB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return ""


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def plan_lines(cfg: PipelineConfig, n: int, d: int, shards: int, train_queries: int,
               eval_queries: int, cores: int) -> list[str]:
    """What the job would build and an estimate of what each stage costs on `cores` CPU
    cores (resolved config: no auto values)."""
    ix, tr = cfg.index, cfg.train
    size = index_bytes(n, d, ix)
    parts = cfg.build.output_parts or max(1, math.ceil(size / 2**30))
    sample = min(cfg.data.train_sample, n)
    queries = train_queries or min(cfg.data.pseudo_queries, n)
    pairs = queries * n
    knn_rate = KNN_PAIRS_PER_CORE_D128 * 128 / d * cores
    encode_rate = ENCODE_PER_CORE * cores * (128 * (1024 + 256)) / (d * (ix.nlist + 256))
    passes = 2 if cfg.build.baseline.value == "full" else 1
    workers = cfg.ray.train_workers
    train_rate = TRAIN_QUERIES_PER_WORKER_D384 * 384 / d * workers
    kmeans = sample * ix.nlist * d * 2 * cfg.init.niter / (KMEANS_FLOPS_PER_CORE * cores)
    rows = [
        ("corpus", f"{n:,} vectors, d={d}, {shards} shards (data.rows_per_shard "
                   f"{cfg.data.rows_per_shard:,})"),
        ("index", f"IVF{ix.nlist} {'OPQ+' if ix.opq else ''}{ix.quantizer.value.upper()}"
                  f"{ix.M}x{ix.nbits}: {ix.M * ix.nbits // 8} B a code + {ID_BYTES} B id"),
        ("index size", f"{_size(size)} in {parts} part(s) of about {_size(size / parts)}"
                       + (f" (budget {ix.memory_budget})" if ix.memory_budget else "")),
        ("training sample", f"{sample:,} vectors, {_size(sample * d * 4)} in memory "
                            f"({sample / ix.nlist:.0f} a list)"),
        ("training queries", f"{queries:,}" + ("" if train_queries else
                                               " (corpus samples: no data.train_queries)")),
        ("teacher", f"{pairs:.3g} query-document pairs (exact top {cfg.teacher.k} and band)"),
        ("estimate", f"on {cores} CPU cores at docs/scale.md's measured rates (large runs; "
                     "small ones add fixed costs):"),
        ("  ingest", _secs(n / (INGEST_PER_CORE * cores))),
        ("  init", _secs(kmeans)),
        ("  teacher", _secs(pairs / knn_rate)),
        ("  train", _secs(queries * tr.epochs / train_rate) + f" ({workers} worker(s))"),
        ("  encode + merge", _secs(passes * n / encode_rate)),
        ("  evaluate", _secs(eval_queries * n / knn_rate) + " (its exact top-k)"
         if eval_queries else "no eval.queries"),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"{k.ljust(width)}  {v}" for k, v in rows]
