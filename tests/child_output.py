"""A child process whose output a thread queues line by line, so tests wait for a line with a
deadline instead of sleeping (shared by the load and crash-recovery tests)."""

from __future__ import annotations

import queue
import subprocess
import threading


class QueuedOutput:
    """`process` (started with stdout=PIPE, text=True); its lines arrive in `lines`, then None
    once it closes its output. `output` is for the lines a test has read so far."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)
