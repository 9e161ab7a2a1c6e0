"""Scale benchmark: the pipeline on synthetic 128-d corpora of growing size, per stage.

  python bench/scale.py                         # 1M and 4M vectors (about 15 min on 2 cores)
  python bench/scale.py --sizes 200000,800000   # quicker
  python bench/scale.py --nodes 3               # on a multi-node cluster (infra/local_cluster.py)
  python bench/scale.py --growth parts          # one term alone: shards, queries, nlist, parts

Each size runs in its own process with its own Ray cluster: one local node, or with --nodes N
a head with no CPUs (it runs the driver) and N worker nodes in two groups, the stages placed by
group as on infra/cluster-aws.yaml. Per stage it reports the throughput, the peak RSS of the
driver (the kernel's high-water mark, restarted at each stage) and of the Ray worker processes
(sampled from /proc every 0.2 s), the corpus bytes read
(counted by pipeline.data.readers in every process) against one pass over the corpus, and, in
the same process, bare single-process faiss on the same data: brute-force kNN (faiss.knn over
the whole corpus) for the teacher, `add` into the same trained index for encode. Prints a table
and writes JSON (--json) with rows of stage, n, throughput_per_s, faiss_throughput_per_s,
ratio, peak_rss_driver_mb, peak_private_driver_mb, peak_rss_worker_mb, peak_private_worker_mb
(private: RssAnon, without the pages of Ray's shared object store that the process mapped),
corpus_read_passes.

Throughput units: vectors/s for ingest and init (the training sample), query-document pairs/s
for the teacher, training queries/s for train, vectors/s for encode and merge (both the faiss
baseline and the distilled index are encoded and merged, so 2n vectors each).

--growth TERM runs a small proxy (2^18 vectors) at the two ends of one term, everything else
fixed (GROWTH below), and prints how each stage's figures grow from one end to the other:
seconds, the driver's and the workers' peak RSS, the teacher's object-store bytes and the
merge's ranged reads of encoded shards (both counted by the pipeline, from the stage records).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

log = logging.getLogger("bench.scale")
D = 128
FILE_ROWS = 250_000
# --growth: the proxy's size, and per term (dimension, [(label, overrides) at each end]).
GROWTH_N = 1 << 18
GROWTH = {
    "shards": (D, [(str(s), [f"data.rows_per_shard={GROWTH_N // s}"]) for s in (64, 1024)]),
    "queries": (D, [(str(q), [f"data.pseudo_queries={q}"]) for q in (4096, 65536)]),
    # nlist at d = 32: k-means over the whole proxy, and 16 B codes
    "nlist": (32, [(str(n), [f"index.nlist={n}", f"data.train_sample={GROWTH_N}",
                             "index.M=16", "init.niter=4"]) for n in (1024, 65536)]),
    "parts": (D, [(str(p), [f"build.output_parts={p}"]) for p in (1, 16)]),
}


def make_corpus(folder: str, n: int, seed: int = 0, d: int = D) -> None:
    """Clustered, L2-normalised vectors as .npy files of FILE_ROWS rows (cached)."""
    done = os.path.join(folder, "_complete")
    if os.path.exists(done):
        return
    os.makedirs(folder, exist_ok=True)
    centers = np.random.default_rng(seed).standard_normal((1000, d)).astype(np.float32)
    for i, a in enumerate(range(0, n, FILE_ROWS)):
        rng = np.random.default_rng([seed, i])
        rows = min(FILE_ROWS, n - a)
        x = centers[rng.integers(0, len(centers), rows)] + \
            0.7 * rng.standard_normal((rows, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(os.path.join(folder, f"part-{i:05d}.npy"), x.astype(np.float32))
    open(done, "w").close()


def rss_mb(pid: int | str, field: str = "VmRSS") -> float:
    """A process's resident memory: VmRSS, or RssAnon, its private part (VmRSS also counts the
    pages of Ray's shared object store that the process touched)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def ray_worker_pids() -> list[str]:
    """Processes running Ray tasks and actors (their title starts with "ray::"), not idle
    workers and not Ray's own daemons (dashboard, agents)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read(64).decode(errors="replace")
        except OSError:
            continue
        # A worker's title names the task it runs; idle workers (ray::IDLE) keep whatever an
        # earlier stage left on their heap and are not counted against this stage.
        if title.startswith("ray::") and not any(w in title for w in ("IDLE", "Agent",
                                                                      "Dashboard")):
            out.append(pid)
    return out


def reset_peak_rss() -> bool:
    """Restarts this process's VmHWM (its peak RSS, kept by the kernel) from its current RSS
    (Linux: "5" into /proc/self/clear_refs). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Peak RSS of the driver and of any Ray worker, and the private part (RssAnon) of
    each, per pipeline stage. The driver's peak is the kernel's own high-water mark (VmHWM,
    restarted at each stage), so a brief peak between two samples is not missed; the rest is
    sampled every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stage, self.peaks, self.running = None, {}, True
        self.hwm = False

    def _fold_hwm(self) -> None:
        if self.stage and self.hwm:
            peak = self.peaks[self.stage]
            peak[0] = max(peak[0], rss_mb(os.getpid(), "VmHWM"))

    def set_stage(self, name: str) -> None:
        self._fold_hwm()
        self.peaks.setdefault(name, [0.0, 0.0, 0.0, 0.0])
        self.hwm = reset_peak_rss()
        self.stage = name

    def stop(self) -> None:
        self._fold_hwm()
        self.running = False

    def run(self):
        while self.running:
            if self.stage:
                peak = self.peaks[self.stage]
                workers = ray_worker_pids()
                peak[0] = max(peak[0], rss_mb(os.getpid(), "VmHWM" if self.hwm else "VmRSS"))
                peak[3] = max(peak[3], rss_mb(os.getpid(), "RssAnon"))
                peak[1] = max([peak[1]] + [rss_mb(p) for p in workers])
                peak[2] = max([peak[2]] + [rss_mb(p, "RssAnon") for p in workers])
            time.sleep(0.2)


def bare_faiss(out: str, corpus: str, k: int, rows: int = 0) -> dict:
    """Single-process faiss on the same data: brute-force kNN of the pipeline's training
    queries (faiss.knn, IndexFlat's kernel), and add into the pipeline's trained baseline
    index; on the corpus's first `rows` vectors (0: all of it), since both costs are linear
    in the corpus and a second pass over a 100M corpus doubles the benchmark."""
    import faiss

    from pipeline import storage
    from pipeline.data import readers
    from pipeline.storage import read_index

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    ids, xb = readers.read_all(corpus, "corpus", rows)
    info = storage.read_json(os.path.join(out, "stages", "ingest", "_manifest.json"))["info"]
    xq = np.concatenate([readers.read_rows(f, 0, rows)[1]
                         for f, rows, _ in info["train_query_files"]])
    nq = len(xq)
    t0 = time.time()
    # faiss.knn: IndexFlat's search kernel without a copy of the corpus (16M x 128-d is 8 GB)
    faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
    knn_s = time.time() - t0
    trained = read_index(os.path.join(out, "stages", "init", "baseline.index"))
    t0 = time.time()
    trained.add_with_ids(xb, ids)
    add_s = time.time() - t0
    return {"teacher": nq * len(xb) / knn_s, "encode": len(xb) / add_s}


def read_bytes_so_far(stats_dir: str) -> int:
    """Corpus bytes read so far by every process of the run (bench/read_stats.py writes one
    running total per process into IVF_DISTILL_READ_STATS)."""
    total = 0
    for name in os.listdir(stats_dir):
        try:
            with open(os.path.join(stats_dir, name)) as f:
                total += int(f.read() or 0)
        except (OSError, ValueError):
            pass
    return total


def corpus_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".npy"))


def search_published(out: str, corpus: str, nq: int, k: int, nprobe: int) -> dict:
    """The published index, opened as a user opens it (jobs/search.py), searched with `nq`
    corpus vectors spread over the corpus: queries/s, and how often a query's own id is in
    its top k (each vector's exact nearest neighbour under inner product is itself)."""
    from pipeline.reader import open_index

    files = sorted(f for f in os.listdir(corpus) if f.endswith(".npy"))
    xs = [np.load(os.path.join(corpus, f), mmap_mode="r") for f in files]
    starts = np.cumsum([0] + [len(x) for x in xs])
    qid = np.linspace(0, starts[-1] - 1, nq).astype(np.int64)
    where = np.searchsorted(starts, qid, side="right") - 1
    xq = np.stack([np.asarray(xs[f][i - starts[f]], dtype=np.float32)
                   for f, i in zip(where, qid)])
    t0 = time.time()
    index = open_index(out, tempfile.mkdtemp(prefix="ivf-distill-search-"))
    opened = time.time() - t0
    t0 = time.time()
    _, found = index.search(xq, k, nprobe)
    secs = time.time() - t0
    return {"queries": len(xq), "seconds": secs, "qps": len(xq) / secs, "open_s": opened,
            "self_in_top_k": float(np.mean([q in row for q, row in zip(qid, found)])),
            "nprobe": nprobe, "k": k}


def run_one(n: int, data_root: str, config: str, overrides: list[str], nodes: int,
            cpus_per_node: int, d: int = D, faiss_rows: int = 0,
            search_queries: int = 0) -> list[dict]:
    import ray

    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    corpus = os.path.join(data_root, f"n{n}" + ("" if d == D else f"-d{d}"))
    t0 = time.time()
    make_corpus(corpus, n, d=d)
    log.info("corpus of %d vectors ready in %.0fs", n, time.time() - t0)
    stats_dir = tempfile.mkdtemp(prefix="ivf-distill-reads-")
    # bench/read_stats.py counts the bytes each process reads; the workers inherit this
    watch = {"IVF_DISTILL_READ_STATS": stats_dir, "IVF_DISTILL_HOOKS": "bench.read_stats"}
    os.environ.update(watch)
    if nodes:
        from infra import local_cluster

        local_cluster.start(nodes, cpus_per_node, env=watch)
        overrides = [f"ray.gpu_group={local_cluster.GPU_GROUP}",
                     f"ray.cpu_group={local_cluster.CPU_GROUP}", *overrides]
    cfg = load_config(config, [f"data.corpus={corpus}", *overrides])
    out = tempfile.mkdtemp(prefix=f"ivf-distill-scale-{n}-")
    sampler = Sampler()
    reads = {}

    def on_stage(name):
        reads[name] = read_bytes_so_far(stats_dir)
        sampler.set_stage(name)

    sampler.start()
    result = run_pipeline(cfg, out, on_stage=on_stage)
    sampler.stop()
    reads["end"] = read_bytes_so_far(stats_dir)
    secs = result["seconds"]
    from pipeline.runner import BY_NAME
    from pipeline.workflow.stage import Run

    run = Run(out)
    nq = run.result(BY_NAME["teacher"]).queries
    trained_q = sum(h["queries"] for h in run.result(BY_NAME["train"]).history)
    merged = run.result(BY_NAME["merge"])
    built = sum(m.ntotal for m in merged.indexes.values())  # n per index built
    work = {"ingest": n, "init": run.result(BY_NAME["init"]).n_train, "teacher": nq * n,
            "train": trained_q, "encode": built, "merge": built}
    counted = {"teacher": {"object_store_bytes": run.result(BY_NAME["teacher"]).object_store_bytes},
               "merge": {"requests": merged.requests, "bytes_read": merged.bytes_read,
                         "parts": merged.parts}}
    order = list(reads)
    read_by_stage = {st: reads[order[i + 1]] - reads[st] for i, st in enumerate(order[:-1])}
    one_pass = corpus_bytes(corpus)
    ray.shutdown()
    # the search the teacher runs per shard: the top k, or the top band_depth with a band
    bare = bare_faiss(out, corpus, max(cfg.teacher.k, cfg.teacher.band_depth), faiss_rows)
    rows = []
    for stage, s in secs.items():
        if stage not in work:
            continue
        tput = work[stage] / max(s, 1e-9)
        ref = bare.get(stage)
        peak = sampler.peaks.get(stage, [0.0, 0.0, 0.0, 0.0])
        rows.append({"stage": stage, "n": n, "queries": nq, "nodes": nodes, "seconds": s,
                     "throughput_per_s": tput, "faiss_throughput_per_s": ref,
                     "ratio": tput / ref if ref else None,
                     "peak_rss_driver_mb": round(peak[0], 1),
                     "peak_private_driver_mb": round(peak[3], 1),
                     "peak_rss_worker_mb": round(peak[1], 1),
                     "peak_private_worker_mb": round(peak[2], 1),
                     "corpus_read_passes": round(read_by_stage.get(stage, 0) / one_pass, 3),
                     **counted.get(stage, {}),
                     **({"faiss_rows": faiss_rows} if faiss_rows and ref else {})})
    if search_queries:
        got = search_published(out, corpus, search_queries, 10, 16)
        log.info("search: %s", got)
        rows.append({"stage": "search", "n": n, "queries": got["queries"], "nodes": nodes,
                     "seconds": got["seconds"], "throughput_per_s": got["qps"],
                     "faiss_throughput_per_s": None, "ratio": None, **got})
    return rows


def format_rows(rows: list[dict]) -> str:
    head = ["stage", "n", "queries", "seconds", "throughput/s", "faiss/s", "ratio",
            "driver MB", "driver private MB", "worker MB", "worker private MB",
            "corpus passes read"]
    keys = ["stage", "n", "queries", "seconds", "throughput_per_s", "faiss_throughput_per_s",
            "ratio", "peak_rss_driver_mb", "peak_private_driver_mb", "peak_rss_worker_mb",
            "peak_private_worker_mb", "corpus_read_passes"]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if v < 1000 else f"{v:,.0f}"
        return str(v)

    table = [head] + [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(t, widths)) for t in table)


def child(args, n: int, overrides: list[str], d: int = D) -> list[dict] | None:
    """One run in its own process (its own Ray cluster); its rows, or None if it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--dim", str(d),
           "--faiss-rows", str(args.faiss_rows), "--search", str(args.search),
           "--data", args.data, "--config", args.config, "--nodes", str(args.nodes),
           "--cpus-per-node", str(args.cpus_per_node)] + \
        [a for o in args.overrides + overrides for a in ("--set", o)]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if res.returncode:
        print(f"run {n} {' '.join(overrides)} failed (exit {res.returncode})", file=sys.stderr)
        return None
    return json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("ROWS "))[5:])


def growth(args) -> int:
    """--growth TERM: the proxy at both ends of the term; how each stage's figures grow."""
    d, ends = GROWTH[args.growth]
    rows = []
    for label, overrides in ends:
        got = child(args, GROWTH_N, overrides, d)
        if got is None:
            return 1
        rows += [{**r, "growth": args.growth, "at": label, "overrides": overrides} for r in got]
    print("\n" + format_rows(rows))
    lo, hi = ends[0][0], ends[-1][0]
    print(f"\n{args.growth} {lo} -> {hi} ({GROWTH_N:,} vectors, d={d}): each figure at {lo}, "
          f"at {hi}, and the ratio")
    keys = [("seconds", "s"), ("peak_rss_driver_mb", "driver MB"),
            ("peak_rss_worker_mb", "worker MB"), ("object_store_bytes", "object store B"),
            ("requests", "ranged reads"), ("bytes_read", "bytes read")]
    for stage in dict.fromkeys(r["stage"] for r in rows):
        a = next(r for r in rows if r["stage"] == stage and r["at"] == lo)
        b = next(r for r in rows if r["stage"] == stage and r["at"] == hi)
        cells = [f"{name} {a[k]:,.0f} -> {b[k]:,.0f} ({b[k] / max(a[k], 1e-9):.2f}x)"
                 for k, name in keys if a.get(k) is not None and k in b]
        print(f"  {stage:<8} " + ";  ".join(cells))
    write_json(args.json, rows)
    return 0


def write_json(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    print(f"\nwrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="1000000,4000000")
    ap.add_argument("--config", default=os.path.join(ROOT, "bench", "scale.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data", default=os.path.join(ROOT, "runs", "bench", "scale-data"))
    ap.add_argument("--json", default=None,
                    help="default runs/bench/scale.json (--growth: scale-growth-TERM.json)")
    ap.add_argument("--nodes", type=int, default=0,
                    help="worker nodes of a multi-node cluster (0: one local node)")
    ap.add_argument("--cpus-per-node", type=int, default=2)
    ap.add_argument("--growth", choices=sorted(GROWTH),
                    help="grow one term alone on a small proxy (see GROWTH)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child: one size, JSON out
    ap.add_argument("--dim", type=int, default=D, help="the corpus's dimension")
    ap.add_argument("--faiss-rows", type=int, default=0,
                    help="bare faiss on the corpus's first N vectors (0: all of them)")
    ap.add_argument("--search", type=int, default=0,
                    help="after the run, search the published index with N corpus vectors")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("aiobotocore", "botocore", "s3fs", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.one:
        rows = run_one(args.one, args.data, args.config, args.overrides, args.nodes,
                       args.cpus_per_node, args.dim, args.faiss_rows, args.search)
        print("ROWS " + json.dumps(rows))
        return 0
    args.json = args.json or os.path.join(
        ROOT, "runs", "bench", f"scale-growth-{args.growth}.json" if args.growth
        else "scale.json")
    if args.growth:
        return growth(args)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        got = child(args, n, [], args.dim)
        if got is None:
            return 1
        rows += got
    print("\n" + format_rows(rows))
    sizes = sorted({r["n"] for r in rows})
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"\npeak RSS at {hi:,} relative to {lo:,} (targets: driver <= 1.1x, workers "
              "<= 1.2x):")
        for stage in dict.fromkeys(r["stage"] for r in rows if r["stage"] != "search"):
            a = next(r for r in rows if r["stage"] == stage and r["n"] == lo)
            b = next(r for r in rows if r["stage"] == stage and r["n"] == hi)
            def grew(key):
                return b[key] / max(a[key], 1)

            print(f"  {stage:<8} driver {grew('peak_rss_driver_mb'):.2f}x (private "
                  f"{grew('peak_private_driver_mb'):.2f}x)  workers "
                  f"{grew('peak_rss_worker_mb'):.2f}x (private "
                  f"{grew('peak_private_worker_mb'):.2f}x)")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
