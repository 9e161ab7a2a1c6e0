"""`ray job submit` against a Ray head on 127.0.0.1, exactly as the README shows it."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from infra.local_s3 import free_port

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def head(tmp_path):
    if not os.path.exists(RAY):
        pytest.skip("the ray CLI is not installed beside this python")
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    # --block keeps the head's processes tied to this one, so the teardown stops this head
    # only (`ray stop` would also stop the test session's own cluster).
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         "--disable-usage-stats"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    for _ in range(60):
        if subprocess.run([RAY, "job", "list", "--address", address],
                          capture_output=True).returncode == 0:
            break
        time.sleep(2)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_submit_smoke_job(head, smoke_data, tmp_path):
    out = str(tmp_path / "run")
    cmd = [RAY, "job", "submit", "--address", head, "--working-dir", ".",
           "--runtime-env", "infra/runtime_env.yaml", "--no-wait", "--",
           "python", "jobs/distill.py", "--config", "jobs/configs/smoke.yaml", "--output", out,
           "--set", f"data.corpus={smoke_data}/corpus",
           "--set", f"data.train_queries={smoke_data}/train_queries",
           "--set", f"data.eval_queries={smoke_data}/eval_queries",
           "--set", f"data.labels={smoke_data}/labels", "--set", "train.epochs=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr + res.stdout
    job_id = next(w for line in res.stdout.splitlines() for w in line.split()
                  if w.startswith("raysubmit_")).strip("'")
    status = ""
    for _ in range(120):  # bounded: at most 6 minutes
        status = subprocess.run([RAY, "job", "status", "--address", head, job_id],
                                capture_output=True, text=True).stdout
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run([RAY, "job", "logs", "--address", head, job_id],
                          capture_output=True, text=True).stdout
    assert "SUCCEEDED" in status, logs[-3000:]
    assert "distilled-ivf-opq" in logs and "total wall time" in logs
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["counts"]["vectors"] == 4000
    assert os.path.getsize(os.path.join(out, "index", "index.ivfdata")) > 0
    shutil.rmtree(out)
