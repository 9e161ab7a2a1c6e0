"""`ray job submit` against a Ray head on 127.0.0.1, as the README shows it."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from infra.local_cluster import stop_node_process
from infra.local_s3 import free_port

from .conftest import published

pytestmark = pytest.mark.slow

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ray_cli(*args, env, timeout=120) -> subprocess.CompletedProcess:
    res = subprocess.run([RAY, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=timeout)
    res.stdout, res.stderr = ANSI.sub("", res.stdout), ANSI.sub("", res.stderr)
    return res


@pytest.fixture
def head():
    if not os.path.exists(RAY):
        pytest.skip("the ray CLI is not installed beside this python")
    port, dash = free_port(), free_port()
    # Every port of its own: the test session's cluster already holds the default agent ports,
    # and an agent that cannot bind leaves the head answering "No available agent" forever.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    # Ray 2.60 turns token auth on once ~/.ray/auth_token exists; the CLI then has to be told
    # (README). Saying it for the head and every CLI call works whether or not the file exists.
    # The entrypoint's `python` is the one on the head's PATH: this venv's, as after
    # `source .venv/bin/activate` in the README.
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    # --block ties the head's processes to this one, so teardown stops this head only
    # (`ray stop` would also stop the test session's own cluster).
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         "--disable-usage-stats", *ports], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.time()
        for _ in range(60):
            if ray_cli("job", "list", "--address", address, env=env).returncode == 0:
                break
            time.sleep(2)
        print(f"head up after {time.time() - t0:.0f}s")
        yield address, env
    finally:
        # The head's whole process group; a graceful stop takes half a minute, and nothing
        # of this head outlives the test either way.
        stop_node_process(proc, grace_s=5)


def submit(address: str, env: dict, cmd: list[str]) -> str:
    """Submits with --no-wait; retries while the job agent is not up yet. Returns the job id."""
    for _ in range(30):
        res = ray_cli("job", "submit", "--address", address, "--working-dir", ".",
                      "--runtime-env", "infra/runtime_env.yaml", "--no-wait", "--", *cmd, env=env)
        if res.returncode == 0:
            return re.search(r"raysubmit_\w+", res.stdout).group(0)
        if "No available agent" not in res.stdout + res.stderr:
            raise AssertionError(res.stdout + res.stderr)
        time.sleep(2)
    raise AssertionError("the job agent never came up: " + res.stdout + res.stderr)


def test_submit_smoke_job(head, smoke_data, tmp_path):
    address, env = head
    out = str(tmp_path / "run")
    job_id = submit(address, env, [
        "python", "jobs/distill.py", "--config", "smoke", "--output", out,
        "--set", f"data.corpus={smoke_data}/corpus",
        "--set", f"data.train_queries={smoke_data}/train_queries",
        "--set", f"eval.queries={smoke_data}/eval_queries",
        "--set", f"eval.labels={smoke_data}/labels", "--set", "train.epochs=1",
        "--set", "ray.train_workers=1"])
    print(f"submitted {job_id}")
    status = ""
    for _ in range(120):  # bounded: at most 6 minutes
        res = ray_cli("job", "status", "--address", address, job_id, env=env)
        status = (res.stdout + res.stderr).lower()  # "Job '...' succeeded", on stderr
        if any(f"' {s}" in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = ray_cli("job", "logs", "--address", address, job_id, env=env).stdout
    assert "' succeeded" in status, status + logs[-3000:]
    assert "distilled-ivf-opq" in logs and "total wall time" in logs
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["counts"]["vectors"] == 4000
    assert os.path.getsize(os.path.join(out, manifest["ivfdata"])) > 0
    assert os.path.exists(published(out, "report.html"))
    shutil.rmtree(out)
