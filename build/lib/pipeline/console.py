"""A console a person can read: every line the process writes to stderr (its own, Ray's, the
workers' as Ray relays them, faiss's C++ messages) goes to a log file, and the terminal shows
only the job's own progress lines, warnings and errors.

It works on file descriptor 2, so output written by C++ and by handlers that captured
`sys.stderr` before this ran is caught too. stdout (the results) is left alone.
"""
from __future__ import annotations

import os
import re
import sys
import threading

# The job's own lines: its loggers (pipeline.*), in the driver or relayed from a worker, and
# the messages jobs/distill.py prints before exiting.
OURS = re.compile(r"\bpipeline(\.\w+)*: |^(error|output busy|stopped|interrupted by)\b")
# Lines a user should see whoever wrote them, unless they are known to mean nothing here.
SEVERE = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback|[A-Za-z]+Error)\b")
HARMLESS = re.compile(r"PlacementGroupCleaner|IO_FLAG_ONDISK_SAME_DIR|"
                      r"Failed to query Ray Train Controller|"
                      r"No module named 'faiss\.swigfaiss_avx|"  # faiss trying its CPU builds
                      r"Token authentication is enabled for this Ray cluster")


def keep(line: str) -> bool:
    """Whether a line of stderr is shown on the terminal."""
    if HARMLESS.search(line):
        return False
    return bool(OURS.search(line) or SEVERE.search(line))


class Console:
    """Routes fd 2 through a pipe: all of it to `log_path`, what `keep` accepts to the
    terminal. close() restores fd 2 and flushes what is left."""

    def __init__(self, log_path: str):
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        self.log = open(log_path, "ab", buffering=0)
        sys.stderr.flush()
        self.terminal = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name="console", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        with os.fdopen(self.read, "rb") as pipe:
            for raw in pipe:
                self.log.write(raw)
                if keep(raw.decode(errors="replace")):
                    os.write(self.terminal, raw)

    def close(self) -> None:
        """Ends the routing; the pump sees the pipe's end once no one else holds it."""
        sys.stderr.flush()
        os.dup2(self.terminal, 2)  # the pipe's last writer in this process is gone
        self.thread.join(timeout=5)
        self.log.close()
