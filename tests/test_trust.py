"""Trust under partitions, crashes and hostile files: the fenced lease, checkpoints that are
data, manifest names that stay in their version, pruning that keeps what readers hold, file
identity, URIs, durability and S3's conditional writes. S3 cases run on the local endpoint,
faults through tests/s3_proxy.py in front of it."""
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline import checkpoint, lease, publish, storage
from pipeline.cli import build as distill
from pipeline.cli import copy as copy_run
from pipeline.cli import search
from pipeline.config import load_config
from pipeline.data import readers
from pipeline.data.teacher_parts import table_arrays, teacher_table
from pipeline.index import knn
from pipeline.runner import check_output
from pipeline.stages import train as train_stage
from pipeline.workflow.stage import Context, Run, StageConfig

from .test_bad_input import good, run_job, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "s3"])
def out(request, s3, tmp_path):
    if request.param == "s3":
        return f"s3://test/trust/{tmp_path.name}"
    return str(tmp_path / "run")


# --- 1. the fenced lease -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Note:
    """A stage result that says who wrote it."""
    by: str
    i: int = 0


HOLDER = """
import sys, time
from dataclasses import dataclass
from pipeline import lease
from pipeline.workflow.stage import Run

@dataclass(frozen=True)
class Note:
    by: str
    i: int = 0

out, ttl = sys.argv[1], float(sys.argv[2])
held = lease.Lease(out, ttl)
held.acquire()
run = Run(out)
print("HELD", flush=True)
i = 0
while True:
    try:
        run.finish("x", Note("A", i), 0.0, held=held)
        print("WROTE", i, time.monotonic(), flush=True)
        i += 1
    except lease.LeaseLost as e:
        print("LOST", time.monotonic(), e, flush=True)
        sys.exit(1)
    except Exception as e:  # a write that timed out: the lease decides when to stop
        print("FAILED", type(e).__name__, flush=True)
    time.sleep(0.1)
"""


def test_a_partitioned_holder_stops_before_a_taker_writes(proxy, s3, tmp_path):
    """The holder reaches S3 through the proxy, which stops answering: its renewals fail, and
    it stops writing once 3/4 of the TTL passed since its last renewal began. A second job
    (straight to the endpoint) takes over only after seeing the lease unchanged for a whole
    TTL, later than the holder stopped. The proxy then delivers the held requests late, as a
    slow network may: a stage record the old holder wrote that way is never read by the new
    holder."""
    out, ttl = f"s3://test/partition/{tmp_path.name}", 4.0
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint, "PYTHONPATH": ROOT}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, out, str(ttl)], env=env,
                              stdout=subprocess.PIPE, text=True)
    lines = []
    while not any(line.startswith("WROTE 2") for line in lines):
        lines.append(holder.stdout.readline())
        assert lines[-1], "the holder ended early"
    proxy.mode = "hang"
    os.environ["AWS_ENDPOINT_URL"] = s3  # this process: straight to the endpoint
    try:
        taker = lease.Lease(out, ttl)
        t0 = time.monotonic()
        while True:
            try:
                taker.acquire()
                break
            except lease.LeaseHeld:
                assert time.monotonic() - t0 < 60, "the dead lease was never taken over"
                time.sleep(0.5)
        taken_at = time.monotonic()
        run = Run.sealing(out, taker.token)
        assert run.record("x")["info"]["by"] == "A", "what A committed in time is kept"
        run.finish("x", Note("B"), 0.0, held=taker)
        rest, _ = holder.communicate(timeout=60)
        lines += rest.splitlines()
        lost = [line for line in lines if line.startswith("LOST")]
        assert holder.returncode == 1 and lost, lines[-5:]
        assert float(lost[0].split()[1]) < taken_at, "the old holder must stop first"
        last_write = max(float(line.split()[2]) for line in lines if line.startswith("WROTE"))
        assert last_write < taken_at
        proxy.mode = "pass"  # the held requests land now, after the takeover
        deadline = time.time() + 10
        while "A" not in storage.read_bytes(run.manifest_uri("x")).decode() and \
                time.time() < deadline:
            time.sleep(0.2)
        assert run.record("x") is None, "the late write landed over B's record: ignored"
        taker.release()
    finally:
        holder.kill()
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint


def test_a_taker_with_a_skewed_clock_does_not_take_a_live_lease(out):
    """The holder's clock is 1,000 s behind the taker's (more than the TTL): by timestamps
    the lease looks long dead, but the taker watches it on its own clock, sees it renewed,
    and refuses."""
    holder = lease.Lease(out, ttl_s=2.0, clock=lambda: time.time() - 1000)
    holder.acquire()
    try:
        with pytest.raises(lease.LeaseHeld) as e:
            lease.Lease(out, ttl_s=2.0).acquire()
        assert "renewed its lease while this job watched it" in str(e.value)
        holder.check()
    finally:
        holder.release()


def test_stage_records_name_the_lease_that_wrote_them(tmp_path):
    out = str(tmp_path / "run")
    with lease.hold(out, 60) as held:
        run = Run(out)
        run.finish("ingest", Note("A"), 0.1, "k", {}, {}, held)
        assert run.record("ingest")["lease"] == held.token
        held._lose("test")
        with pytest.raises(lease.LeaseLost):
            run.finish("init", Note("A"), 0.1, "k", {}, {}, held)
    assert run.record("init") is None, "a job that lost its lease writes nothing more"


# --- 2. no pickle ------------------------------------------------------------------------

class _Payload:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (open, (self.flag, "w"))


def test_a_planted_pickle_checkpoint_is_set_aside_unexecuted(tmp_path, caplog):
    out, flag = str(tmp_path / "run"), str(tmp_path / "pwned")
    run = Run(out)
    ctx = Context("train", StageConfig("train", {}), {}, run, key="k")
    uri = run.stage_path("train", train_stage.CHECKPOINT)
    for payload in ("torch", "npz"):
        buf = io.BytesIO()
        if payload == "torch":
            torch.save({"stage_key": "k", "x": _Payload(flag)}, buf)
        else:
            np.savez(buf, __tree__=np.frombuffer(b'{"array": "a0"}', np.uint8),
                     a0=np.array([_Payload(flag)], dtype=object))
        storage.write_bytes(uri, buf.getvalue())
        with caplog.at_level("INFO", logger="ivf_distill"):
            assert not train_stage._resumable(ctx, uri)
        assert not os.path.exists(flag), "the payload ran"
        assert not storage.exists(uri) and "unreadable" in caplog.text
    state = {"epoch": 1, "stage_key": "k", "model": {"w": torch.ones(2)}, "t": (1, 2)}
    back = checkpoint.loads(checkpoint.dumps(state))
    assert back["t"] == (1, 2) and torch.equal(back["model"]["w"], torch.ones(2))


class _CountingFile(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.read_bytes = 0

    def read(self, n=-1):
        got = super().read(n)
        self.read_bytes += len(got)
        return got


def test_the_driver_reads_a_checkpoints_structure_not_its_model():
    """load_meta (what the train stage's driver reads) returns the epoch, key and history with
    every array left out, and reads the same bytes whether the model holds 1K or 4M numbers:
    what the driver holds does not grow with nlist."""
    read = []
    for n in (1 << 10, 1 << 22):
        state = {"epoch": 2, "stage_key": "k", "history": [{"loss": 0.5}],
                 "model": {"centroids": torch.ones(n // 64, 64)}, "pool": np.zeros(n)}
        data = checkpoint.dumps(state)
        f = _CountingFile(data)
        meta = checkpoint.load_meta(f)
        assert meta["epoch"] == 2 and meta["history"] == [{"loss": 0.5}]
        assert meta["model"] == {"centroids": None} and meta["pool"] is None
        read.append(f.read_bytes)
        assert f.read_bytes < 4096
    assert read[0] == read[1]


# --- 3. names from manifests ---------------------------------------------------------------

def fake_version(output: str, version: str, held, files=("report.json",)) -> bytes:
    """A complete version folder with small files; returns its manifest's bytes."""
    vrel = f"versions/{version}"
    table = {}
    for name in files:
        data = f"{version}/{name}".encode()
        held.write(storage.join(output, vrel, name), data)
        table[f"{vrel}/{name}"] = {"sha256": hashlib.sha256(data).hexdigest(),
                                   "bytes": len(data)}
    manifest = {"version": version, "files": table, "index": f"{vrel}/index/index.index",
                "baseline_index": f"{vrel}/baseline/index.index"}
    data = storage.json_bytes(manifest)
    held.write(storage.join(output, vrel, publish.POINTER), data)
    return data


def version(i: int) -> str:
    return f"20260101T0000{i:02d}.000000Z-0000000{i % 10}"


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "s3://other/x",
                                  "versions/{v}/../../../x", "versions/{v}/a/../../b"])
def test_manifest_names_outside_their_version_are_refused(tmp_path, capsys, name):
    out, v = str(tmp_path / "run"), version(1)
    os.makedirs(tmp_path / "run")
    with lease.hold(out, 60) as held:
        data = json.loads(fake_version(out, v, held))
    bad = name.format(v=v)
    data["files"][bad] = {"sha256": "0" * 64, "bytes": 1}
    data["index"] = bad
    storage.write_json(storage.join(out, publish.POINTER), data)
    queries = str(tmp_path / "q.npy")
    np.save(queries, np.zeros((1, 8), np.float32))
    assert search.main(["--index", out, "--queries", queries]) == 2
    assert "refusing" in capsys.readouterr().err
    dst = tmp_path / "copy"
    assert copy_run.main([out, str(dst)]) == 2
    assert "refusing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "b")


def test_rollback_takes_only_version_names(tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    for bad in ("../other", "versions/../../x", version(3)):
        assert distill.main(["--output", out, "--rollback", bad]) == 2
        assert "no complete version" in capsys.readouterr().err


def test_copy_run_verifies_holds_the_lease_and_swaps(tmp_path, capsys):
    src, dst, v = str(tmp_path / "src"), str(tmp_path / "dst"), version(1)
    with lease.hold(src, 60) as held:
        data = fake_version(src, v, held)
        publish.swap(src, data, None, v, None, held)
    manifest = json.loads(data)
    del manifest["index"], manifest["baseline_index"]  # a version without an index pair
    storage.write_bytes(storage.join(src, publish.POINTER), storage.json_bytes(manifest))
    with lease.hold(dst, 60):  # a job is publishing there: the copy must not race it
        assert copy_run.main([src, dst]) == 2
        assert "another job is writing" in capsys.readouterr().err
    report = storage.join(src, "versions", v, "report.json")
    good_bytes = storage.read_bytes(report)
    storage.write_bytes(report, b"X" * len(good_bytes))  # damaged after publishing
    assert copy_run.main([src, dst]) == 2
    assert "damaged" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(dst, publish.POINTER))
    storage.write_bytes(report, good_bytes)
    assert copy_run.main([src, dst]) == 0
    assert publish.resolve(dst)["version"] == v
    assert not os.path.exists(os.path.join(dst, lease.LEASE))


# --- 4. pruning --------------------------------------------------------------------------

def test_pruning_keeps_what_readers_may_hold(out):
    with lease.hold(out, 60) as held:
        def make_current(v):
            current, tag = publish.read_pointer(out)
            data = fake_version(out, v, held) if v not in publish.versions(out) else \
                storage.read_bytes(storage.join(out, "versions", v, publish.POINTER))
            publish.swap(out, data, tag, v, (current or {}).get("version"), held)

        for i in (1, 2, 3):
            make_current(version(i))
        assert publish.prune(out, 3, 0.0, held) == []
        # back to the oldest version, then a new publish: the version rolled back to was
        # current until seconds ago, so it stays, though it is the oldest by name
        publish.rollback(out, version(1), held)
        make_current(version(4))
        assert publish.prune(out, 2, 0.0, held) == [version(2), version(3)]
        assert publish.versions(out) == [version(1), version(4)]
        make_current(version(5))
        # within the grace period nothing goes; after it, the least recently current
        assert publish.prune(out, 2, 3600.0, held) == []
        assert publish.prune(out, 2, 0.0, held) == [version(1)]
    with pytest.raises(ValueError, match="keep_versions must be >= 2"):
        load_config("smoke", ["publish.keep_versions=1"])


# --- 5. file identity --------------------------------------------------------------------

def test_a_replaced_file_with_its_times_kept_counts_as_changed(tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.zeros((4, 8), np.float32))
    np.save(b, np.ones((4, 8), np.float32))
    st = os.stat(a)
    before = readers.fingerprint(str(a))
    shutil.copyfile(b, tmp_path / "tmp.npy")  # cp -p: same size, the old mtime
    os.utime(tmp_path / "tmp.npy", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "tmp.npy", a)
    assert os.stat(a).st_size == st.st_size and os.stat(a).st_mtime_ns == st.st_mtime_ns
    assert readers.fingerprint(str(a)) != before
    with_content = readers.fingerprint(str(a), content=True)
    assert with_content.endswith(storage.sha256_file(str(a)))


# --- 6. URIs -----------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["s3://", "s3://test", "s3://test/"])
def test_outputs_without_bucket_or_prefix_are_refused(s3, tmp_path, capsys, uri):
    corpus, _ = good(tmp_path)
    err = run_job(capsys, corpus, uri)
    assert "--output" in err and ("names no bucket" in err or "whole bucket" in err)
    assert not os.path.exists("s3:"), "nothing may be written to a local folder named s3:"
    assert storage.join("s3://b", "x", "y") == "s3://b/x/y"


def test_a_corpus_without_bucket_is_refused(s3, tmp_path, capsys):
    assert "names no bucket" in run_job(capsys, "s3://", str(tmp_path / "o"))


# --- 7. durability -----------------------------------------------------------------------

def test_a_local_version_reaches_the_disk_before_the_pointer(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    synced = []
    monkeypatch.setattr(storage.local, "fsync_path", lambda p: synced.append(os.path.abspath(p)))
    pointer = os.path.join(out, publish.POINTER)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.abspath(dst) == pointer:
            synced.append("POINTER RENAMED")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with lease.hold(out, 60) as held:
        data = fake_version(out, version(1), held)
        publish.swap(out, data, None, version(1), None, held)
    at = synced.index("POINTER RENAMED")
    vdir = os.path.join(out, "versions", version(1))
    for f in (os.path.join(vdir, "report.json"), os.path.join(vdir, publish.POINTER), vdir):
        assert f in synced[:at], f
    assert out in synced[at:], "the pointer's folder is flushed after the rename"


# --- 8. S3 conditional writes --------------------------------------------------------------

def test_a_lost_put_response_is_resolved_by_reading_back(proxy, tmp_path):
    uri = f"s3://test/cond/{tmp_path.name}/obj"
    proxy.mode = "lose-put"
    tag = storage.create_exclusive(uri, b"mine-" + tmp_path.name.encode(), timeout=4.0)
    assert proxy.mode == "pass", "the proxy must have dropped one response"
    assert storage.read_tagged(uri)[1] == tag
    with pytest.raises(storage.Conflict):  # someone else's bytes are still a conflict
        storage.create_exclusive(uri, b"theirs")


def test_a_409_is_retried(proxy, tmp_path):
    uri = f"s3://test/cond/{tmp_path.name}/obj"
    tag = storage.create_exclusive(uri, b"one")
    proxy.mode = "conflict-put"
    tag2 = storage.replace_if(uri, b"two", tag)
    assert proxy.mode == "pass" and storage.read_tagged(uri) == (b"two", tag2)


def test_a_store_that_ignores_conditions_is_refused_unless_allowed(proxy, tmp_path, caplog):
    out = f"s3://test/cond/{tmp_path.name}"
    proxy.mode = "strip"
    cfg = load_config("smoke", [f"data.corpus={out}/c"])
    with pytest.raises(ValueError, match="ignores If-None-Match"):
        check_output(cfg, out)
    cfg = load_config("smoke", [f"data.corpus={out}/c",
                                                  "publish.require_conditional_writes=false"])
    check_output(cfg, out)
    assert "are NOT kept apart" in caplog.text
    assert not storage.listdir(out), "the probe object is deleted"


# --- 9. bad input ------------------------------------------------------------------------

def test_an_empty_list_float_corpus(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(tmp_path / "c")
    pq.write_table(pa.table({"id": pa.array([], pa.int64()),
                             "embedding": pa.array([], pa.list_(pa.float32()))}),
                   tmp_path / "c" / "a.parquet")
    assert "holds no rows" in run_job(capsys, str(tmp_path / "c"), str(tmp_path / "o"))


def test_a_fixed_and_a_list_file_of_other_dimensions(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus, _ = good(tmp_path, d=32)
    x = np.ones((10, 16), np.float32)
    pq.write_table(pa.table({"id": pa.array(np.arange(5000, 5010)),
                             "embedding": pa.array(list(x), pa.list_(pa.float32()))}),
                   os.path.join(corpus, "b.parquet"))
    err = run_job(capsys, corpus, str(tmp_path / "o"))
    assert "disagree on the dimension" in err and "d=16" in err and "d=32" in err


@pytest.mark.parametrize("fault", ["down", "credentials", "bucket"])
def test_s3_trouble_at_start_fails_fast_and_names_the_uri(s3, tmp_path, fault):
    """Each within 30 s, naming the URI, exit 2. Wrong credentials: a second local endpoint
    that checks them (moto with authentication on)."""
    corpus, _ = good(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = "s3://test/start/run"
    server = None
    if fault == "down":
        from infra.local_s3 import free_port

        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif fault == "bucket":
        out = "s3://no-such-bucket/run"
    else:
        from infra.local_s3 import free_port

        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**env, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        wait_for_port(port)
    try:
        t0 = time.time()
        res = subprocess.run([sys.executable, "jobs/distill.py", "--config",
                              "smoke", "--output", out, "--set",
                              f"data.corpus={corpus}", "--set", "data.train_queries=",
                              "--set", "eval.queries=", "--set", "eval.labels="],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        took = time.time() - t0
    finally:
        if server is not None:
            server.kill()
    assert res.returncode == 2, res.stderr[-2000:]
    assert out in res.stderr and took < 30, (took, res.stderr[-2000:])
    want = {"down": "cannot be reached", "credentials": "refused",
            "bucket": "does not exist"}[fault]
    assert want in res.stderr, res.stderr[-2000:]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    import socket

    t0 = time.time()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.time() - t0 < timeout, "the second endpoint never started"
            time.sleep(0.2)


def test_bad_eval_queries_fail_before_any_work(tmp_path, capsys):
    corpus, x = good(tmp_path)
    q = x[:20].copy()
    q[3, 0] = np.nan
    write(str(tmp_path / "q" / "a.parquet"), np.arange(20), q)
    err = run_job(capsys, corpus, str(tmp_path / "o"), "--set",
                  f"eval.queries={tmp_path / 'q'}")
    assert "eval.queries" in err and "NaN" in err
    assert not os.path.exists(tmp_path / "o" / "stages" / "ingest"), "before ingest ran"


def test_val_fraction_zero_is_refused(tmp_path, capsys):
    corpus, _ = good(tmp_path)
    err = run_job(capsys, corpus, str(tmp_path / "o"), "--set", "teacher.val_fraction=0")
    assert "teacher.val_fraction must be in (0, 1)" in err


def test_teacher_vectors_beyond_float16_are_kept_as_float32():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((200, 8)).astype(np.float32) * 1e5  # beyond float16's 65504
    xq = xb[:5] + 1.0
    S, I, V = knn.block_topk(xq, xb, np.arange(200), 4, "l2", "float32")
    assert V.dtype == np.float32 and np.isfinite(V).all()
    np.testing.assert_array_equal(V, xb[I])
    back = table_arrays(teacher_table(np.arange(5), xq, S, I, V))
    assert back["V"].dtype == np.float32 and np.array_equal(back["V"], V)
    assert not np.isfinite(knn.block_topk(xq, xb, np.arange(200), 4, "l2", True)[2]).all(), \
        "float16 would have overflowed: the reason for float32"
