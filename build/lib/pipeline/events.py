"""Named points in the pipeline's work that code outside it may watch: the fault tests stop
or kill a process at one and record the resources Ray gave each task (tests/fault_hooks.py),
the scale benchmark adds up the bytes each process read (bench/read_stats.py). The library
only says where it is; what happens there lives with whoever watches.

A watcher is a module with `on_event(name, **info)`, named in IVF_DISTILL_HOOKS (commas between
several). The variable reaches every process of a job: the job's workers get the driver's
IVF_DISTILL_* variables (pipeline.runner.init_ray), a test cluster's nodes their own. Each
process imports the modules at its first event; with none named an event costs a lookup."""
from __future__ import annotations

import importlib
import os

_watchers: list | None = None


def emit(name: str, **info) -> None:
    """Tells the watchers that this process reached `name` (with `info`)."""
    global _watchers
    if _watchers is None:
        names = [m for m in os.environ.get("IVF_DISTILL_HOOKS", "").split(",") if m]
        _watchers = [importlib.import_module(m).on_event for m in names]
    for watch in _watchers:
        watch(name, **info)
