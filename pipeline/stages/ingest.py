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
from pipeline.config import PipelineConfig, RayConfig, Verify
from pipeline.data import readers
from pipeline.data.plan import Shard, first_rows, plan_blocks, plan_shards
from pipeline.distributed.placement import Group, largest_node_memory, memory, placement
from pipeline.distributed.tasks import check_unique_ids, pin_threads, trim_heap
from pipeline.errors import InputError
from pipeline.index import sizing
from pipeline.index.build import check_shape
from pipeline.workflow.results import Ingested, Plan
from pipeline.workflow.stage import Context, Stage

log = logging.getLogger("ivf_distill.stages.ingest")


def preflight(cfg: PipelineConfig) -> Plan:
    """Shard plan plus corpus size and dimension, from file metadata alone. It checks the
    whole config against the data, so it reads every section: it is the job's boundary, not a
    stage, and records nothing."""
    files = readers.list_inputs(cfg.data.corpus, "data.corpus")
    columns = cfg.data.columns
    probed = [(f, *readers.probe(f, columns, optional_id=True)) for f in files]
    id_kinds = {readers.id_kind(f, cfg.data.id_column) for f in files}
    if len(id_kinds) > 1:
        raise InputError(f"data.corpus: some files give ids as {' and some as '.join(id_kinds)} "
                         f"(column {cfg.data.id_column!r}: integers, strings, or absent for row "
                         "numbers); every file must give them the same way")
    (ids_as,) = id_kinds
    if ids_as == "rows" and files[0].endswith(".parquet"):
        log.warning("data.corpus: no column %r: the ids are row numbers across the files in "
                    "sorted order (set data.id_column to the id column)", cfg.data.id_column)
    if ids_as == "string" and cfg.eval.labels:
        raise InputError("eval.labels with string corpus ids is not supported: labels name "
                         "documents by int64 id. Leave eval.labels empty (recall against the "
                         "exact neighbours is still measured), or give integer ids")
    n = sum(rows for _, rows, _ in probed)
    if n == 0:
        raise InputError(f"data.corpus: {cfg.data.corpus} holds no rows (empty corpus)")
    # list<float> Parquet gives its dimension only in the data: one row of each such file
    dims = {f: d if d is not None else readers.read_rows(f, 0, 1, 0, columns)[1].shape[1]
            for f, rows, d in probed if rows}
    if len(set(dims.values())) > 1:
        by_d = {}
        for f, d in dims.items():
            by_d.setdefault(d, []).append(f)
        raise InputError("data.corpus: files disagree on the dimension: " + "; ".join(
            f"d={d} in {', '.join(fs[:3])}{' ...' if len(fs) > 3 else ''}"
            for d, fs in sorted(by_d.items())))
    (d,) = set(dims.values())
    k_max = max(cfg.teacher.k, cfg.eval.k)
    if k_max > n:
        raise InputError(
            f"teacher.k={cfg.teacher.k} / eval.k={cfg.eval.k} exceed the corpus size {n}; "
            "lower them"
        )
    resolved, notes = sizing.resolve(cfg.index, n, d, cfg.data.train_sample)
    for note in notes:
        log.info(note)
    cfg = cfg.with_values(resolved) if resolved else cfg
    check_shape(cfg.index, d, min(n, cfg.data.train_sample))
    content = cfg.data.verify == Verify.CONTENT
    log.info("input identity: %s (data.verify=%s)", "size, mtime, inode, ctime and a sha256 "
             "of the content" if content else "size, mtime, inode and ctime (S3: size and "
             "ETag)", cfg.data.verify)
    fingerprints = {"data.corpus": [(f, readers.fingerprint(f, content))
                                    for f, _, _ in probed]}
    query_files = {}
    for name in ("data.train_queries", "eval.queries", "eval.labels"):
        section, field = name.split(".")
        uri = getattr(getattr(cfg, section), field)
        if uri:
            query_files[name] = readers.query_files(name, uri, d, content, columns)
            fingerprints[name] = [(f, fp) for f, _, fp in query_files[name]]
    if cfg.eval.queries:  # NaN, inf or duplicate ids: found now, not after training
        readers.read_all(cfg.eval.queries, "eval.queries", cfg.eval.max_queries, columns)
    shards = plan_shards([(f, rows, fp) for (f, rows, _), (_, fp) in
                          zip(probed, fingerprints["data.corpus"])], cfg.data.rows_per_shard,
                         columns)
    return Plan(n=n, d=d, shards=[s.to_dict() for s in shards], string_ids=ids_as == "string",
                resolved=resolved,
                train_query_files=[list(f) for f in query_files.get("data.train_queries", [])],
                inputs={k: keys.input_digest(v) for k, v in fingerprints.items()})


def scan_shard(shard: dict, d: int, sample_p: float, seed: int) -> dict:
    """Pure kernel: validate one shard and draw its Bernoulli sample of training vectors."""
    s = Shard(**shard)
    ids, x = readers.read_shard(s)
    readers.check_block(ids, x, f"{s.uri} rows {s.start}-{s.stop}", d)
    rng = np.random.default_rng([seed, s.shard_id])
    keep = rng.random(len(ids)) < sample_p
    return {"shard_id": s.shard_id, "rows": len(ids), "id_min": int(ids.min()),
            "id_max": int(ids.max()), "max_abs": float(np.abs(x).max()), "sample": x[keep]}


def _scan_or_report(shard: dict, d: int, sample_p: float, seed: int, piece: str) -> dict:
    """scan_shard, its sample written to `piece` (a .npy file) where it is drawn: the stats
    that come back hold its size only."""
    # Ray Data keeps only the text of a UDF's exception, so a bad-input error travels back as
    # data and the driver raises it as the ValueError the user should see.
    trim_heap()  # a Ray Data worker scans many shards: start each without the last one's heap
    try:
        stats = scan_shard(shard, d, sample_p, seed)
    except ValueError as e:
        return {"shard_id": shard["shard_id"], "rows": 0, "id_min": 0, "id_max": 0,
                "max_abs": 0.0, "sampled": 0, "error": str(e)}
    sample = stats.pop("sample")
    if len(sample):
        storage.save_npy(piece, np.ascontiguousarray(sample, dtype=np.float32))
    return {**stats, "sampled": len(sample), "error": ""}


# Inner product ranks by length as well as by direction: for cosine similarity the vectors
# must be unit length. A sample whose 1st or 99th percentile norm is further than this from 1
# draws a warning under data.metric=ip.
UNIT_NORM_SLACK = 0.01


def norm_warning(metric: str, norms: list[float]) -> str:
    """The warning for a sample's (1st, 50th, 99th) percentile vector norms ('' if none)."""
    if metric != "ip" or not norms or all(abs(q - 1) <= UNIT_NORM_SLACK for q in norms):
        return ""
    lo, mid, hi = norms
    return (f"ingest: data.metric=ip, but the sample's vector norms run from {lo:.3g} to "
            f"{hi:.3g} (1st-99th percentile; median {mid:.3g}), not 1: inner product then "
            "ranks by length as well as direction. L2-normalise the embeddings for cosine "
            "similarity, or set data.metric=l2 for Euclidean distance")


@ray.remote
def _join_sample(pieces: list[str], out_uri: str, seed: int, pseudo_uri: str,
                 n_pseudo: int) -> dict:
    """The shards' sample pieces as one shuffled sample (out_uri, sample.npz), and with
    `pseudo_uri` its first n_pseudo rows as the pseudo-queries. Holds two copies of the
    sample; the driver holds none. Returns its rows and the 1st, 50th and 99th percentile
    of its vectors' norms."""
    pin_threads()
    sample = np.concatenate([storage.load_npy(p) for p in pieces], dtype=np.float32) \
        if pieces else np.zeros((0, 0), np.float32)
    sample = sample[np.random.default_rng(seed).permutation(len(sample))]
    storage.save_npz(out_uri, x=sample)
    if pseudo_uri:
        storage.save_npy(pseudo_uri, sample[:n_pseudo])
    norms = np.percentile(np.linalg.norm(sample, axis=1), [1, 50, 99]).tolist() \
        if len(sample) else []
    return {"rows": len(sample), "norms": norms}


def check_sample_budget(cfg: PipelineConfig, n: int, d: int) -> str:
    """The training sample is joined, then trained on, by one task holding two float32 copies:
    it must fit in a quarter of the largest CPU-group node's memory. Raises ValueError naming
    the setting; returns the budget line for the log. (Capping the sample instead would make
    the sample depend on the cluster, which no stage key covers.)"""
    rows = min(cfg.data.train_sample, n)
    need, node = 2 * 4 * d * rows, largest_node_memory(cfg.ray, Group.CPU)
    if node and need > node // 4:
        raise InputError(
            f"data.train_sample={cfg.data.train_sample}: two copies of {rows} vectors of "
            f"d={d} take {need / 2**30:.1f} GiB in one task, more than a quarter of the "
            f"largest node's {node / 2**30:.1f} GiB; lower data.train_sample to at most "
            f"{node // 4 // (8 * d)}, or use larger nodes")
    return (f"{need / 2**30:.2f} GiB for two copies, within a quarter of the largest node's "
            f"{node / 2**30:.1f} GiB")


def _scan(cfg: RayConfig, items: list[tuple[dict, float]], d: int, seed: int,
          pieces: str = "") -> list[dict]:
    """Validates (shard, sample probability) items with Ray Data; raises the first bad-input
    error as a ValueError. Item i's sample is written to pieces/<i>.npy. Stats come back in
    the order of `items`."""
    rows = [{"at": i, "shard": sh, "p": p,
             "piece": storage.join(pieces, f"{i:06d}.npy") if p else ""}
            for i, (sh, p) in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # A scan holds its shard as read and as float32, and its sample.
    most = max(sh["stop"] - sh["start"] for sh, _ in items)
    stats = ds.map(lambda r: {"at": r["at"], "piece": r["piece"],
                              **_scan_or_report(r["shard"], d, r["p"], seed, r["piece"])},
                   resources=placement(cfg, Group.CPU),
                   memory=memory(cfg, Group.CPU, 3 * 4 * d * most)).take_all()
    errors = sorted(s["error"] for s in stats if s["error"])
    if errors:
        more = f" (and {len(errors) - 1} more shards)" if errors[1:] else ""
        raise InputError(errors[0] + more)
    return sorted(stats, key=lambda s: s["at"])


def _spans(stats: list[dict]) -> dict:
    return {Shard(**s).key: [st["id_min"], st["id_max"]] for s, st in stats}


def run_incremental(ctx: Context) -> Ingested:
    """Ingest for an incremental rebuild: only shards that are new or changed since the last
    run (ctx.inputs["previous"]) are read and validated; the training sample and queries of
    that run are kept (the quantizers are frozen)."""
    t0 = time.time()
    plan: Plan = ctx.inputs["preflight"]
    prev: Ingested = ctx.inputs["previous"]
    spans = dict(prev.spans)
    fresh = [s for s in plan.shards if Shard(**s).key not in spans]
    max_abs = prev.max_abs
    if fresh:
        stats = _scan(ctx.cfg.ray, [(s, 0.0) for s in fresh], plan.d, ctx.cfg.data.seed)
        spans.update(_spans(zip(fresh, stats)))
        max_abs = max([max_abs] + [s["max_abs"] for s in stats])
    current = [Shard(**s).key for s in plan.shards]
    spans = {k: spans[k] for k in current}
    check_unique_ids(ctx.cfg.ray, [spans[k] for k in current], plan.shards, "data.corpus")
    log.info("ingest (incremental): %d of %d shards new or changed, %d vectors (%.1fs)",
             len(fresh), len(current), plan.n, time.time() - t0)
    return Ingested(n=plan.n, d=plan.d, shards=plan.shards, inputs=plan.inputs,
                    string_ids=plan.string_ids,
                    train_query_files=prev.train_query_files, sample=prev.sample,
                    train_queries=prev.train_queries, spans=spans, max_abs=max_abs,
                    changed_shards=len(fresh))


def run(ctx: Context) -> Ingested:
    """Validates every corpus row and every training query (read by tasks, in blocks: the
    driver holds neither), and draws the training sample."""
    cfg, plan = ctx.cfg, ctx.inputs["preflight"]
    t0 = time.time()
    budget = check_sample_budget(cfg, plan.n, plan.d)
    log.info("ingest: training sample of about %d vectors (data.train_sample; %s)",
             min(cfg.data.train_sample, plan.n), budget)
    p = min(1.0, cfg.data.train_sample / plan.n)
    qfiles = first_rows([tuple(f) for f in plan.train_query_files], cfg.data.max_train_queries)
    qblocks = [b.to_dict() for b in plan_blocks(qfiles, cfg.data.rows_per_shard,
                                                columns=cfg.data.columns)]
    pieces = ctx.path("sample-pieces")
    stats = _scan(cfg.ray, [(s, p) for s in plan.shards] + [(b, 0.0) for b in qblocks],
                  plan.d, cfg.data.seed, pieces)
    stats, qstats = stats[:len(plan.shards)], stats[len(plan.shards):]
    rows = sum(s["rows"] for s in stats)
    assert rows == plan.n, f"scanned {rows} rows, metadata says {plan.n}"
    check_unique_ids(cfg.ray, [(s["id_min"], s["id_max"]) for s in stats], plan.shards,
                     "data.corpus")
    check_unique_ids(cfg.ray, [(s["id_min"], s["id_max"]) for s in qstats], qblocks,
                     "data.train_queries")
    # Drawn and written by the scan tasks, joined by one more: the driver holds no sample.
    sampled = sum(s["sampled"] for s in stats)
    n_pseudo = 0 if qfiles else min(cfg.data.pseudo_queries, sampled)
    pseudo = ctx.path("pseudo_queries.npy") if n_pseudo else ""
    task = _join_sample.options(memory=memory(cfg.ray, Group.CPU, 2 * 4 * plan.d * sampled),
                                resources=placement(cfg.ray, Group.CPU))
    joined = ray.get(task.remote([s["piece"] for s in stats if s["sampled"]],
                                 ctx.path("sample.npz"), cfg.data.seed, pseudo, n_pseudo))
    assert joined["rows"] == sampled
    warning = norm_warning(cfg.data.metric, joined["norms"])
    if warning:
        log.warning(warning)
    storage.delete(pieces)
    if pseudo:
        log.info("no data.train_queries: using %d corpus samples as pseudo-queries", n_pseudo)
        qfiles = [[pseudo, n_pseudo, readers.fingerprint(pseudo)]]
    qfiles = [list(f) for f in qfiles]
    n_queries = sum(r for _, r, _ in qfiles)
    log.info("ingest: %d vectors of d=%d in %d shards validated, %d sampled, %d training "
             "queries (%.1fs)", plan.n, plan.d, len(plan.shards), sampled,
             n_queries, time.time() - t0)
    return Ingested(n=plan.n, d=plan.d, shards=plan.shards, inputs=plan.inputs,
                    string_ids=plan.string_ids,
                    train_query_files=qfiles, sample=sampled, train_queries=n_queries,
                    spans=_spans(zip(plan.shards, stats)),
                    max_abs=max(s["max_abs"] for s in stats), changed_shards=len(plan.shards))


# ingest 2: it records the training query files, which tasks read, instead of the queries
# themselves. 3: it records the corpus's largest coordinate (the teacher's vector dtype
# follows it). 4: its result is typed (pipeline.workflow.results.Ingested).
STAGE = Stage("ingest", sections=("data",), needs=(), result=Ingested, run=run, format=4)
