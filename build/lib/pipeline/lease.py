"""One writer per output: a lease object `URI/_lease.json`, renewed while the job runs.

The lease is taken with a conditional create (S3 `If-None-Match: *`, locally an exclusive
create) and renewed with a conditional replace on the version the holder last wrote.

Time is only ever measured on one host's monotonic clock, never compared across hosts:
- The holder counts the lease valid until `ttl - margin` after the *start* of its last
  successful renewal. Every storage call made under the lease is bounded (`timeout`), and a
  write is begun only with at least that much validity left, so each one lands before the
  holder's validity ends.
- A taker that finds the lease judges it dead only after seeing the object unchanged (the same
  ETag, or content hash locally) for a whole TTL on its own clock. A live holder renews several
  times in that window, so a live lease is never taken, however the two clocks differ.
  The holder's wall-clock `renewed_at` is shown to people and used for one thing only: a lease
  that looks fresh is refused at once, without the wait.
- `--break-lease` takes the lease at once: for when the user knows the holder is dead.
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

log = logging.getLogger("ivf_distill.lease")

LEASE = "_lease.json"


class LeaseHeld(Exception):
    """Another job holds the output's lease. The message names it and says how to proceed."""


class LeaseLost(Exception):
    """This job no longer holds its lease: it was taken over, or no renewal succeeded in time.
    Nothing more may be written."""


def _describe(body: dict, now: float) -> str:
    h = body.get("holder", {})
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.get("started", 0)))
    return (f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {started}, last "
            f"renewed {now - body.get('renewed_at', 0):.0f}s ago by its clock (it expires "
            f"after {body.get('ttl_s', 0):.0f}s without renewal)")


class Lease:
    """Holds `output`'s lease from acquire() to release(), renewing it from a thread.

    check(need) raises LeaseLost once the lease was taken over, or when less than `need`
    seconds of validity are left. `clock` is the wall clock written into the lease for people
    to read (tests skew it); validity never depends on it."""

    def __init__(self, output: str, ttl_s: float, clock=time.time):
        self.uri = storage.join(output, LEASE)
        self.ttl_s = ttl_s
        self.margin = ttl_s / 4
        self.period = ttl_s / 8
        # One storage call under the lease (one attempt: timeout/2 to connect, timeout/2 to
        # read) stays inside the margin; config validation keeps ttl_s >= 8 s for that.
        self.timeout = max(0.5, ttl_s / 8)
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.body = {"holder": {"host": socket.gethostname(), "pid": os.getpid(),
                                "started": clock()},
                     "token": self.token, "ttl_s": ttl_s}
        self.tag: str | None = None
        self._valid_from = float("-inf")  # monotonic start of the last successful write
        self.lost = threading.Event()
        self._why = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _data(self) -> bytes:
        self.body["renewed_at"] = self.clock()
        return json.dumps(self.body, indent=2).encode()

    def remaining(self) -> float:
        """Seconds of validity left on this host's monotonic clock."""
        return self._valid_from + self.ttl_s - self.margin - time.monotonic()

    def acquire(self, break_lease: bool = False) -> None:
        while True:
            start = time.monotonic()
            try:
                self.tag = storage.create_exclusive(self.uri, self._data(), self.timeout)
                self._valid_from = start
                break
            except storage.Conflict:
                if self._take_over(break_lease, start):
                    break
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()
        log.info("lease: holding %s (renewed every %.0fs)", self.uri, self.period)

    def _take_over(self, break_lease: bool, start: float) -> bool:
        """Takes the existing lease when it is dead (or broken); False when it vanished
        meanwhile, or its holder renewed it while this job broke it (acquire tries again)."""
        raw, tag = storage.read_tagged(self.uri, self.timeout)
        if raw is None:
            return False
        current = json.loads(raw)
        if break_lease:
            log.warning("lease: taking over a live lease (--break-lease) from %s",
                        _describe(current, self.clock()))
        else:
            age = self.clock() - current.get("renewed_at", 0)
            if age <= current.get("ttl_s", 0):
                raise LeaseHeld(
                    f"another job is writing to this output: {_describe(current, self.clock())}"
                    f". Wait for it, or, if it is dead, rerun with --break-lease to take over "
                    f"({self.uri})")
            if not self._unchanged_for(tag, current):
                return False
            log.warning("lease: taking over a dead lease from %s",
                        _describe(current, self.clock()))
            start = time.monotonic()
        try:
            self.tag = storage.replace_if(self.uri, self._data(), tag, self.timeout)
        except storage.Conflict:
            if break_lease:
                # A live holder renews every period, and its renewal may land between the
                # read and this write: the same holder, so breaking it is tried again.
                raw, _ = storage.read_tagged(self.uri, self.timeout)
                if raw is None or json.loads(raw).get("token") == current.get("token"):
                    return False
            raise LeaseHeld(f"another job took the lease {self.uri} at the same moment; "
                            "rerun to see who holds it") from None
        self._valid_from = start
        return True

    def _unchanged_for(self, tag: str, current: dict) -> bool:
        """Watches the lease for its holder's whole TTL on this host's clock. Raises LeaseHeld
        when it is renewed meanwhile; False when it was deleted (released); True when it
        stayed unchanged, so its holder is dead."""
        ttl = float(current.get("ttl_s", self.ttl_s))
        log.info("lease: %s looks expired by its holder's clock; watching it for %.0fs on this "
                 "host's clock before taking it over", self.uri, ttl)
        t0 = time.monotonic()
        while time.monotonic() - t0 < ttl:
            time.sleep(min(ttl / 10, 1.0))
            _, now = storage.read_tagged(self.uri, self.timeout)
            if now is None:
                return False
            if now != tag:
                raise LeaseHeld(
                    f"another job holds this output and renewed its lease while this job "
                    f"watched it, so it is alive (its clock may differ from this host's): "
                    f"{_describe(current, self.clock())}. Wait for it, or rerun with "
                    f"--break-lease if you know it is dead ({self.uri})")
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.period):
            start = time.monotonic()
            try:
                self.tag = storage.replace_if(self.uri, self._data(), self.tag, self.timeout)
                self._valid_from = start
            except storage.Conflict:
                self._lose("it was taken over by another job")
                return
            except Exception as e:  # noqa: BLE001 - retried next period, until validity ends
                log.warning("lease: renewal failed (%s: %s); %.0fs of validity left",
                            type(e).__name__, e, max(self.remaining(), 0))
            if self.remaining() <= 0:
                self._lose(f"no renewal succeeded for {self.ttl_s - self.margin:.0f}s "
                           "(is the storage reachable?)")
                return

    def _lose(self, why: str) -> None:
        self._why = why
        self.lost.set()
        log.error("lease: %s lost: %s; this job writes nothing more", self.uri, why)

    def check(self, need: float = 0.0) -> None:
        """Raises LeaseLost unless the lease is held with more than `need` seconds left."""
        if not self.lost.is_set() and self.remaining() <= need:
            self._lose(f"no renewal succeeded for {self.ttl_s - self.margin - need:.0f}s "
                       "(is the storage reachable?)")
        if self.lost.is_set():
            raise LeaseLost(f"the lease {self.uri} was lost ({self._why}); nothing more is "
                            "written by this job. Rerun to continue: finished stages are kept")

    def write(self, uri: str, data: bytes) -> None:
        """A write into the output, each attempt begun only with time for it to land under the
        lease. A failed attempt is retried while the lease lasts."""
        while True:
            self.check(self.timeout)
            try:
                storage.write_bytes(uri, data, self.timeout)
                return
            except Exception as e:  # noqa: BLE001 - a timeout, a dropped connection: the lease decides
                log.warning("write of %s failed (%s: %s); retrying while the lease holds",
                            uri, type(e).__name__, e)
                time.sleep(min(1.0, self.period))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost.is_set() or self.tag is None:
            return
        # Only our own lease is removed: if the tag moved, someone broke it and holds it now.
        try:
            storage.delete_if(self.uri, self.tag, self.timeout)
        except Exception as e:  # noqa: BLE001 - an unreleased lease expires by itself
            log.warning("lease: could not release %s (%s); it expires after %.0fs", self.uri,
                        e, self.ttl_s)


@contextmanager
def hold(output: str, ttl_s: float, break_lease: bool = False):
    """Holds the output's lease for the duration of the block."""
    lease = Lease(output, ttl_s)
    lease.acquire(break_lease)
    try:
        yield lease
    finally:
        lease.release()
