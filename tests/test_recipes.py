"""The shipped recipes (infra/cluster-aws.yaml, infra/rayjob.yaml, infra/Dockerfile, the
cluster commands in README.md and docs/cluster.md) against the code: every key they set
exists, the group resources they name are the ones the commands place tasks by, and the
groups start at zero as the autoscaling test runs them."""
import os
import re
import shlex

import yaml

from pipeline.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _sets(command: str) -> dict:
    words = shlex.split(command.replace("\\\n", " "))
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--set")


def _commands(markdown: str) -> list[str]:
    """The shell commands of a markdown file's code blocks that run jobs/distill.py."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, re.S)
    cmds = []
    for block in blocks:
        for cmd in re.split(r"(?<!\\)\n", block):
            if "jobs/distill.py" in cmd and "--set" in cmd:
                cmds.append(re.sub(r"#.*", "", cmd))
    return cmds


def _rayjob():
    return {d["kind"]: d for d in yaml.safe_load_all(_read("infra", "rayjob.yaml"))}


def _group_resources(resources_by_group: dict) -> set:
    return {r for rs in resources_by_group.values() for r in rs if r.endswith("_group")}


def test_every_set_key_in_the_recipes_exists_and_loads():
    commands = [_rayjob()["RayJob"]["spec"]["entrypoint"]]
    commands += _commands(_read("README.md")) + _commands(_read("docs", "cluster.md"))
    assert len(commands) >= 3
    for cmd in commands:
        sets = _sets(cmd)
        assert sets, cmd
        load_config(None, ["data.corpus=s3://b/c"] + [f"{k}={v}" for k, v in sets.items()])


def test_the_rayjob_config_map_is_a_valid_config(tmp_path):
    job = _rayjob()
    path = tmp_path / "job.yaml"
    path.write_text(job["ConfigMap"]["data"]["job.yaml"])
    load_config(str(path))
    entry = job["RayJob"]["spec"]["entrypoint"]
    assert "--config /config/job.yaml" in entry
    head = job["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "config", "mountPath": "/config"} in head["containers"][0]["volumeMounts"]
    assert head["volumes"][0]["configMap"]["name"] == job["ConfigMap"]["metadata"]["name"]


def test_the_rayjob_autoscales_groups_from_zero_with_what_gpus_need():
    job = _rayjob()
    spec = job["RayJob"]["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    sets = _sets(spec["entrypoint"])
    assert float(sets["ray.gpus_per_task"]) > 0 and sets["ray.train_gpu"] == "true"
    accounts = {job["ServiceAccount"]["metadata"]["name"]}
    resources = {}
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] == 0 and g["replicas"] == 0, g["groupName"]
        resources[g["groupName"]] = yaml.safe_load(g["rayStartParams"]["resources"])
        if isinstance(resources[g["groupName"]], str):
            resources[g["groupName"]] = yaml.safe_load(resources[g["groupName"]])
        pod = g["template"]["spec"]
        assert pod["serviceAccountName"] in accounts
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert shm and mounts[shm[0]["name"]] == "/dev/shm", g["groupName"]
    assert cluster["headGroupSpec"]["template"]["spec"]["serviceAccountName"] in accounts
    assert {sets["ray.gpu_group"], sets["ray.cpu_group"]} == _group_resources(resources)
    gpu_group = next(n for n, r in resources.items() if sets["ray.gpu_group"] in r)
    limits = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == gpu_group)[
        "template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= float(sets["ray.gpus_per_task"])


def test_the_aws_cluster_and_the_commands_name_the_same_groups():
    aws = yaml.safe_load(_read("infra", "cluster-aws.yaml"))
    types = aws["available_node_types"]
    head = types.pop(aws["head_node_type"])
    assert head["resources"].get("CPU") == 0
    assert all(t["min_workers"] == 0 for t in types.values())
    offered = _group_resources({n: t["resources"] for n, t in types.items()})
    for cmd in _commands(_read("README.md")) + _commands(_read("docs", "cluster.md")):
        sets = _sets(cmd)
        named = {v for k, v in sets.items() if k in ("ray.gpu_group", "ray.cpu_group")}
        assert named <= offered, (cmd, offered)


def test_the_image_takes_one_cuda_major_and_one_faiss():
    docker = _read("infra", "Dockerfile")
    assert "whl/cu126" in docker and "faiss" in docker
    pyproject = _read("pyproject.toml")
    gpu = re.search(r'^gpu = \[(.*)\]', pyproject, re.M).group(1)
    assert "cu12" in gpu and "faiss-cpu" not in gpu
    deps = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.M | re.S).group(1)
    assert "faiss" not in deps, "faiss comes with the [cpu] or [gpu] extra, never both"
    assert '".[gpu]"' in docker
