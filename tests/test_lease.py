"""One writer per output: the lease object, on local paths and through the S3 endpoint, and
whole jobs that meet a held lease, a killed holder, and an interrupt."""
import json
import os
import re
import signal
import time

import numpy as np
import pytest

from pipeline import lease, publish, storage
from pipeline.cli import build as distill
from pipeline.config import load_config

from .test_e2e import job_args
from .test_faults import start_job


@pytest.fixture(params=["local", "s3"])
def out(request, s3, tmp_path):
    if request.param == "s3":
        return f"s3://test/lease/{tmp_path.name}"
    return str(tmp_path / "run")


def die(held: lease.Lease) -> None:
    """The holder stops renewing without releasing: as a SIGKILLed job leaves it."""
    held._stop.set()
    held._thread.join()


def test_second_holder_is_refused_until_the_lease_expires(out):
    a = lease.Lease(out, ttl_s=1.5)
    a.acquire()
    b = lease.Lease(out, ttl_s=1.5)
    with pytest.raises(lease.LeaseHeld) as e:
        b.acquire()
    assert f"pid {os.getpid()}" in str(e.value) and "--break-lease" in str(e.value)
    die(a)
    time.sleep(2.0)  # not renewed for longer than its ttl: dead
    b.acquire()
    body = json.loads(storage.read_bytes(storage.join(out, lease.LEASE)))
    assert body["token"] == b.body["token"]
    b.release()
    assert not storage.exists(storage.join(out, lease.LEASE))


def test_break_lease_takes_a_live_lease_and_the_old_holder_notices(out):
    a = lease.Lease(out, ttl_s=0.8)
    a.acquire()
    b = lease.Lease(out, ttl_s=60)
    b.acquire(break_lease=True)
    deadline = time.time() + 10
    while not a.lost.is_set() and time.time() < deadline:
        time.sleep(0.1)
    assert a.lost.is_set(), "the broken holder's renewal must find the lease taken"
    with pytest.raises(lease.LeaseLost):
        a.check()
    a.release()  # removes nothing: the lease is b's now
    assert json.loads(storage.read_bytes(storage.join(out, lease.LEASE)))["token"] == \
        b.body["token"]
    b.release()


def test_break_lease_retries_when_the_holder_renews_meanwhile(out, monkeypatch):
    """A live holder's renewal that lands between the breaker's read and its conditional
    write is the same holder: --break-lease tries again and takes the lease, where another
    job's lease would stop it."""
    a = lease.Lease(out, ttl_s=60)
    a.acquire()
    real = storage.replace_if
    renewals = []

    def renew_first(uri, data, tag, timeout):
        if not renewals:  # the holder's renewal wins the race once
            renewals.append(real(uri, a._data(), a.tag, timeout))
            a.tag = renewals[-1]
        return real(uri, data, tag, timeout)

    monkeypatch.setattr(lease.storage, "replace_if", renew_first)
    b = lease.Lease(out, ttl_s=60)
    b.acquire(break_lease=True)
    assert len(renewals) == 1
    assert json.loads(storage.read_bytes(storage.join(out, lease.LEASE)))["token"] == \
        b.body["token"]
    b.release()
    a.release()


def wait_for(path_or_uri: str, proc, timeout: float = 300) -> None:
    t0 = time.time()
    while not storage.exists(path_or_uri):
        assert proc.poll() is None, "the job ended early"
        assert time.time() - t0 < timeout, f"{path_or_uri} never appeared"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.faults
def test_sigterm_names_the_stage_releases_the_lease_and_the_rerun_resumes(
        ray_cluster, s3, smoke_data, tmp_path, caplog):
    """Through S3: the job, stopped by SIGTERM once its first teacher block is written, says
    where it stopped and that a rerun resumes; its lease is gone, so the rerun needs no
    --break-lease. The rerun skips the finished stages, keeps the teacher blocks written
    (their targets are exact), and publishes."""
    from pipeline.data import readers
    from pipeline.data.teacher_parts import load_parts
    from pipeline.index import knn

    out = f"s3://test/lease-term/{tmp_path.name}"
    args = job_args(smoke_data, out, "--set", "teacher.query_block=128")  # 6 blocks
    first = start_job(args, tmp_path / "log1")
    wait_for(storage.join(out, "stages", "teacher", "_done", "part-00000.json"), first)
    os.kill(first.pid, signal.SIGTERM)
    first.wait(timeout=120)
    text = open(tmp_path / "log1").read()
    assert first.returncode == 128 + signal.SIGTERM, text[-3000:]
    # during the teacher (or, if its last blocks were that quick, in the instant after it)
    where = re.search(r"interrupted by SIGTERM (during stage (\w+)|between stages)", text)
    assert where and "Rerun" in text, text[-3000:]
    stopped = where.group(2) or "train"
    assert stopped in ("teacher", "train"), where.group(0)
    assert not storage.exists(storage.join(out, "stages", stopped, "_manifest.json"))
    assert not storage.exists(storage.join(out, lease.LEASE))
    assert not storage.exists(storage.join(out, "manifest.json"))  # nothing published
    with caplog.at_level("INFO", logger="ivf_distill"):
        assert distill.main(args) == 0
    for done in ("ingest", "init"):
        assert f"stage {done}: skipped (unchanged)" in caplog.text, caplog.text[-3000:]
    assert f"stage {stopped}: runs" in caplog.text
    if stopped == "teacher":
        kept = re.findall(r"teacher: resuming: (\d+) of 6 query blocks already done", caplog.text)
        assert len(kept) == 1 and int(kept[0]) >= 1, caplog.text[-3000:]
    assert publish.resolve(out)["counts"]["vectors"] == 4000
    info = storage.read_json(storage.join(out, "stages", "teacher", "_manifest.json"))["info"]
    got = load_parts(info["train"] + info["val"])
    ids, xb = readers.read_all(f"{smoke_data}/corpus", "corpus")
    cfg = load_config("smoke", [])
    band = knn.Band.of(cfg.teacher)
    S, I, V = knn.finish(knn.block_topk(got["xq"], xb, ids, 10, "ip", True, band=band,
                                        qids=got["qids"]), band)
    np.testing.assert_array_equal(got["I"], I)
    np.testing.assert_array_equal(got["V"], V)
