"""Test speed only. At the end of every Ray Train run (2.60), the controller waits up to 12 s
for its placement-group cleaner actor to stop; the cleaner is blocked in a state-API call of
10 s (the test cluster runs no dashboard), so the wait always runs out (Ray logs "Failed to
stop PlacementGroupCleaner gracefully") and changes nothing. A 1 s wait ends the same way, 11 s
sooner.

tests/conftest.py applies it in the test process; the jobs the tests start as processes get
this folder on PYTHONPATH, so that Python imports this file as `sitecustomize` at startup and
applies it to the job's driver (and to nothing else). Left alone if Ray's signature is not the
one known."""
import inspect
import os
import sys


def quick_train_teardown() -> None:
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback as Callback,
        )
    except ImportError:
        return
    names = list(inspect.signature(Callback.__init__).parameters)
    if names == ["self", "check_interval_s", "get_actor_timeout_s", "stop_timeout"]:
        check, get_timeout, _ = Callback.__init__.__defaults__
        Callback.__init__.__defaults__ = (check, get_timeout, 1.0)


if os.path.basename(sys.argv[0] if sys.argv else "") == "distill.py":
    quick_train_teardown()
