"""Start node processes (`python -m node join ...`) and wait until they are ready.

Used by `potluck demo`, `potluck bench` and the tests: real processes, real ports."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

READY = re.compile(r"potluck node (?:\S+ )?serving layers (\d+):(\d+) of .* on (\S+)$")


class NodeStartError(RuntimeError):
    """A node process exited or stayed silent before it was ready."""


class NodeProcess:
    """One `potluck join` process; `address` is set once it has printed its ready line."""

    def __init__(self, model: str | Path, start: int | None = None, end: int | None = None, *, host: str = "127.0.0.1",
                 threads: int = 0, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()):
        """A node serving `start:end`, or, with no span given, the span placement chooses.

        `prefix`: a command the node runs under, e.g. ("ip", "netns", "exec", NAME) (tests/test_relay.py)."""
        blocks = ["--blocks", f"{start}:{end}"] if start is not None else []
        self.args = [
            *prefix,
            sys.executable,
            "-m",
            "node",
            "join",
            "--model",
            str(model),
            *blocks,
            "--host",
            host,
            "--port",
            "0",
            *(["--threads", str(threads)] if threads else []),
            *extra_args,
        ]
        self.start_layer, self.end_layer = start, end
        # Idle nodes must not spin: with OpenMP's busy-wait, a node that just finished its hop keeps
        # its cores hot while the next node in the chain computes (several x slower on a small machine).
        self.env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.address: str | None = None
        self.output: deque[str] = deque(maxlen=200)  # last lines, for error messages
        self._ready = threading.Event()

    def start(self) -> "NodeProcess":
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the nodes ourselves
        )
        threading.Thread(target=self._pump, daemon=True).start()
        return self

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.output.append(line)
            match = READY.search(line)
            if match and not self._ready.is_set():
                self.start_layer, self.end_layer = int(match.group(1)), int(match.group(2))
                self.address = match.group(3)
                self._ready.set()
        self._ready.set()  # exited: wake any waiter

    def wait_ready(self, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(timeout=0.1):
            if time.monotonic() > deadline:
                self.stop()
                raise NodeStartError(
                    f"node {self.start_layer}:{self.end_layer} not ready after {timeout:.0f}s:\n" + self.log()
                )
        if self.address is None:
            raise NodeStartError(f"node {self.start_layer}:{self.end_layer} exited before it was ready:\n" + self.log())
        return self.address

    def log(self) -> str:
        return "\n".join(self.output)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def even_spans(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Split `[0, num_layers)` into `parts` contiguous spans of near-equal size."""
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def start_chain(model: str | Path, num_layers: int, parts: int, *, threads: int = 0, timeout: float = 180.0,
                extra_args: tuple[str, ...] = ()) -> list[NodeProcess]:
    """Start `parts` nodes covering the model, in parallel; stop them all if any fails."""
    nodes = [
        NodeProcess(model, a, b, threads=threads, extra_args=extra_args).start()
        for a, b in even_spans(num_layers, parts)
    ]
    try:
        for node in nodes:
            node.wait_ready(timeout)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes
