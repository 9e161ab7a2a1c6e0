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
    scratch = scratch or tempfile.mkdtemp(prefix="vq-cluster-")
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
    scratch = scratch or getattr(cluster, "scratch", None) or tempfile.mkdtemp(prefix="vq-")
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
    env = {**os.environ, "TMPDIR": _scratch(scratch or tempfile.mkdtemp(prefix="vq-"), name)}
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
