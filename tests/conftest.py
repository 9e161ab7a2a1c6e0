"""Shared fixtures: one local Ray cluster and one local S3 endpoint (127.0.0.1) per session."""
from __future__ import annotations

import os
import sys
import uuid

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# Distinctive credentials, so that a test can look for them where they must never appear.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIALEAKCHECK" + uuid.uuid4().hex[:8].upper(),
               "AWS_SECRET_ACCESS_KEY": "leakcheck-" + uuid.uuid4().hex}


def pytest_collection_finish(session):
    """Starts the fault tests' disturbed job (tests/test_faults.py) as soon as the suite is
    collected, when it is among the tests to run: it runs beside the other tests."""
    if any("disturbed" in getattr(item, "fixturenames", ()) for item in session.items):
        from tests.test_faults import start_early

        start_early()


def pytest_sessionfinish(session):
    faults = sys.modules.get("tests.test_faults")
    if faults is not None:
        faults.abandon_early()


@pytest.fixture(scope="session")
def s3():
    from infra.local_s3 import start

    os.environ.update(CREDENTIALS)  # moto accepts any credentials
    server, endpoint = start(buckets=["test"])
    yield endpoint
    server.stop()


@pytest.fixture
def proxy(s3, monkeypatch):
    """The S3 endpoint behind a fault proxy (tests/s3_proxy.py); this process talks to the
    proxy, which records every request it forwards."""
    from tests.s3_proxy import Proxy

    p = Proxy(s3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    yield p
    p.stop()


@pytest.fixture(scope="session")
def cluster(s3):
    """The session's multi-node Ray cluster (infra/local_cluster.py), shaped like
    infra/cluster-aws.yaml: a head with no CPUs that runs only drivers, one GPU-group node of 2
    CPUs and 1 logical GPU and two CPU-group nodes of 2 CPUs, each its own raylet, object store
    and scratch directory.
    Started after the S3 endpoint: its workers inherit the AWS_* environment variables. Jobs
    this session starts as processes join it through RAY_ADDRESS."""
    import ray

    from infra import local_cluster
    from tests.jobsite.sitecustomize import quick_train_teardown

    quick_train_teardown()
    c = local_cluster.start(nodes=3, cpus_per_node=2, gpus_per_gpu_node=1)
    os.environ["RAY_ADDRESS"] = c.address
    yield c
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(cluster):
    """For tests that only need Ray up (this process is connected to `cluster`)."""
    return cluster


@pytest.fixture(scope="session")
def s3_smoke_run(ray_cluster, s3):
    """(data, output) of the smoke job run once through S3. test_e2e reads it as published;
    test_reruns (later in file order) then reruns into it."""
    from pipeline.cli import build as distill
    from pipeline.cli import prepare as prepare_data
    from tests.test_e2e import job_args

    data, out = "s3://test/smoke", "s3://test/runs/e2e"
    prepare_data.write_dataset(data, *prepare_data.synthetic(4000, 32), files=4)
    assert distill.main(job_args(data, out)) == 0
    return data, out


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory):
    """The smoke preset's synthetic dataset, written locally in the input contract."""
    from pipeline.cli.prepare import synthetic, write_dataset

    out = str(tmp_path_factory.mktemp("smoke"))
    write_dataset(out, *synthetic(4000, 32), files=4)
    return out


def normalized(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def published(out: str, what: str = "index") -> str:
    """The URI of a published file the output's manifest names ("index", "baseline_index",
    or a file name inside the current version, e.g. "report.json")."""
    from pipeline import publish, storage

    m = publish.resolve(out)
    rel = m[what] if what in m else f"{publish.VERSIONS}/{m['version']}/{what}"
    return storage.join(out, rel)


def open_published(out: str, local_dir, what: str = "index"):
    """The published on-disk index, opened as a reader would (S3: copied beside it first)."""
    from pipeline import storage
    from pipeline.index import ondisk

    uri = published(out, what)
    if not storage.is_s3(uri):
        return ondisk.read_ondisk(uri)
    folder = uri.rsplit("/", 1)[0]
    for name in ("index.index", "index.ivfdata"):
        storage.download_file(f"{folder}/{name}", str(local_dir / name))
    return ondisk.read_ondisk(str(local_dir / "index.index"))


class NodeLoss:
    """A worker node doomed to be lost mid-work, on the session's cluster: it alone offers the
    custom resource `group` (the test points ray.cpu_group or ray.gpu_group at it), and its
    tasks stop at the event `point` (pipeline.events, tests/fault_hooks.py in hold mode). As
    soon as one stops there, a watcher thread removes the node, as a cloud provider takes a
    machine back, and adds a replacement offering `group` that runs normally."""

    def __init__(self, cluster, group: str, point: str, hold_dir):
        import threading

        from infra import local_cluster

        self.cluster, self.group, self.hold_dir = cluster, group, str(hold_dir)
        os.makedirs(self.hold_dir, exist_ok=True)
        self.doomed = local_cluster.add_worker(
            cluster, group, env={"IVF_DISTILL_FAULT_HOLD": f"{point}:{self.hold_dir}",
                                 "IVF_DISTILL_HOOKS": "tests.fault_hooks"})
        self.replacement = None
        self.held: list[str] = []
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self, timeout: float = 300) -> None:
        import time

        from infra import local_cluster

        t0 = time.time()
        while not os.listdir(self.hold_dir):
            if time.time() - t0 > timeout:
                return
            time.sleep(0.05)
        self.held = os.listdir(self.hold_dir)
        self.cluster.remove_node(self.doomed)
        self.replacement = local_cluster.node_process(self.cluster.address, self.group,
                                                      scratch=self.cluster.scratch)

    def close(self) -> None:
        """Checks that a task really was lost with the node; stops the replacement."""
        from infra import local_cluster

        self._thread.join(timeout=60)
        if self.replacement is not None:
            local_cluster.stop_node_process(self.replacement)
        assert self.held, "no task reached the hold point: nothing was lost with the node"
