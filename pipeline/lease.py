"""One writer per output: a lease object `URI/_lease.json`, renewed while the job runs.

The lease is taken with a conditional create (S3 `If-None-Match: *`, locally an exclusive
create) and renewed with a conditional replace on the version the holder last wrote, so two
jobs can never both believe they hold it. A lease not renewed for its `ttl_s` is dead and may
be taken over; `--break-lease` takes it whatever its age.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from pipeline import storage

log = logging.getLogger("pipeline.lease")

LEASE = "_lease.json"


class LeaseHeld(Exception):
    """Another job holds the output's lease. The message names it and says how to proceed."""


class LeaseLost(Exception):
    """This job's lease was taken over (it was broken, or it expired while the job stalled)."""


def _describe(body: dict, now: float) -> str:
    h = body.get("holder", {})
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.get("started", 0)))
    return (f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {started}, last "
            f"renewed {now - body.get('renewed_at', 0):.0f}s ago (it expires after "
            f"{body.get('ttl_s', 0):.0f}s without renewal)")


class Lease:
    """Holds `output`'s lease from acquire() to release(), renewing it from a thread every
    ttl_s / 4. `lost` is set when a renewal finds the lease taken; check() raises then."""

    def __init__(self, output: str, ttl_s: float):
        self.uri = storage.join(output, LEASE)
        self.ttl_s = ttl_s
        self.body = {"holder": {"host": socket.gethostname(), "pid": os.getpid(),
                                "started": time.time()},
                     "token": uuid.uuid4().hex, "ttl_s": ttl_s}
        self.tag: str | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _data(self) -> bytes:
        self.body["renewed_at"] = time.time()
        return json.dumps(self.body, indent=2).encode()

    def acquire(self, break_lease: bool = False) -> None:
        try:
            self.tag = storage.create_exclusive(self.uri, self._data())
        except storage.Conflict:
            self._take_over(break_lease)
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()
        log.info("lease: holding %s (renewed every %.0fs)", self.uri, self.ttl_s / 4)

    def _take_over(self, break_lease: bool) -> None:
        raw, tag = storage.read_tagged(self.uri)
        now = time.time()
        if raw is not None:
            current = json.loads(raw)
            dead = now - current.get("renewed_at", 0) > current.get("ttl_s", 0)
            if not (dead or break_lease):
                raise LeaseHeld(
                    f"another job is writing to this output: {_describe(current, now)}. Wait "
                    f"for it, or, if it is dead, rerun with --break-lease to take over "
                    f"({self.uri})")
            log.warning("lease: taking over %s from %s", "a dead lease" if dead else
                        "a live lease (--break-lease)", _describe(current, now))
        try:
            self.tag = storage.replace_if(self.uri, self._data(), tag)
        except storage.Conflict:
            raise LeaseHeld(f"another job took the lease {self.uri} at the same moment; "
                            "rerun to see who holds it") from None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.tag = storage.replace_if(self.uri, self._data(), self.tag)
            except storage.Conflict:
                log.error("lease: %s was taken over by another job; this job will stop "
                          "before it publishes", self.uri)
                self.lost.set()
                return
            except Exception as e:  # noqa: BLE001 - a failed renewal is retried next period
                log.warning("lease: renewal failed (%s: %s); retrying", type(e).__name__, e)

    def check(self) -> None:
        """Raises LeaseLost if another job has taken the lease."""
        if self.lost.is_set():
            raise LeaseLost(f"the lease {self.uri} was taken over by another job; nothing "
                            "more is written by this one")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost.is_set():
            return
        # Only our own lease is removed: if the tag moved, someone broke it and holds it now.
        raw, _ = storage.read_tagged(self.uri)
        if raw is not None and json.loads(raw).get("token") == self.body["token"]:
            storage.delete(self.uri)



@contextmanager
def hold(output: str, ttl_s: float, break_lease: bool = False):
    """Holds the output's lease for the duration of the block."""
    lease = Lease(output, ttl_s)
    lease.acquire(break_lease)
    try:
        yield lease
    finally:
        lease.release()
