"""GPUs asked for where the cluster has them, with a CPU build of torch and faiss-cpu: every
stage is scheduled (the GPU group's node offers a logical GPU), falls back to the CPU and says
so, and the job finishes. Training on GPUs with a CPU-only torch is refused at the boundary."""
import pytest

from jobs import distill
from pipeline import publish

from .test_bad_input import good, run_job
from .test_e2e import job_args


@pytest.mark.slow
def test_gpu_tasks_are_placed_where_gpus_are_and_fall_back_to_the_cpu(ray_cluster, smoke_data,
                                                                      tmp_path, caplog):
    out = str(tmp_path / "run")
    with caplog.at_level("INFO", logger="pipeline"):
        assert distill.main(job_args(smoke_data, out, "--set", "ray.gpus_per_task=1")) == 0
    for stage in ("init", "encode"):
        assert f"{stage}: ray.gpus_per_task=1.0 but this faiss has no GPU support" in \
            caplog.text, caplog.text[-3000:]
    assert publish.resolve(out)["counts"]["vectors"] == 4000


def test_training_on_gpus_needs_a_cuda_torch(tmp_path, capsys):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    corpus, _ = good(tmp_path)
    err = run_job(capsys, corpus, str(tmp_path / "o"), "--set", "ray.train_gpu=true")
    assert "ray.train_gpu=true needs a CUDA build of torch" in err
