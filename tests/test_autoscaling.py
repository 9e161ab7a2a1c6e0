"""The job on an autoscaling cluster shaped like infra/cluster-aws.yaml: a head with no CPUs,
a GPU group (one logical GPU a node) and a CPU group, both at min_workers 0, started by Ray's
autoscaler (v2, its fake multi-node provider) only as the job asks for them."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from infra import local_cluster
from pipeline import publish, storage

from .test_e2e import ROOT, job_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def autoscaling():
    c = local_cluster.AutoscalingCluster(local_cluster.aws_shaped_node_types())
    yield c
    c.stop()


def _job(cluster, args, timeout=900):
    env = {**cluster.env, "PYTHONPATH": ROOT}
    try:
        return subprocess.run([sys.executable, "jobs/distill.py", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace")
        pytest.fail(f"the job ran past {timeout}s; its output:\n{out[-4000:]}")


def test_the_job_scales_both_groups_up_from_zero_and_says_where_it_ran(autoscaling,
                                                                        smoke_data, tmp_path):
    out = str(tmp_path / "run")
    res = _job(autoscaling, job_args(smoke_data, out, "--set", "ray.gpus_per_task=1",
                                     "--set", "ray.node_wait_seconds=300"))
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]
    assert "waiting for" in text or "group (gpu_group) is up" in text, text[-3000:]
    manifest = storage.read_json(os.path.join(out, "manifest.json"))
    report = json.load(open(os.path.join(out, publish.VERSIONS, manifest["version"],
                                         "report.json")))
    devices = report["devices"]
    # no faiss-gpu and a CPU torch here: every stage says it ran on the CPU, and with what
    for stage in ("init", "teacher", "encode"):
        assert devices[stage].startswith("cpu; faiss-cpu "), devices
    assert devices["train"].startswith("cpu; torch "), devices
    assert manifest["devices"] == devices
    # the nodes' faiss decides where k-means and encode run: the driver warns nothing
    assert "faiss has no GPU support" not in text and "no node of the GPU group" not in text


def test_a_group_no_node_type_offers_fails_at_once(autoscaling, smoke_data, tmp_path):
    """Autoscaler v2 answers a request that no node type can satisfy as infeasible, and the
    job refuses it at once (exit 2, naming the setting). Should the autoscaler's report not
    come (it lagged once under the full suite's load), the job still ends with exit 2 naming
    the group after ray.node_wait_seconds."""
    res = _job(autoscaling, job_args(smoke_data, str(tmp_path / "run"), "--set",
                                     "ray.gpu_group=no_such_group",
                                     "--set", "ray.node_wait_seconds=60"), timeout=300)
    assert res.returncode == 2, (res.stdout + res.stderr)[-3000:]
    assert "ray.gpu_group" in res.stderr and "'no_such_group'" in res.stderr, res.stderr[-2000:]
    # the autoscaler's verdict within seconds of the ask (Python, Ray and the preflight start
    # before it, slowly on a loaded machine), not the configured wait
    asked = re.search(r"the autoscaler's answer (\d+)s after the job asked", res.stderr)
    assert asked or "waited" in res.stderr, res.stderr[-2000:]
    if asked:
        assert int(asked.group(1)) < 30, res.stderr[-2000:]


def test_an_infeasible_report_is_read_for_this_request_only(monkeypatch):
    """What the job reads from autoscaler v2's state: a constraint reported infeasible counts
    for the very bundles asked, not for an earlier request's."""
    from ray.core.generated import autoscaler_pb2

    from pipeline.distributed import autoscale

    state = autoscaler_pb2.AutoscalingState(autoscaler_state_version=3)
    constraint = state.infeasible_cluster_resource_constraints.add()
    for bundle in ({"CPU": 1, "nosuch": 0.001}, {"CPU": 1, "cpu_group": 0.001}):
        request = constraint.resource_requests.add(count=1).request
        request.resources_bundle.update(bundle)
    monkeypatch.setattr(autoscale, "_v2_state", lambda: state)
    both = [{"CPU": 1, "nosuch": 0.001}, {"CPU": 1, "cpu_group": 0.001}]
    assert autoscale.infeasible(both)
    assert not autoscale.infeasible(both[:1])  # a report of the pair says nothing of one
    monkeypatch.setattr(autoscale, "_v2_state", lambda: None)  # v1, or no report yet
    assert not autoscale.infeasible(both)


def test_without_an_autoscaler_a_missing_group_fails_at_once(ray_cluster):
    """The session's cluster has no autoscaler: nothing could start a node of a group that no
    alive node offers, so the job does not wait for one."""
    from pipeline.config import RayConfig
    from pipeline.distributed import autoscale

    assert not autoscale.autoscaler_runs()
    t0 = time.time()
    with pytest.raises(ValueError, match=r"ray.cpu_group: .*no autoscaler runs.*'elsewhere'"):
        autoscale.ensure_groups(RayConfig(gpu_group="gpu_group", cpu_group="elsewhere"))
    assert time.time() - t0 < 5
    assert autoscale.ensure_groups(RayConfig(gpu_group="gpu_group", cpu_group="cpu_group")) == {}
