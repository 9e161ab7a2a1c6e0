"""Where tasks go: node groups told apart by custom resources (ray.gpu_group / ray.cpu_group),
and the size of a group's nodes (pipeline.distributed.autoscale waits for groups at zero)."""
from __future__ import annotations

from enum import Enum

import ray

from pipeline.config import RayConfig


class Group(str, Enum):
    """The node group a task runs in (ray.gpu_group / ray.cpu_group name their resources)."""
    GPU = "gpu"  # teacher, training
    CPU = "cpu"  # ingest, init, encode, merge, evaluate


# What one task asks of its group's custom resource: enough to be placed only on the group's
# nodes, too little to limit how many run there (the CPUs do that).
GROUP_SHARE = 0.001


def group_resource(cfg: RayConfig, group: Group) -> str:
    return cfg.gpu_group if group is Group.GPU else cfg.cpu_group


def placement(cfg: RayConfig, group: Group) -> dict:
    """The custom resources a task of `group` asks for ({} when no group is configured)."""
    name = group_resource(cfg, group)
    return {name: GROUP_SHARE} if name else {}


def group_nodes(cfg: RayConfig, group: Group) -> list[dict]:
    """The alive nodes a task of `group` may land on."""
    name = group_resource(cfg, group)
    return [n for n in ray.nodes() if n.get("Alive") and (not name or name in n["Resources"])]


# The largest node seen per group resource ({resource: {"CPU", "GPU", "memory"}}): a group
# that an autoscaler scaled down between stages keeps the shape its nodes had, so a stage is
# sized by the group's nodes, not by which of them happen to be up when it starts.
_seen: dict[str, dict] = {}


def remember(cfg: RayConfig, group: Group) -> dict:
    """The largest node of `group` seen so far, counting the alive ones now."""
    seen = _seen.setdefault(group_resource(cfg, group), {})
    for n in group_nodes(cfg, group):
        for key in ("CPU", "GPU", "memory"):
            seen[key] = max(seen.get(key, 0), int(n["Resources"].get(key, 0)))
    return seen


def _largest(cfg: RayConfig, group: Group, key: str) -> int:
    return remember(cfg, group).get(key, 0)


def largest_node_cpus(cfg: RayConfig, group: Group) -> int:
    """The most CPUs one node of `group` offers (alive now or seen before). A task asking for
    more (the cluster's total, on several nodes) could never be placed."""
    return max(_largest(cfg, group, "CPU"), 1)


def largest_node_gpus(cfg: RayConfig, group: Group) -> int:
    """The most GPUs one node of `group` offers (0 without GPUs)."""
    return _largest(cfg, group, "GPU")


def largest_node_memory(cfg: RayConfig, group: Group) -> int:
    """The most memory (bytes, Ray's `memory` resource: what tasks may use) one node of
    `group` offers."""
    return _largest(cfg, group, "memory")


# The least a task declares: an interpreter with faiss, torch and numpy loaded.
BASE_MEMORY = 256 << 20


def memory(cfg: RayConfig, group: Group, nbytes: float) -> int:
    """Ray's `memory` for a task of `group` whose data takes about `nbytes`: BASE_MEMORY more,
    and never more than the largest node of the group offers (such a task would never run;
    it runs there and may spill or fail as it would without the declaration)."""
    need = int(BASE_MEMORY + max(nbytes, 0))
    most = largest_node_memory(cfg, group)
    return min(need, most) if most else need
