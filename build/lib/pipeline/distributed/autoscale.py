"""Node groups that start at zero: asking an autoscaler for them and waiting, with a bound.

A configured group (ray.gpu_group / ray.cpu_group) that no alive node offers is not an error
where an autoscaler runs: the job asks it for one node of the group
(`ray.autoscaler.sdk.request_resources`), prints how the wait goes, and fails (exit 2, naming
the group) only when the autoscaler says no node type offers the group (autoscaler v2 reports
such a request as infeasible) or after ray.node_wait_seconds. Without an autoscaler nothing
could start the node: that fails at once. The request is withdrawn once the nodes are up; the
stages' own tasks then hold the demand.
"""
from __future__ import annotations

import logging
import time

import ray

from pipeline.config import RayConfig
from pipeline.distributed.placement import (
    GROUP_SHARE,
    Group,
    group_nodes,
    group_resource,
    remember,
)
from pipeline.errors import InputError

log = logging.getLogger("ivf_distill.distributed.autoscale")

# How often the wait looks at the cluster, and how often it says so.
POLL_S, REPORT_S = 1.0, 10.0


def _v2_state():
    """Autoscaler v2's last report (an AutoscalingState), or None where none came."""
    try:
        from ray._raylet import GcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        reply = GetClusterStatusReply()
        reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address)
                              .get_cluster_status())
        state = reply.autoscaling_state
        return state if state.autoscaler_state_version > 0 else None
    except Exception:  # noqa: BLE001 - an older or newer Ray without this call: no v2 report
        return None


def autoscaler_runs() -> bool:
    """Whether an autoscaler can add nodes to this cluster. Every head runs a monitor that
    leaves a status in the GCS's key-value store. On a cluster of fixed nodes (`ray start`,
    a local cluster) its provider is read-only and names each node's type after the node
    ("node_<id>"); an autoscaler from a cluster config names the config's types. v2 reports
    its state instead."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    try:
        status = _internal_kv_get("__autoscaling_status")
        report = json.loads(status).get("autoscaler_report") if status else None
        types = (report or {}).get("node_type_mapping") or {}
        if any(t != f"node_{node}" for node, t in types.items()):
            return True
    except Exception:  # noqa: BLE001 - no key-value store reachable, or no JSON: ask v2
        pass
    return _v2_state() is not None


def infeasible(bundles: list[dict]) -> bool:
    """Whether autoscaler v2 reports the standing request for `bundles` as one that no node
    type can satisfy (False where it cannot tell: v1, or no report yet)."""
    state = _v2_state()
    if state is None:
        return False
    # A report of an earlier request (another set of bundles) says nothing of this one.
    want = sorted(_key(b) for b in bundles)
    return any(sorted(_key(r.request.resources_bundle) for r in c.resource_requests) == want
               for c in state.infeasible_cluster_resource_constraints)


def _key(bundle) -> tuple:
    return tuple(sorted((k, round(float(v), 9)) for k, v in dict(bundle).items()))


def _bundle(cfg: RayConfig, group: Group) -> dict:
    return {"CPU": 1, group_resource(cfg, group): GROUP_SHARE}


def _up(cfg: RayConfig, group: Group) -> bool:
    return any(n["Resources"].get("CPU", 0) > 0 for n in group_nodes(cfg, group))


def _offered() -> str:
    names = sorted({r for n in ray.nodes() if n.get("Alive") for r in n["Resources"]
                    if r not in ("CPU", "GPU", "memory", "object_store_memory")
                    and not r.startswith("node:")})
    return ", ".join(names) or "none"


def _refuse(cfg: RayConfig, group: Group, why: str) -> InputError:
    name = group_resource(cfg, group)
    return InputError(f"ray.{group.value}_group: {why} the resource {name!r} (custom "
                      f"resources of the alive nodes: {_offered()}). Give a node type it in "
                      "its `resources` (infra/cluster-aws.yaml), or leave the setting empty.")


def ensure_groups(cfg: RayConfig, wait_s: float | None = None) -> dict:
    """Returns once every configured group has an alive node with CPUs: at once where they
    are up, after asking the autoscaler and waiting where they can be started. Raises
    ValueError (exit 2) naming the group where none can be. Returns {group: seconds waited}."""
    wait_s = cfg.node_wait_seconds if wait_s is None else wait_s
    missing = [g for g in Group if group_resource(cfg, g) and not _up(cfg, g)]
    if not missing:
        return {}
    if not autoscaler_runs():
        raise _refuse(cfg, missing[0], "no alive node with CPUs offers, and no autoscaler runs "
                      "that could start one that offers,")
    from ray.autoscaler.sdk import request_resources

    t0 = last = time.time()
    waited: dict = {}
    request_resources(bundles=[_bundle(cfg, g) for g in missing])
    try:
        while True:
            now = time.time()
            for g in [g for g in missing if g not in waited and _up(cfg, g)]:
                waited[g] = now - t0
                log.info("the %s group (%s) is up after %.0fs", g.value,
                         group_resource(cfg, g), waited[g])
            pending = [g for g in missing if g not in waited]
            if not pending:
                for g in Group:
                    remember(cfg, g)
                return {g.value: s for g, s in waited.items()}
            if infeasible([_bundle(cfg, g) for g in pending]):
                raise _refuse(cfg, _which_infeasible(cfg, pending), "the autoscaler's answer "
                              f"{now - t0:.0f}s after the job asked: no node type offers")
            if now - t0 > wait_s:
                raise _refuse(cfg, pending[0], f"waited {now - t0:.0f}s (ray.node_wait_seconds) "
                              "for the autoscaler to start a node that offers")
            if now - last >= REPORT_S:
                last = now
                log.info("waiting for %s: %.0fs of at most %.0fs (ray.node_wait_seconds)",
                         ", ".join(f"the {g.value} group ({group_resource(cfg, g)}): "
                                   f"{len(group_nodes(cfg, g))}/1 nodes" for g in pending),
                         now - t0, wait_s)
            time.sleep(POLL_S)
    finally:
        request_resources(bundles=[])


def _which_infeasible(cfg: RayConfig, pending: list[Group]) -> Group:
    """The group of `pending` that no node type offers, asked one at a time (the autoscaler
    judges a standing request as a whole)."""
    from ray.autoscaler.sdk import request_resources

    if len(pending) == 1:
        return pending[0]
    for g in pending:
        request_resources(bundles=[_bundle(cfg, g)])
        deadline = time.time() + 30
        while time.time() < deadline:
            if infeasible([_bundle(cfg, g)]):
                return g
            if _up(cfg, g):
                break
            time.sleep(POLL_S)
    return pending[0]
