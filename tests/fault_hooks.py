"""The fault tests' watcher of pipeline.events (IVF_DISTILL_HOOKS=tests.fault_hooks), set in the
environment of a job or of one node of a test cluster:

- IVF_DISTILL_FAULT_KILL="name:DIR": the first process to reach the event `name` SIGKILLs itself
  (as the OOM killer would), leaving DIR/name as the evidence; later ones go through.
- IVF_DISTILL_FAULT_HOLD="name:DIR": every process that reaches `name` writes DIR/name-<pid>
  and waits there, until the test takes its node away.
- IVF_DISTILL_TASK_LOG=DIR: each task that starts (the event "task") appends its name and the
  resources Ray gave it to DIR/<pid>.jsonl."""
import json
import os
import signal
import time

HOOKS = "tests.fault_hooks"


def on_event(name: str, **info) -> None:
    log = os.environ.get("IVF_DISTILL_TASK_LOG", "")
    if name == "task" and log:
        with open(os.path.join(log, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps({"name": info["task"], "resources": info["resources"]}) + "\n")
        return
    hold = os.environ.get("IVF_DISTILL_FAULT_HOLD", "")
    if hold.startswith(name + ":"):
        open(os.path.join(hold.split(":", 1)[1], f"{name}-{os.getpid()}"), "w").close()
        while True:
            time.sleep(1)
    raise_at = os.environ.get("IVF_DISTILL_FAULT_RAISE", "")  # "event" or "task:<task name>"
    if raise_at in (name, f"{name}:{info.get('task')}"):  # a bug of ours, as numpy raises one
        raise ValueError(f"injected at {raise_at}: operands could not be broadcast together")
    spec = os.environ.get("IVF_DISTILL_FAULT_KILL", "")
    if not spec.startswith(name + ":"):
        return
    flag = os.path.join(spec.split(":", 1)[1], name)
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return  # killed once already: the retry goes through
    os.kill(os.getpid(), signal.SIGKILL)
