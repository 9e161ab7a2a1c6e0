"""bench/scale.py's watcher of pipeline.events (IVF_DISTILL_HOOKS=bench.read_stats): with
IVF_DISTILL_READ_STATS=DIR, each process keeps the running total of the bytes it read from the
corpus and query files in DIR/<pid>, so that the benchmark can add up what every task of a
stage read."""
import os

HOOKS = "bench.read_stats"
_total = 0


def on_event(name: str, nbytes: int = 0, **_info) -> None:
    global _total
    where = os.environ.get("IVF_DISTILL_READ_STATS")
    if name != "read" or not where:
        return
    _total += nbytes
    tmp = os.path.join(where, f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(str(_total))
    os.replace(tmp, os.path.join(where, str(os.getpid())))
