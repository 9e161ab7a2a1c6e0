"""Training on GPUs with a CPU-only torch is refused at the boundary, and every task that holds
data asks Ray for the memory it needs. (GPUs asked for where a logical GPU is, with faiss-cpu
and a CPU torch: tests/test_autoscaling.py, whose job places every stage, falls back to the
CPU and records where each stage ran.)"""
import json
import os

import pytest

from .test_bad_input import good, run_job
from .test_e2e import job_args


def test_training_on_gpus_needs_a_cuda_torch(tmp_path, capsys):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    corpus, _ = good(tmp_path)
    err = run_job(capsys, corpus, str(tmp_path / "o"), "--set", "ray.train_gpu=true")
    assert "ray.train_gpu=true needs a CUDA build of torch" in err


def test_tasks_that_hold_data_declare_their_memory(smoke_data, tmp_path):
    """A job on a cluster of its own, its tasks' starts logged by the test watcher of
    pipeline.events (tests/fault_hooks.py): the sample join, k-means, the teacher's search
    workers, the export, encode, the part writers, the evaluation's searches and scoring each
    ran with a Ray `memory` resource of at least BASE_MEMORY, and the search workers, encode
    and part tasks with more (their data)."""
    from pipeline.distributed.placement import BASE_MEMORY

    from . import fault_hooks
    from .test_faults import start_job

    logs = tmp_path / "tasks"
    logs.mkdir()
    proc = start_job(job_args(smoke_data, str(tmp_path / "run"), "--set",
                              "build.output_parts=2", groups=False), tmp_path / "log",
                     {"IVF_DISTILL_HOOKS": fault_hooks.HOOKS, "IVF_DISTILL_TASK_LOG": str(logs),
                      "RAY_ADDRESS": ""})
    assert proc.wait(timeout=600) == 0, open(tmp_path / "log").read()[-4000:]
    seen = {}
    for name in os.listdir(logs):
        for line in open(logs / name):
            task = json.loads(line)
            seen.setdefault(task["name"], []).append(task["resources"].get("memory", 0))
    holders = {"_join_sample", "_train_baseline", "_encode_shard", "_write_part",
               "_search_part", "_score"}
    assert holders <= set(seen), sorted(seen)
    for name in holders:
        assert min(seen[name]) >= BASE_MEMORY, (name, seen[name])
    for name in ("_Searcher.search", "_encode_shard", "_write_part"):
        assert min(seen[name]) > BASE_MEMORY, (name, seen[name])
    assert len(seen["_write_part"]) == 4  # two parts of each of two indexes
