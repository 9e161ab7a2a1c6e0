"""evaluate: the published on-disk indexes answer the held-out queries; recall against the
exact neighbours (computed shard by shard) and, where labels exist, MRR and label recall."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import ray

from pipeline import storage
from pipeline.data import readers
from pipeline.index import build, metrics, ondisk
from pipeline.stages.build import METHODS, method_names
from pipeline.stages.common import Run, pin_threads, wait_all
from pipeline.stages.teacher import distributed_topk, load_parts

log = logging.getLogger("pipeline.stages.evaluate")


def score_rows(I_by_nprobe: dict, gt: np.ndarray, qids: np.ndarray, qrels: dict | None,
               base_row: dict) -> list[dict]:
    rows = []
    for nprobe, I in sorted(I_by_nprobe.items()):
        rows.append({
            **base_row, "nprobe": nprobe,
            "recall_at_10": metrics.overlap_recall(I, gt, 10),
            "recall_at_100": metrics.overlap_recall(I, gt, 100) if gt.shape[1] >= 100 else None,
            "mrr_at_10": metrics.mrr_at(I, qids, qrels, 10) if qrels else None,
            "label_recall_at_10": metrics.label_recall_at(I, qids, qrels, 10) if qrels else None,
        })
    return rows


@ray.remote
def _search_published(folder_uri: str, xq: np.ndarray, k: int, nprobes: tuple) -> dict:
    pin_threads()
    scratch = storage.local_scratch("eval")
    for name in ("index.ivfdata", "index.index"):
        storage.download_file(storage.join(folder_uri, name), os.path.join(scratch, name))
    index = ondisk.read_ondisk(os.path.join(scratch, "index.index"))
    out = {}
    for nprobe in nprobes:
        build.set_nprobe(index, nprobe)
        out[nprobe] = index.search(xq, k)[1]
    del index
    shutil.rmtree(scratch)
    return out


def run(run: Run) -> dict:
    cfg = run.cfg
    q = storage.load_npz(run.stage_path("ingest", "eval_queries.npz"))
    plan = run.stage_info("ingest")
    k = max(cfg.eval.k, 10)
    gt = load_parts(distributed_topk(run, plan["shards"], q["ids"], q["x"], k, False,
                                     run.stage_path("evaluate", "gt"),
                                     "evaluate: exact top-k")["all"])
    qrels = readers.read_labels(cfg.data.labels) if cfg.data.labels else None
    names = method_names(cfg)
    refs = [_search_published.remote(run.path(folder), q["x"], k, cfg.eval.nprobe)
            for _, folder in METHODS.values()]
    results = wait_all(refs, "evaluate: searches")
    rows = []
    for method, res in zip(METHODS, results):
        base = {"method": names[method], "bytes_per_vector": build.bytes_per_vector(cfg.index),
                "nlist": cfg.index.nlist}
        rows += score_rows(res, gt["I"], q["ids"], qrels, base)
    return {"rows": rows, "queries": len(q["ids"])}


def format_table(rows: list[dict]) -> str:
    cols = ["method", "bytes_per_vector", "nlist", "nprobe", "recall_at_10", "recall_at_100",
            "mrr_at_10", "label_recall_at_10"]
    heads = ["method", "B/vec", "nlist", "nprobe", "R@10", "R@100", "MRR@10", "labelR@10"]

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    table = [heads] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(run: Run, rows: list[dict], wall_seconds: dict) -> dict:
    """Writes report.json, report.html and its PNGs; returns {name: {"sha256", "bytes"}}."""
    from pipeline import report

    files = {"report.json": json.dumps({"rows": rows, "wall_seconds": wall_seconds},
                                       indent=2).encode()}
    train_info = run.stage_info("train") if run.is_done("train") else None
    n = run.stage_info("ingest")["n"]
    summary = {"index": run.path("index", "index.index"), "vectors": n,
               "bytes_per_vector": build.bytes_per_vector(run.cfg.index),
               "config_hash": run.cfg.hash()}
    files.update(report.render(rows, train_info, wall_seconds, summary))
    out = {}
    for name, data in files.items():
        storage.write_bytes(run.path(name), data)
        out[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    log.info("report: %s", run.path("report.html"))
    return out
