"""A multi-node Ray cluster on this machine, shaped like infra/cluster-aws.yaml, for tests,
benchmarks and demos.

  python infra/local_cluster.py --nodes 3 -- python jobs/distill.py --config ... \\
      --set ray.gpu_group=gpu_group --set ray.cpu_group=cpu_group

starts a head with no CPUs (it runs only the driver, as on AWS) and N worker nodes, each its own
raylet with its own object store and its own scratch directory (TMPDIR), runs the command with
RAY_ADDRESS pointing at the head, then stops the cluster. The first half of the workers (at least
one) offer the custom resource `gpu_group` (teacher and training, the p5 nodes of the YAML), the
rest `cpu_group` (ingest, init, encode, merge, evaluate: the c6id nodes).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

GPU_GROUP, CPU_GROUP = "gpu_group", "cpu_group"
# A node offers this much of its group's resource; a task asks for GROUP_SHARE (see
# pipeline.distributed.placement.placement), so the resource only steers placement and the CPUs
# still bound concurrency.
GROUP_CAPACITY = 1000


def start(nodes: int = 3, cpus_per_node: int = 2, gpu_nodes: int = 0,
          object_store_mb: int = 256, scratch: str | None = None, connect: bool = True,
          env: dict | None = None, gpus_per_gpu_node: int = 0):
    """Starts the cluster (and ray.init's this process into it when `connect`). Returns the
    ray.cluster_utils.Cluster; `cluster.address` is what RAY_ADDRESS takes. `env` adds
    environment variables to every node's processes. `gpus_per_gpu_node` gives the GPU group's
    nodes that many logical GPUs (Ray schedules on them; no device is behind them)."""
    import ray
    from ray.cluster_utils import Cluster

    if nodes < 2:
        raise ValueError("--nodes: give at least 2 worker nodes (a GPU-group and a CPU-group one)")
    scratch = scratch or tempfile.mkdtemp(prefix="ivf-distill-cluster-")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": object_store_mb << 20,
        "include_dashboard": False,
        "env_vars": {"TMPDIR": _scratch(scratch, "head"), **(env or {})}})
    gpu_nodes = gpu_nodes or max(1, nodes // 2)
    for i in range(nodes):
        add_worker(cluster, GPU_GROUP if i < gpu_nodes else CPU_GROUP, cpus_per_node,
                   object_store_mb, scratch, env, gpus_per_gpu_node if i < gpu_nodes else 0)
    cluster.wait_for_nodes()
    cluster.scratch = scratch
    if connect:
        ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def add_worker(cluster, group: str, cpus: int = 2, object_store_mb: int = 256,
               scratch: str | None = None, env: dict | None = None, gpus: int = 0):
    """One more worker node offering the custom resource `group` (the node-loss tests add
    nodes of a group of their own, and replacements). Its tasks' temporary files go under its
    own scratch directory; `env` adds environment variables to its processes."""
    scratch = (scratch or getattr(cluster, "scratch", None)
               or tempfile.mkdtemp(prefix="ivf-distill-"))
    name = f"{group}-{len(cluster.worker_nodes)}"
    return cluster.add_node(num_cpus=cpus, num_gpus=gpus, resources={group: GROUP_CAPACITY},
                            object_store_memory=object_store_mb << 20,
                            env_vars={"TMPDIR": _scratch(scratch, name), **(env or {})})


def node_process(address: str, group: str, cpus: int = 2, object_store_mb: int = 256,
                 scratch: str | None = None) -> subprocess.Popen:
    """A worker node offering `group`, started by `ray start --block` in a process group of
    its own: unlike Cluster.add_node this works from any thread (the node-loss tests add a
    replacement from a watcher thread). Stop it with stop_node_process."""
    from infra.local_s3 import free_port

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    name = f"{group}-proc-{free_port()}"
    scratch = scratch or tempfile.mkdtemp(prefix="ivf-distill-")
    env = {**os.environ, "TMPDIR": _scratch(scratch, name)}
    # Ports of its own: the agents' defaults are taken by the other nodes on this machine.
    ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port")]
    return subprocess.Popen(
        [ray_cli, "start", "--block", f"--address={address}", f"--num-cpus={cpus}",
         f"--resources={{\"{group}\": {GROUP_CAPACITY}}}", "--node-ip-address=127.0.0.1",
         f"--object-store-memory={object_store_mb << 20}", "--disable-usage-stats", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_node_process(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Stops a `ray start --block` process and everything of its node (its process group): a
    graceful stop first, then SIGKILL."""
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# Ray's wheel ships the fake multi-node provider without the defaults file that autoscaler v2
# fills a cluster config from; this is the part of it the provider reads.
FAKE_PROVIDER_DEFAULTS = {
    "cluster_name": "fake_multinode", "max_workers": 8, "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5, "docker": {}, "auth": {"ssh_user": "ubuntu"},
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "available_node_types": {"ray.head.default": {"resources": {}, "node_config": {},
                                                  "max_workers": 0}},
    "head_node_type": "ray.head.default", "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                       "worker_setup_commands", "head_start_ray_commands",
                       "worker_start_ray_commands")}}


def aws_shaped_node_types(cpus: int = 2, gpus: int = 1, max_workers: int = 1) -> dict:
    """infra/cluster-aws.yaml's worker groups, small: the same custom resources and
    min_workers, `cpus` CPUs a node, `gpus` logical GPUs on the GPU group's nodes."""
    import yaml

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cluster-aws.yaml")) as f:
        aws = yaml.safe_load(f)
    types = {}
    for name, t in aws["available_node_types"].items():
        if name == aws["head_node_type"]:
            continue
        resources = {"CPU": cpus, **t["resources"]}
        if GPU_GROUP in t["resources"]:
            resources["GPU"] = gpus
        types[name] = {"resources": resources, "node_config": {},
                       "min_workers": t.get("min_workers", 0),
                       "max_workers": min(t.get("max_workers", 1), max_workers)}
    return types


class AutoscalingCluster:
    """A head with no CPUs and an autoscaler (v2, Ray's fake multi-node provider) that starts
    worker nodes on this machine as tasks ask for them, from `node_types` (a cluster YAML's
    available_node_types, minus the head). Unlike ray.cluster_utils.AutoscalingCluster it never
    runs `ray stop`: it stops only its own processes (its head's process group, and the nodes
    that run in its temp dir), so it can run beside another cluster on the same machine.
    `address` is the GCS address RAY_ADDRESS takes; `env` the environment a job needs."""

    def __init__(self, node_types: dict, idle_timeout_minutes: float = 5):
        import json
        import time

        from ray.autoscaler._private.fake_multi_node import node_provider

        from infra.local_s3 import free_port

        defaults = os.path.join(os.path.dirname(node_provider.__file__), "example.yaml")
        if not os.path.exists(defaults):
            with open(defaults, "w") as f:
                json.dump(FAKE_PROVIDER_DEFAULTS, f)  # JSON is YAML
        self.temp_dir = tempfile.mkdtemp(prefix="ivf-distill-as-")
        port = free_port()
        head_id = node_provider.FAKE_HEAD_NODE_ID
        config = {**FAKE_PROVIDER_DEFAULTS, "idle_timeout_minutes": idle_timeout_minutes,
                  "max_workers": sum(t["max_workers"] for t in node_types.values()),
                  "provider": {**FAKE_PROVIDER_DEFAULTS["provider"], "launch_multiple": True,
                               "head_node_id": head_id, "gcs_address": f"127.0.0.1:{port}"},
                  "available_node_types": {**FAKE_PROVIDER_DEFAULTS["available_node_types"],
                                           **node_types}}
        path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(path, "w") as f:
            json.dump(config, f)
        self.env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token",
                    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": head_id,
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": head_id}
        ports = [f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "ray-client-server-port")]
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        self.log = os.path.join(self.temp_dir, "head.log")
        with open(self.log, "w") as out:
            self.head = subprocess.Popen(
                [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
                 "--node-ip-address=127.0.0.1", f"--autoscaling-config={path}",
                 "--include-dashboard=false", "--disable-usage-stats",
                 f"--temp-dir={self.temp_dir}", *ports],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.address = self.env["RAY_ADDRESS"]
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.head.poll() is not None:
                raise RuntimeError(f"the autoscaling head stopped: {open(self.log).read()[-3000:]}")
            if "--block" in open(self.log).read() and _gcs_answers(self.address):
                return
            time.sleep(1)
        raise RuntimeError("the autoscaling head did not come up in 120 s")

    def stop(self) -> None:
        try:
            stop_node_process(self.head, grace_s=3)
        except ProcessLookupError:
            pass
        # The nodes the autoscaler started run in the head's temp dir, outside its group.
        subprocess.run(["pkill", "-KILL", "-f", self.temp_dir], check=False)


def _gcs_answers(address: str) -> bool:
    import socket

    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def _scratch(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3, help="worker nodes (the head has no CPUs)")
    ap.add_argument("--cpus-per-node", type=int, default=2)
    ap.add_argument("--object-store-mb", type=int, default=256)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- command to run")
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give a command after --")
    cluster = start(args.nodes, args.cpus_per_node, object_store_mb=args.object_store_mb,
                    connect=False)
    print(f"local Ray cluster: head {cluster.address} (no CPUs), {args.nodes} worker nodes, "
          f"scratch {cluster.scratch}", flush=True)
    try:
        return subprocess.call(cmd, env={**os.environ, "RAY_ADDRESS": cluster.address})
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
