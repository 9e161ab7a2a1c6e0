"""Quality benchmark: faiss's k-means quantizers against distilled ones at the same code size,
on the same data, in one run.

  python bench/quality.py                  # shared Debian/MiniLM data, 8 and 16 B
  python bench/quality.py --full           # 8/16/32 B, every structure incl. RQ, ablations
  python bench/quality.py --symmetric      # corpus samples as queries (no query set used)
  python bench/quality.py --set data.corpus=s3://b/corpus --set data.train_queries=... \
                          --set eval.queries=... --set eval.labels=

It reads the pipeline's config (`--config`, `--set`), so any dataset in the input contract runs
unchanged. Distillation uses the pipeline's own training kernel (single process here).
Prints a table, writes JSON (--json) in report.json's row schema plus `train_seconds`,
`codes_scanned_per_query` and `qps_1thread` (the search cost, measured in the same run: one
thread, the whole evaluation set, top 100), and a PNG of recall@10 against that QPS, one
panel per code size (--png): compare methods at equal cost, not only at equal nprobe (learned
centroids make lists of other sizes). The "at equal recall" table does that comparison: for
each faiss row, the fastest distilled row with no more bytes and no less recall.

ScaNN, the peer, adds rows at every size when it is installed (pip install '.[bench]';
--no-scann leaves it out): a tree of index.nlist leaves, 4-bit and 8-bit AH codes residual to
the leaf, no re-ranking, one search thread; `scann-ah4`/`scann-ah8` with ScaNN's default
(isotropic) code loss, `-aniso0.2` with its anisotropic loss at the threshold its docs suggest
for unit-norm data.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

import faiss
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.config import (  # noqa: E402
    IndexConfig,
    Loss,
    NegativeSampler,
    PipelineConfig,
    load_config,
)
from pipeline.data import readers  # noqa: E402
from pipeline.distributed.tasks import keep_freed_memory  # noqa: E402
from pipeline.index import build, knn  # noqa: E402
from pipeline.index.metrics import score_rows  # noqa: E402
from pipeline.quant.fit import fit  # noqa: E402
from pipeline.quant.loop import TrainData  # noqa: E402
from pipeline.report import TABLE_COLUMNS, format_table  # noqa: E402

log = logging.getLogger("bench.quality")

# structure -> (has IVF, has OPQ rotation, quantizer).
STRUCTURES = {"pq": (False, False, "pq"), "opq": (False, True, "pq"),
              "ivf-pq": (True, False, "pq"), "ivf-opq": (True, True, "pq"),
              "rq": (False, False, "rq"), "ivf-rq": (True, False, "rq"),
              "ivf-rq-b16": (True, False, "rq"), "ivf-rq-fs": (True, False, "rq"),
              "lsq": (False, False, "lsq"), "ivf-lsq": (True, False, "lsq"),
              "ivf-lsq-fs": (True, False, "lsq"),
              "ivf-pq-fs": (True, False, "pq"), "ivf-opq-fs": (True, True, "pq")}
# The additive baselines (faiss's strongest quantizers at a code size), all searched with
# look-up tables (inner product: no norm bytes; faiss's factory sets them up so). IVF-RQ is
# trained and encoded greedily (beam 1, as the RQ student trains) or with a beam of 16 (the
# middle of the 8-32 that faiss users take; its encode cost grows with the beam, and the
# table's encode column shows it). ivf-rq-fs and ivf-lsq-fs are faiss's
# IndexIVFResidualQuantizerFastScan and IndexIVFLocalSearchQuantizerFastScan: 4-bit codebooks,
# M = 2 x bytes, SIMD-scanned with quantized tables.
# faiss at full strength (--baselines names; faiss-only, built by its factory):
# - ivf-rq-b32r / ivf-rq-b64r: the residual quantizer trained and encoded with a beam of 32 /
#   64, its codebooks refined after training (Train_refine_codebook, 5 iterations), encoding
#   through look-up tables (use_beam_LUT);
# - ivf-prq / ivf-plsq: the product-additive forms, 2 splits of half the bytes each;
# - ivf-lsq-x2: LSQ with twice faiss's default training and encoding iterations.
# Anchors at their own bytes, built once whatever --sizes says (no re-ranking, as every row):
# - ivf-rabitq: 1 bit a dimension plus its corrections (56 B at 384-d); ivf-rabitq-4: 4 bits;
# - pca64-ivf-rabitq: PCA to 64 dimensions, then 1-bit RaBitQ (16 B).
STRONG = {
    "ivf-rq-b32r": ("IVF{nlist},RQ{size}x8", {"beam": 32}),
    "ivf-rq-b64r": ("IVF{nlist},RQ{size}x8", {"beam": 64}),
    "ivf-prq": ("IVF{nlist},PRQ2x{half}x8", {}),
    "ivf-plsq": ("IVF{nlist},PLSQ2x{half}x8", {}),
    "ivf-lsq-x2": ("IVF{nlist},LSQ{size}x8", {"lsq_iters": 2}),
}
ANCHORS = {
    "ivf-rabitq": ("IVF{nlist},RaBitQ", {}),
    "ivf-rabitq-4": ("IVF{nlist},RaBitQ4", {}),
    "pca64-ivf-rabitq": ("PCA64,IVF{nlist},RaBitQ", {}),
}
STRUCTURES.update({name: (True, False, "rq") for name in (*STRONG, *ANCHORS)})
ADDITIVE = {"ivf-rq", "ivf-rq-b16", "ivf-rq-fs", "ivf-lsq", "ivf-lsq-fs", "rq", "lsq",
            "ivf-rq-b32r", "ivf-rq-b64r", "ivf-prq", "ivf-plsq", "ivf-lsq-x2"}
RQ_BEAM = {"ivf-rq-b16": 16}
ADDITIVE_FASTSCAN = {"ivf-rq-fs", "ivf-lsq-fs"}
FAISS_ONLY = ADDITIVE_FASTSCAN | set(STRONG) | set(ANCHORS)  # no student of their form
# Fast-scan: 4-bit PQ codes (M = 2 x bytes, by residual), trained as IVF-PQ and searched as
# faiss IndexIVFPQFastScan (pipeline.index.build.to_fastscan). A distilled fast-scan index is
# also searched as the plain 4-bit IVF-PQ it was trained as (`-floatlut` rows: float look-up
# tables, the scores training sees), which measures what the 8-bit quantized tables cost.
FASTSCAN = {"ivf-pq-fs", "ivf-opq-fs"}
DEFAULT_BASELINES = ["pq", "opq", "ivf-pq", "ivf-opq", "ivf-pq-fs", "ivf-rq-fs"]
DEFAULT_DISTILLED = ["ivf-opq"]
# LSQ's ICM encoding is slow (minutes per size here): add it with --baselines ...,lsq
FULL_BASELINES = FULL_DISTILLED = ["pq", "opq", "ivf-pq", "ivf-opq", "rq", "ivf-rq",
                                   "ivf-pq-fs", "ivf-opq-fs"]
# The table's columns: the report's, and the search cost of each row, measured in this run.
COLUMNS = {**TABLE_COLUMNS, "codes_scanned_per_query": "codes/query", "qps_1thread": "QPS(1 thr)",
           "encode_vectors_per_s": "encode/s"}
SHARED = os.path.join(ROOT, "..", "shared", "data", "debian-minilm")


@dataclasses.dataclass
class Data:
    ids: np.ndarray
    xb: np.ndarray
    xt: np.ndarray  # training queries
    eval_ids: np.ndarray
    xq: np.ndarray
    qrels: dict | None
    gt: np.ndarray  # (nq, 100) exact neighbours of xq
    pseudo: bool = False  # the training queries are corpus samples (their own row is no neighbour)
    xp: np.ndarray | None = None  # corpus samples trained on beside the training queries

    @property
    def train_queries(self) -> np.ndarray:
        """Every query trained on: the training queries, then the extra pseudo-queries."""
        return self.xt if self.xp is None else np.concatenate([self.xt, self.xp])


def default_data(cache: str) -> list[str]:
    """The shared data in the input contract, written once under `cache`."""
    from pipeline.cli.prepare import from_shared, write_dataset

    if not os.path.exists(os.path.join(cache, "labels")):
        write_dataset(cache, *from_shared(SHARED), files=4)
    return [f"data.corpus={cache}/corpus", f"data.train_queries={cache}/train_queries",
            f"eval.queries={cache}/eval_queries", f"eval.labels={cache}/labels"]


def load(cfg: PipelineConfig, symmetric: bool = False, train_labels: str = "",
         extra_pseudo: int = 0) -> tuple[Data, np.ndarray | None]:
    """The benchmark's data, and each training query's labeled document (or None).

    extra_pseudo: as many corpus samples are trained on beside data.train_queries, as
    pseudo-queries (their own row is no neighbour); validation stays on the training queries.

    symmetric: no query set is read. `eval.max_queries` (default 2,000) corpus vectors,
    removed from the corpus, are the eval queries; `data.pseudo_queries` others are the
    training queries. Ground truth is the exact top-100 in what remains."""
    ids, xb = readers.read_all(cfg.data.corpus, "data.corpus")
    rng = np.random.default_rng(cfg.data.seed)
    labeled = None
    if symmetric:
        n_eval = cfg.eval.max_queries or 2000
        perm = rng.permutation(len(xb))
        held, keep = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
        eval_ids, xq = ids[held], xb[held]
        ids, xb = ids[keep], xb[keep]
        xt = xb[rng.choice(len(xb), min(cfg.data.pseudo_queries, len(xb)), replace=False)]
        qrels = None
    else:
        if cfg.data.train_queries:
            tids, xt = readers.read_all(cfg.data.train_queries, "data.train_queries",
                                        cfg.data.max_train_queries)
        else:  # corpus samples as pseudo-queries
            tids = None
            xt = xb[rng.choice(len(xb), min(cfg.data.pseudo_queries, len(xb)), replace=False)]
        eval_ids, xq = readers.read_all(cfg.eval.queries, "eval.queries", cfg.eval.max_queries)
        qrels = readers.read_labels(cfg.eval.labels) if cfg.eval.labels else None
        if train_labels:
            labeled = labeled_vectors(tids, ids, xb, readers.read_labels(train_labels))
    pseudo = symmetric or not cfg.data.train_queries
    xp = None
    if extra_pseudo:
        if pseudo or train_labels:
            raise SystemExit("--extra-pseudo adds corpus samples beside data.train_queries: "
                             "it needs a training query set, and no --symmetric or "
                             "--train-labels")
        xp = xb[rng.choice(len(xb), min(extra_pseudo, len(xb)), replace=False)]
    _, gt, _ = knn.block_topk(xq, xb, ids, 100, cfg.data.metric)
    return Data(ids, xb, xt, eval_ids, xq, qrels, gt, pseudo, xp), labeled


def labeled_vectors(tids, ids: np.ndarray, xb: np.ndarray, qrels: dict) -> np.ndarray:
    """(n, d): the first labeled document of each training query, for the contrastive term."""
    if tids is None:
        raise SystemExit("--train-labels needs data.train_queries (ids to match labels to)")
    row = {int(i): r for r, i in enumerate(ids)}
    out = np.zeros((len(tids), xb.shape[1]), np.float32)
    missing = 0
    for n, q in enumerate(tids):
        docs = [row[d] for d in qrels.get(int(q), ()) if d in row]
        if docs:
            out[n] = xb[docs[0]]
        else:
            missing += 1
    if missing == len(tids):
        raise SystemExit("--train-labels: no training query has a labeled document in the "
                         "corpus; check that the file labels *training* query ids")
    return out


def evaluate(trained, data: Data, nprobes, row: dict) -> list[dict]:
    """Report rows per nprobe, each with its search cost: the codes scanned per query
    (faiss's IVF counters; every code for flat indexes) and the queries per second of one
    thread searching the whole evaluation set for its top 100; and its encode cost: the
    corpus vectors added per second by this process (all its threads)."""
    index = faiss.clone_index(trained)
    t0 = time.perf_counter()
    if row["nlist"]:
        index.add_with_ids(data.xb, data.ids)
    else:  # flat PQ/OPQ/RQ/LSQ indexes take no ids: add by position, map the results back
        index.add(data.xb)
    encode = round(len(data.xb) / (time.perf_counter() - t0), 1)
    found, cost = {}, {}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for nprobe in (nprobes if row["nlist"] else [0]):
            if row["nlist"]:
                build.set_nprobe(index, nprobe)
            faiss.cvar.indexIVF_stats.reset()
            t0 = time.perf_counter()
            I = index.search(data.xq, 100)[1]
            secs = time.perf_counter() - t0
            scanned = faiss.cvar.indexIVF_stats.ndis if row["nlist"] else \
                index.ntotal * len(data.xq)
            cost[nprobe] = {"codes_scanned_per_query": round(scanned / len(data.xq), 1),
                            "qps_1thread": round(len(data.xq) / secs, 1)}
            if not row["nlist"]:
                I = np.where(I >= 0, data.ids[np.maximum(I, 0)], -1)
            found[nprobe] = I
    finally:
        faiss.omp_set_num_threads(threads)
    rows = score_rows(found, data.gt, data.eval_ids, data.qrels, row)
    for r in rows:
        r.update(cost[r["nprobe"]], encode_vectors_per_s=encode)
    return rows


def scann_rows(data: Data, size: int, nlist: int, nprobes, metric: str) -> list[dict]:
    """ScaNN, the peer: its partitioning tree of `nlist` leaves and asymmetric-hashing (AH)
    codes of `size` bytes, 4-bit (LUT16, 2 blocks per byte) and 8-bit (LUT256), residual to
    the leaf as ScaNN sets it up for inner products, isotropic and anisotropic, and no
    re-ranking. Rows as evaluate()'s, searched
    by one thread; ScaNN does not expose the codes it scans (codes/query is left empty).
    Empty when ScaNN is not installed (pip install .[bench]) or the metric is not ip."""
    try:
        import scann
    except ImportError:
        log.warning("ScaNN rows skipped: scann is not installed (pip install '.[bench]')")
        return []
    if metric != "ip":
        log.warning("ScaNN rows skipped: they are set up for inner products only")
        return []
    rows = []
    d = data.xb.shape[1]
    # Two loss settings for the codes: ScaNN's default (isotropic), and its anisotropic loss
    # at the threshold its docs suggest for unit-norm data (0.2). Neither is tuned here.
    for bits, hash_type, eta in ((4, "lut16", None), (8, "lut256", None),
                                 (4, "lut16", 0.2), (8, "lut256", 0.2)):
        blocks = size * 8 // bits
        if d % blocks:
            log.warning("ScaNN %d-bit %d B skipped: %d blocks do not divide d=%d",
                        bits, size, blocks, d)
            continue
        t0 = time.time()
        searcher = scann.scann_ops_pybind.builder(data.xb, 100, "dot_product").tree(
            num_leaves=nlist, num_leaves_to_search=max(nprobes),
            training_sample_size=len(data.xb)).score_ah(
            d // blocks, anisotropic_quantization_threshold=float("nan") if eta is None else eta,
            hash_type=hash_type, training_sample_size=len(data.xb)).build()
        secs = time.time() - t0
        found, cost = {}, {}
        for nprobe in nprobes:
            t1 = time.perf_counter()
            I = searcher.search_batched(data.xq, final_num_neighbors=100,
                                        leaves_to_search=nprobe)[0]
            cost[nprobe] = {"codes_scanned_per_query": None,
                            "qps_1thread": round(len(data.xq) / (time.perf_counter() - t1), 1)}
            found[nprobe] = np.where(I >= 0, data.ids[np.maximum(I, 0).astype(np.int64)], -1)
        name = f"scann-ah{bits}" + ("" if eta is None else f"-aniso{eta:g}")
        base = {"method": name, "bytes_per_vector": size, "nlist": nlist, "train_seconds": secs}
        for r in score_rows(found, data.gt, data.eval_ids, data.qrels, base):
            rows.append({**r, **cost[r["nprobe"]]})
        log.info("%s %dB built in %.0fs", name, size, secs)
    return rows


def strong_index(name: str, d: int, size: int, nlist: int, metric: str):
    """An empty faiss index of a STRONG or ANCHORS row, set up as the comment above says."""
    key, how = {**STRONG, **ANCHORS}[name]
    index = faiss.index_factory(d, key.format(nlist=nlist, size=size, half=size // 2),
                                build.faiss_metric(metric))
    inner = faiss.downcast_index(faiss.extract_index_ivf(index))
    if "beam" in how:
        rq = inner.rq
        rq.max_beam_size = how["beam"]
        rq.train_type = faiss.ResidualQuantizer.Train_progressive_dim | \
            faiss.ResidualQuantizer.Train_refine_codebook
        rq.niter_codebook_refine = 5
        rq.use_beam_LUT = 1
    if "lsq_iters" in how:
        inner.lsq.train_iters *= how["lsq_iters"]
        inner.lsq.encode_ils_iters *= how["lsq_iters"]
    return index


def code_bytes(index) -> int:
    """Bytes a vector's code takes in the index, as faiss stores it (ids aside)."""
    return faiss.extract_index_ivf(index).code_size


def train_faiss(xb: np.ndarray, icfg: IndexConfig, cfg: PipelineConfig, opq_cache: dict,
                name: str = ""):
    """faiss's own training: (trained index, seconds). The OPQ rotation of a code size is
    trained once and shared by the flat and IVF structures (faiss trains a chain in that order
    either way); its time is counted where it is first trained."""
    t0 = time.time()
    rng = np.random.default_rng(cfg.data.seed)
    xt = xb[rng.choice(len(xb), min(cfg.data.train_sample, len(xb)), replace=False)]
    metric = cfg.data.metric
    if name in STRONG or name in ANCHORS:
        index = strong_index(name, xb.shape[1], icfg.M * icfg.nbits // 8, icfg.nlist, metric)
        faiss.extract_index_ivf(index).cp.seed = cfg.init.seed
        index.train(xt)
        return index, time.time() - t0
    if icfg.quantizer == "lsq" or name in ADDITIVE_FASTSCAN:
        if name in ADDITIVE_FASTSCAN and metric != "ip":
            raise SystemExit(f"{name} is set up for inner products: with l2 it needs norm "
                             "bytes, which this benchmark does not count yet")
        codec = f"{icfg.quantizer.upper()}{icfg.M}x{icfg.nbits}" + \
            ("fs" if name in ADDITIVE_FASTSCAN else "")
        key = f"IVF{icfg.nlist},{codec}" if icfg.nlist else codec
        index = faiss.index_factory(xb.shape[1], key, build.faiss_metric(metric))
        if icfg.nlist:
            faiss.extract_index_ivf(index).cp.seed = cfg.init.seed
        index.train(xt)
        return index, time.time() - t0
    plain = dataclasses.replace(icfg, opq=False)
    if not icfg.opq:
        return build.train_baseline(xt, plain, cfg.init.niter, cfg.init.seed,
                                    metric=metric), time.time() - t0
    key = (icfg.M, icfg.nbits)
    if key not in opq_cache:
        opq_cache[key] = faiss.OPQMatrix(xb.shape[1], icfg.M)
        opq_cache[key].train(xt)
    opq = opq_cache[key]
    inner = build.train_baseline(opq.apply(xt), plain, cfg.init.niter, cfg.init.seed,
                                 metric=metric)
    rotation = faiss.vector_to_array(opq.A).reshape(opq.d_out, opq.d_in)
    opq_copy = build.opq_matrix(rotation, icfg.M)
    index = faiss.IndexPreTransform(opq_copy, inner)
    index.own_fields = True
    inner.this.disown()
    opq_copy.this.disown()
    return index, time.time() - t0


def teacher_lists(data: Data, cfg: PipelineConfig) -> tuple:
    """(S, I, V) of the training queries, as the pipeline's teacher draws them: the exact top
    teacher.k and, with teacher.band_*, the band of deeper neighbours."""
    band = knn.Band.of(cfg.teacher)

    def lists(xq: np.ndarray, first: int, pseudo: bool) -> tuple:
        return knn.finish(knn.block_topk(xq, data.xb, data.ids, cfg.teacher.k,
                                         cfg.data.metric, True, band=band,
                                         qids=first + np.arange(len(xq)),
                                         exclude_self=pseudo), band)

    out = lists(data.xt, 0, data.pseudo)
    if data.xp is None:
        return out
    return tuple(np.concatenate(pair) for pair in zip(out, lists(data.xp, len(data.xt), True)))


def distill(trained, data: Data, teacher: tuple, cfg: PipelineConfig,
            labeled: np.ndarray | None = None):
    """Distils a faiss-trained index with the pipeline's kernel; returns (index, secs, state).
    The first queries (teacher.val_fraction) are held out for validation and early stopping."""
    t0 = time.time()
    V, xt = teacher[2], data.train_queries
    n_val = int(round(len(data.xt) * cfg.teacher.val_fraction))
    rng = np.random.default_rng(cfg.data.seed)
    pool = data.xb[rng.choice(len(data.xb), min(cfg.data.train_sample, len(data.xb)),
                              replace=False)]
    if labeled is not None and cfg.loss.contrastive_weight > 0:
        # a query with no label falls back to its teacher top-1
        labeled = np.where((labeled != 0).any(1, keepdims=True), labeled, V[:, 0])
        labeled = labeled[n_val:]
    else:
        labeled = None
    tr = TrainData(xt[n_val:], V[n_val:], pool, labeled)
    val = TrainData(xt[:n_val], V[:n_val], pool)
    keep_freed_memory()
    params = build.extract_params(trained)
    if params.spec.kind != cfg.index.quantizer:  # an LSQ student from RQ's codebooks
        params = dataclasses.replace(
            params, spec=dataclasses.replace(params.spec, kind=cfg.index.quantizer, beam=1))
    state = fit(params, tr, val, cfg)
    index = build.index_from_params(state["best"], cfg.data.metric)
    return index, time.time() - t0, state


def ablations(cfg: PipelineConfig, labeled: bool) -> dict[str, PipelineConfig]:
    """What each part contributes, for the distilled IVF-OPQ: each learned part, each loss
    term, each negative sampler. The defaults are `distilled-ivf-opq` itself."""
    alone = {"negatives.in_batch": False, "negatives.per_list": 0}
    variants = {
        # what is learned
        "ivf-only": {"train.learn_pq": False, "train.learn_rotation": False},
        "pq-only": {"train.learn_ivf": False, "loss.ivf_weight": 0.0},
        "no-rotation": {"train.learn_rotation": False},
        # each loss
        "loss-ranking-only": {"loss.kind": Loss.RANKING},
        "loss-kl-only": {"loss.kind": Loss.KL},
        "no-ivf-loss": {"loss.ivf_weight": 0.0},
        "plus-recon": {"loss.recon_weight": 1.0},
        "plus-balance": {"loss.balance_weight": 0.1},
        # each sampler (candidates besides the teacher top-K), alone
        "sampler-topk-only": {**alone, "negatives.corpus": 0},
        "sampler-random": {**alone, "negatives.sampler": NegativeSampler.RANDOM},
        "sampler-in-batch": {**alone, "negatives.corpus": 0, "negatives.in_batch": True},
        "sampler-ivf": {**alone, "negatives.sampler": NegativeSampler.IVF},
        "sampler-list": {"negatives.corpus": 0, "negatives.in_batch": False},
        "no-list-negatives": {"negatives.per_list": 0},
    }
    if labeled:
        variants["plus-contrastive"] = {"loss.contrastive_weight": 1.0}
    return {k: cfg.with_values(v) for k, v in variants.items()}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["bytes_per_vector"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for method in sorted({r["method"] for r in rows
                              if r["nlist"] and not r["method"].startswith("ablation-")}):
            pts = sorted((r["qps_1thread"], r["recall_at_10"]) for r in rows
                         if r["method"] == method and r["bytes_per_vector"] == size)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method,
                        linestyle="-" if method.startswith("distilled") else "--")
        ax.set_xscale("log")
        ax.set(title=f"{size} bytes/vector (points: nprobe)", xlabel="queries/s, one thread",
               ylabel="recall@10 (10@10)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _names(text: str | None, default: list[str]) -> list[str]:
    names = default if text is None else [n for n in text.split(",") if n]
    bad = [n for n in names if n not in STRUCTURES]
    if bad:
        raise SystemExit(f"unknown structure(s) {bad}; choose from {list(STRUCTURES)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "bench", "quality.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--sizes", default=None,
                    help="bytes per vector, comma-separated (default 8,16; --full 8,16,32)")
    ap.add_argument("--full", action="store_true",
                    help="every structure distilled, RQ baselines, 32 B, ablations")
    ap.add_argument("--symmetric", action="store_true",
                    help="queries drawn from the corpus (held out of it); no query files")
    ap.add_argument("--baselines", default=None, help=f"faiss structures, from {list(STRUCTURES)}")
    ap.add_argument("--distilled", default=None,
                    help="distilled structures (not the additive fast-scan ones)")
    ap.add_argument("--lsq-warm-start", choices=["lsq", "rq"], default="lsq",
                    help="what a distilled LSQ starts from: faiss's LSQ, or faiss's greedy RQ "
                         "codebooks (the same form; cheaper to train)")
    ap.add_argument("--extra-pseudo", type=int, default=0, metavar="N",
                    help="also train on N corpus samples as pseudo-queries, beside "
                         "data.train_queries (validation stays on the training queries)")
    ap.add_argument("--ablations", action="store_true", help="the ablations (--full runs them)")
    ap.add_argument("--ablation-size", type=int, default=0,
                    help="bytes per vector of the ablations (default: the smallest size)")
    ap.add_argument("--train-labels", default="",
                    help="Parquet (query_id, doc_id) for the *training* queries: adds the "
                         "contrastive ablation. Never the eval labels.")
    ap.add_argument("--no-scann", dest="scann", action="store_false",
                    help="leave out ScaNN, the peer (it runs when installed: pip install "
                         "'.[bench]')")
    ap.add_argument("--json", default=os.path.join(ROOT, "runs", "bench", "quality.json"))
    ap.add_argument("--png", default=None, help="default: the JSON path with .png")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[PipelineConfig, list[int], list[str], list[str]]:
    """The run's config (the shared data unless data.corpus is set), sizes and structures."""
    overrides = list(args.overrides)
    if not any(o.startswith("data.corpus=") for o in overrides):
        overrides = default_data(os.path.join(ROOT, "runs", "bench", "data")) + overrides
    cfg = load_config(args.config, overrides)
    sizes = [int(x) for x in (args.sizes or ("8,16,32" if args.full else "8,16")).split(",")]
    baselines = _names(args.baselines, FULL_BASELINES if args.full else DEFAULT_BASELINES)
    distilled = _names(args.distilled, FULL_DISTILLED if args.full else DEFAULT_DISTILLED)
    if FAISS_ONLY & set(distilled):
        raise SystemExit(f"{sorted(FAISS_ONLY & set(distilled))} are faiss baselines only: "
                         "distil ivf-rq or ivf-lsq instead")
    return cfg, sizes, baselines, distilled


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg, sizes, baselines, distilled = resolve(args)
    run_ablations = args.full or args.ablations
    ablation_size = args.ablation_size or min(sizes)
    t0 = time.time()
    data, labeled = load(cfg, args.symmetric, args.train_labels, args.extra_pseudo)
    log.info("data: %d x %d corpus, %d training queries (%d more from the corpus), "
             "%d eval queries%s (%.0fs)", *data.xb.shape, len(data.xt),
             0 if data.xp is None else len(data.xp), len(data.xq),
             " (symmetric: corpus samples)" if args.symmetric else "", time.time() - t0)
    t1 = time.time()
    teacher = teacher_lists(data, cfg)
    teacher_s = time.time() - t1
    rows, opq_cache, extra, trained_by = [], {}, {}, {}

    def trained_once(icfg: IndexConfig, name: str = ""):
        """train_faiss's (index, seconds), trained once per structure: the LSQ student's RQ
        warm start is the IVF-RQ baseline when both run."""
        # the strong baselines and anchors share an IndexConfig with their plain forms
        key = (icfg, name if name in ADDITIVE_FASTSCAN | set(STRONG) | set(ANCHORS) else "")
        if key not in trained_by:
            trained_by[key] = train_faiss(data.xb, icfg, cfg, opq_cache, name)
        return trained_by[key]

    for s, size in enumerate(sizes):
        for name in dict.fromkeys(baselines + distilled):
            if name in ANCHORS and s:  # at their own bytes: once
                continue
            has_ivf, has_opq, quantizer = STRUCTURES[name]
            nbits = 4 if name in FASTSCAN | ADDITIVE_FASTSCAN else cfg.index.nbits
            icfg = dataclasses.replace(cfg.index, M=size * 8 // nbits, nbits=nbits,
                                       opq=has_opq, quantizer=quantizer,
                                       nlist=cfg.index.nlist if has_ivf else 0,
                                       rq_beam=RQ_BEAM.get(name, cfg.index.rq_beam))
            base = {"bytes_per_vector": size, "nlist": icfg.nlist}
            searched = build.to_fastscan if name in FASTSCAN else (lambda index: index)
            trained, secs = trained_once(icfg, name)
            if name in STRONG or name in ANCHORS:  # the bytes faiss stores, not the asked
                base["bytes_per_vector"] = code_bytes(trained)
            log.info("faiss-%s %dB trained in %.0fs", name, size, secs)
            if name in baselines:
                rows += evaluate(searched(trained), data, cfg.eval.nprobe,
                                 {"method": f"faiss-{name}", **base, "train_seconds": secs})
            if name not in distilled:
                continue
            pcfg = dataclasses.replace(cfg, index=icfg)
            warm = trained
            if quantizer == "lsq" and args.lsq_warm_start == "rq":
                warm, rq_secs = trained_once(dataclasses.replace(icfg, quantizer="rq"))
                log.info("LSQ warm start: faiss-ivf-rq %dB trained in %.0fs", size, rq_secs)
            index, dsecs, state = distill(warm, data, teacher, pcfg, labeled)
            qps = np.mean([h["queries_per_s_per_worker"] for h in state["history"]])
            rows += evaluate(searched(index), data, cfg.eval.nprobe, {
                "method": f"distilled-{name}", **base, "train_seconds": dsecs + teacher_s,
                "train_queries_per_s_per_worker": qps})
            if name in FASTSCAN:  # the same codes with float look-up tables, as trained
                rows += evaluate(index, data, cfg.eval.nprobe, {
                    "method": f"distilled-{name}-floatlut", **base,
                    "train_seconds": dsecs + teacher_s})
            log.info("distilled-%s %dB: %.0fs, %.0f training queries/s/worker, validation "
                     "recall %.4f -> %.4f", name, size, dsecs, qps, state["warm_val"],
                     state["best_val"])
            extra[f"distilled-{name}-{size}B"] = {
                "history": state["history"], "warm_val": state["warm_val"],
                "best_val": state["best_val"]}
            if run_ablations and name == "ivf-opq" and size == ablation_size:
                for ab, acfg in ablations(pcfg, labeled is not None).items():
                    ab_index, ab_secs, ab_state = distill(trained, data, teacher, acfg, labeled)
                    rows += evaluate(ab_index, data, cfg.eval.nprobe, {
                        "method": f"ablation-{ab}-ivf-opq", **base,
                        "train_seconds": ab_secs + teacher_s})
                    log.info("ablation %s: validation recall %.4f -> %.4f", ab,
                             ab_state["warm_val"], ab_state["best_val"])
        if args.scann:
            rows += scann_rows(data, size, cfg.index.nlist, cfg.eval.nprobe, cfg.data.metric)
    write_results(args, rows, {"config": cfg.to_dict(), "training": extra,
                               "symmetric": args.symmetric, "teacher_seconds": teacher_s,
                               "wall_seconds": time.time() - t0, "argv": sys.argv[1:]})
    print(f"total {time.time() - t0:.0f}s")
    return 0


def write_results(args, rows: list[dict], extra: dict) -> None:
    """The tables on stdout, the JSON (rows plus `extra`) and the recall-against-QPS plot."""
    print("\n" + format_table(rows, COLUMNS))
    print_gains(rows)
    print_against_additive(rows)
    print_at_equal_recall(rows)
    print_training(rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, **extra}, f, indent=2)
    png = args.png or os.path.splitext(args.json)[0] + ".png"
    plot(rows, png)
    print(f"\nwrote {args.json} and {png}")


def print_gains(rows: list[dict]) -> None:
    """Relative gain of each distilled (and ablation) row over faiss at the same setting; an
    ablation compares with faiss-ivf-opq."""
    ref = {(r["method"][len("faiss-"):], r["bytes_per_vector"], r["nprobe"]): r for r in rows
           if r["method"].startswith("faiss-")}
    print("\nrelative gain of distilled over faiss (recall@10, recall@100, MRR@10):")
    for r in rows:
        if r["method"].startswith("distilled-"):
            structure = r["method"][len("distilled-"):]
        elif r["method"].startswith("ablation-"):
            structure = "ivf-opq"
        else:
            continue
        b = ref.get((structure, r["bytes_per_vector"], r["nprobe"]))
        if b:
            gains = [f"{(r[k] / b[k] - 1) * 100:+.1f}%" if r[k] is not None and b[k] else "-"
                     for k in ("recall_at_10", "recall_at_100", "mrr_at_10")]
            print(f"  {r['method']:<34} {r['bytes_per_vector']:>3}B nprobe {r['nprobe']:>4}: "
                  + "  ".join(gains))


def print_against_additive(rows: list[dict]) -> None:
    """Each distilled row against faiss's best additive baseline at the same bytes and
    nprobe: the best recall@10 and the best recall@100 among them (not always the same
    index), and the QPS ratio to each."""
    base = [r for r in rows if r["method"].startswith("faiss-")
            and r["method"][len("faiss-"):] in ADDITIVE]
    if not base:
        return
    print("\ndistilled against faiss's best additive baseline at the same bytes and nprobe "
          "(R@10 gain, vs which, QPS ratio; R@100 gain, vs which, QPS ratio):")
    for r in rows:
        if not r["method"].startswith("distilled-"):
            continue
        peers = [b for b in base if (b["bytes_per_vector"], b["nprobe"]) ==
                 (r["bytes_per_vector"], r["nprobe"])]
        if not peers:
            continue
        parts = []
        for key in ("recall_at_10", "recall_at_100"):
            b = max(peers, key=lambda p: p[key])
            parts.append(f"{(r[key] / b[key] - 1) * 100:+.1f}% vs {b['method']} "
                         f"(QPS x{r['qps_1thread'] / b['qps_1thread']:.2f})")
        print(f"  {r['method']:<26} {r['bytes_per_vector']:>3}B nprobe {r['nprobe']:>4}: "
              + ";  ".join(parts))


def print_at_equal_recall(rows: list[dict]) -> None:
    """Each faiss row against the fastest distilled row that has no more bytes per vector and
    no less recall: the search speed-up at equal quality (recall@10, then recall@100), which
    compares indexes whose nprobe or code layout differ (fast-scan against 8-bit codes)."""
    base = [r for r in rows if r["method"].startswith("faiss-")]
    ours = [r for r in rows if r["method"].startswith("distilled-")]
    if not base or not ours:
        return
    print("\nat equal recall: the fastest distilled row with no more bytes and no less recall "
          "(which, nprobe, QPS ratio; '-' when none reaches it):")
    for b in base:
        parts = []
        for key, label in (("recall_at_10", "R@10"), ("recall_at_100", "R@100")):
            good = [r for r in ours if r["bytes_per_vector"] <= b["bytes_per_vector"]
                    and r[key] >= b[key]]
            if not good:
                parts.append(f"{label} {b[key]:.4f}: -")
                continue
            r = max(good, key=lambda r: r["qps_1thread"])
            parts.append(f"{label} {b[key]:.4f}: {r['method']} {r['bytes_per_vector']}B nprobe "
                         f"{r['nprobe']} x{r['qps_1thread'] / b['qps_1thread']:.2f}")
        print(f"  {b['method']:<18} {b['bytes_per_vector']:>3}B nprobe {b['nprobe']:>4}: "
              + ";  ".join(parts))


def print_training(rows: list[dict]) -> None:
    """Training wall time of every method (distilled: the teacher's kNN included) and the
    distillation throughput."""
    print("\ntraining (seconds; distilled: training queries per second per worker):")
    seen = set()
    for r in rows:
        key = (r["method"], r["bytes_per_vector"])
        if key in seen:
            continue
        seen.add(key)
        qps = r.get("train_queries_per_s_per_worker")
        print(f"  {r['method']:<34} {r['bytes_per_vector']:>3}B {r['train_seconds']:8.1f}s"
              + (f"  {qps:7.0f} q/s/worker" if qps else ""))


if __name__ == "__main__":
    sys.exit(main())
