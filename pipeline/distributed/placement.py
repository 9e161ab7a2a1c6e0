"""Where tasks go: node groups told apart by custom resources (ray.gpu_group / ray.cpu_group),
and the checks that a group can run anything at all."""
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


def check_groups(cfg: RayConfig) -> None:
    """Fails at once, naming the setting, when a configured group has no node with CPUs (its
    tasks would wait forever)."""
    for group in Group:
        name = group_resource(cfg, group)
        if name and not any(n["Resources"].get("CPU", 0) > 0 for n in group_nodes(cfg, group)):
            offered = sorted({r for n in ray.nodes() if n.get("Alive") for r in n["Resources"]
                              if r not in ("CPU", "GPU", "memory", "object_store_memory")
                              and not r.startswith("node:")})
            raise ValueError(f"ray.{group.value}_group: no alive node with CPUs offers the "
                             f"resource {name!r} (custom resources offered: "
                             f"{', '.join(offered) or 'none'}). Give the nodes it in their "
                             "`resources` (infra/cluster-aws.yaml), or leave it empty.")


def largest_node_cpus(cfg: RayConfig, group: Group) -> int:
    """The most CPUs one alive node of `group` offers. A task asking for more (the cluster's
    total, on several nodes) could never be placed, and the job would wait forever."""
    cpus = [int(n["Resources"].get("CPU", 0)) for n in group_nodes(cfg, group)]
    return max(cpus + [1])


def largest_node_gpus(cfg: RayConfig, group: Group) -> int:
    """The most GPUs one alive node of `group` offers (0 without GPUs)."""
    return max([int(n["Resources"].get("GPU", 0)) for n in group_nodes(cfg, group)] + [0])


def largest_node_memory(cfg: RayConfig, group: Group) -> int:
    """The most memory (bytes, Ray's `memory` resource: what tasks may use) one alive node of
    `group` offers."""
    return max([int(n["Resources"].get("memory", 0)) for n in group_nodes(cfg, group)] + [0])


# The least a task declares: an interpreter with faiss, torch and numpy loaded.
BASE_MEMORY = 256 << 20


def memory(cfg: RayConfig, group: Group, nbytes: float) -> int:
    """Ray's `memory` for a task of `group` whose data takes about `nbytes`: BASE_MEMORY more,
    and never more than the largest node of the group offers (such a task would never run;
    it runs there and may spill or fail as it would without the declaration)."""
    need = int(BASE_MEMORY + max(nbytes, 0))
    most = largest_node_memory(cfg, group)
    return min(need, most) if most else need
