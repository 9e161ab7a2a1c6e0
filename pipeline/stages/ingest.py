"""ingest: plan the corpus shards, validate every row with Ray Data, sample training vectors.

`preflight` reads metadata only and runs before Ray starts, so the common mistakes (missing
path, no files, wrong columns, bad dimension, k too large, M not dividing d) fail in seconds.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import ray

from pipeline import keys, storage
from pipeline.config import PipelineConfig
from pipeline.data import readers
from pipeline.data.plan import Shard, plan_shards
from pipeline.index.build import check_shape
from pipeline.stages.common import Group, Run, placement

log = logging.getLogger("pipeline.stages.ingest")


def preflight(cfg: PipelineConfig) -> dict:
    """Shard plan plus corpus size and dimension, from file metadata alone."""
    files = readers.list_inputs(cfg.data.corpus, "data.corpus")
    probed = [(f, *readers.probe(f)) for f in files]
    dims = {d for _, _, d in probed if d is not None}
    if len(dims) > 1:
        raise ValueError(f"data.corpus: files disagree on the dimension: {sorted(dims)}")
    if any(d is None for _, _, d in probed):  # list<float> Parquet: read one row to learn d
        f = next(f for f, n, d in probed if d is None and n)
        dims.add(readers.read_rows(f, 0, 1)[1].shape[1])
    n = sum(rows for _, rows, _ in probed)
    if n == 0:
        raise ValueError(f"data.corpus: {cfg.data.corpus} holds no rows (empty corpus)")
    (d,) = dims
    k_max = max(cfg.teacher.k, cfg.eval.k)
    if k_max > n:
        raise ValueError(
            f"teacher.k={cfg.teacher.k} / eval.k={cfg.eval.k} exceed the corpus size {n}; "
            "lower them"
        )
    check_shape(cfg.index, d, min(n, cfg.init.train_sample))
    fingerprints = {"corpus": [(f, readers.fingerprint(f)) for f, _, _ in probed]}
    for name in ("train_queries", "eval_queries", "labels"):
        uri = getattr(cfg.data, name)
        if uri:
            fingerprints[name] = _check_query_files(f"data.{name}", uri, d)
    shards = plan_shards([(f, rows, fp) for (f, rows, _), (_, fp) in
                          zip(probed, fingerprints["corpus"])], cfg.data.rows_per_shard)
    return {"n": n, "d": d, "shards": [s.to_dict() for s in shards],
            "inputs": {k: keys.input_digest(v) for k, v in fingerprints.items()}}


def _check_query_files(what: str, uri: str, d: int) -> list[tuple[str, str]]:
    """Metadata checks of a query or label set: rows present, the corpus's dimension.
    Returns [(file, fingerprint)]."""
    files = readers.list_inputs(uri, what)
    cols = ("query_id", "doc_id") if what == "data.labels" else ("id", "embedding")
    rows = 0
    for f in files:
        if what == "data.labels" and not f.endswith(".parquet"):
            raise ValueError(f"data.labels: {f} must be Parquet with columns query_id, doc_id")
        n, qd = readers.probe(f, cols)
        rows += n
        if what != "data.labels" and qd is not None and qd != d:
            raise ValueError(f"{what}: dimension {qd} disagrees with the corpus's {d}")
    if not rows:
        raise ValueError(f"{what}: {uri} holds no rows; give a non-empty set or leave "
                         f"{what} empty")
    return [(f, readers.fingerprint(f)) for f in files]


def scan_shard(shard: dict, d: int, sample_p: float, seed: int) -> dict:
    """Pure kernel: validate one shard and draw its Bernoulli sample of training vectors."""
    s = Shard(**shard)
    ids, x = readers.read_rows(s.uri, s.start, s.stop, s.id_offset)
    readers.check_block(ids, x, f"{s.uri} rows {s.start}-{s.stop}", d)
    rng = np.random.default_rng([seed, s.shard_id])
    keep = rng.random(len(ids)) < sample_p
    return {"shard_id": s.shard_id, "rows": len(ids), "id_min": int(ids.min()),
            "id_max": int(ids.max()), "sample": x[keep]}


def _scan_or_report(shard: dict, d: int, sample_p: float, seed: int) -> dict:
    # Ray Data keeps only the text of a UDF's exception, so a bad-input error travels back as
    # data and the driver raises it as the ValueError the user should see.
    try:
        return {**scan_shard(shard, d, sample_p, seed), "error": ""}
    except ValueError as e:
        return {"shard_id": shard["shard_id"], "rows": 0, "id_min": 0, "id_max": 0,
                "sample": np.zeros((0, d), np.float32), "error": str(e)}


def _check_cross_shard_ids(cfg: PipelineConfig, stats: list[dict], shards: list[dict]) -> None:
    spans = sorted((s["id_min"], s["id_max"], s["shard_id"]) for s in stats)
    overlapping = {a[2] for a, b in zip(spans, spans[1:]) if b[0] <= a[1]}
    overlapping |= {b[2] for a, b in zip(spans, spans[1:]) if b[0] <= a[1]}
    if not overlapping:
        return
    # Id ranges overlap: compare the actual ids of those shards only.
    read_ids = ray.remote(lambda sh: readers.read_rows(sh["uri"], sh["start"], sh["stop"],
                                                       sh["id_offset"])[0])
    read_ids = read_ids.options(resources=placement(cfg, Group.CPU))
    parts = ray.get([read_ids.remote(shards[i]) for i in sorted(overlapping)])
    ids = np.concatenate(parts)
    u, c = np.unique(ids, return_counts=True)
    if (c > 1).any():
        raise ValueError(f"data.corpus: duplicate ids across files {u[c > 1][:5].tolist()}; "
                         "ids must be unique")


def load_train_queries(cfg: PipelineConfig, sample: np.ndarray, d: int) -> tuple:
    """(ids, x) of the training queries, or corpus samples when there are none."""
    if not cfg.data.train_queries:  # symmetric case: corpus samples stand in for queries
        n = min(cfg.data.pseudo_queries, len(sample))
        log.info("no data.train_queries: using %d corpus samples as pseudo-queries", n)
        return np.arange(n, dtype=np.int64), sample[:n]
    ids, x = readers.read_all(cfg.data.train_queries, "data.train_queries",
                              cfg.data.max_train_queries)
    if x.shape[1] != d:
        raise ValueError(f"data.train_queries: dimension {x.shape[1]} != corpus {d}")
    return ids, x


def _scan(cfg: PipelineConfig, shards: list[dict], d: int, sample_p: float,
          seed: int) -> list[dict]:
    """Validates the shards with Ray Data; raises the first bad-input error as a ValueError."""
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))
    stats = ds.map(lambda row: _scan_or_report(row, d, sample_p, seed),
                   resources=placement(cfg, Group.CPU)).take_all()
    errors = sorted(s["error"] for s in stats if s["error"])
    if errors:
        more = f" (and {len(errors) - 1} more shards)" if errors[1:] else ""
        raise ValueError(errors[0] + more)
    return sorted(stats, key=lambda s: s["shard_id"])


def _spans(stats: list[dict]) -> dict:
    return {Shard(**s).key: [st["id_min"], st["id_max"]] for s, st in stats}


def run_incremental(run: Run, plan: dict) -> dict:
    """Ingest for an incremental rebuild: only shards that are new or changed since the last
    run are read and validated; the training sample and queries of that run are kept (the
    quantizers are frozen)."""
    t0 = time.time()
    prev = run.stage_info("ingest")
    spans = dict(prev["spans"])
    fresh = [s for s in plan["shards"] if Shard(**s).key not in spans]
    if fresh:
        stats = _scan(run.cfg, fresh, plan["d"], 0.0, run.cfg.init.seed)
        spans.update(_spans(zip(fresh, stats)))
    current = [Shard(**s).key for s in plan["shards"]]
    spans = {k: spans[k] for k in current}
    _check_cross_shard_ids(run.cfg, [{"id_min": a, "id_max": b, "shard_id": i}
                            for i, (a, b) in enumerate(spans[k] for k in current)], plan["shards"])
    log.info("ingest (incremental): %d of %d shards new or changed, %d vectors (%.1fs)",
             len(fresh), len(current), plan["n"], time.time() - t0)
    return {**plan, "sample": prev["sample"], "train_queries": prev["train_queries"],
            "spans": spans, "changed_shards": len(fresh)}


def run(run: Run, plan: dict) -> dict:
    cfg = run.cfg
    t0 = time.time()
    p = min(1.0, cfg.init.train_sample / plan["n"])
    stats = _scan(cfg, plan["shards"], plan["d"], p, cfg.init.seed)
    rows = sum(s["rows"] for s in stats)
    assert rows == plan["n"], f"scanned {rows} rows, metadata says {plan['n']}"
    _check_cross_shard_ids(cfg, stats, plan["shards"])
    sample = np.concatenate([s["sample"] for s in stats]).astype(np.float32)
    sample = sample[np.random.default_rng(cfg.init.seed).permutation(len(sample))]
    check_shape(cfg.index, plan["d"], len(sample))
    qids, xq = load_train_queries(cfg, sample, plan["d"])
    storage.save_npz(run.stage_path("ingest", "sample.npz"), x=sample)
    storage.save_npz(run.stage_path("ingest", "train_queries.npz"), ids=qids, x=xq)
    log.info("ingest: %d vectors of d=%d in %d shards validated, %d sampled (%.1fs)",
             plan["n"], plan["d"], len(plan["shards"]), len(sample), time.time() - t0)
    return {**plan, "sample": len(sample), "spans": _spans(zip(plan["shards"], stats)),
            "train_queries": len(qids)}
