"""The ``deltalog`` command line in a child process, with its peak RSS and CPU.

``python -m benchmarks.child ARGS...`` imports the CLI and chromadb, prints
``ready`` (so a parent can start its clock after the imports), runs
``deltalog ARGS...`` in-process and prints, as its last line, a JSON object:
exit code, peak RSS (``VmHWM`` of the process itself, so no other process's
memory enters) and user + system CPU seconds.

``DeltalogChild`` starts one from an async parent, waits for ``ready``, and,
once the child has exited (by itself, or after ``stop`` sent SIGTERM, which
``compact --follow`` handles by finishing cleanly), parses its ``Usage``.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from benchmarks.procstat import peak_rss_mb, process_cpu

__all__ = ["DeltalogChild", "Usage", "run_child"]

_READY = "ready"


@dataclass(frozen=True, slots=True)
class Usage:
    returncode: int
    peak_rss_mb: float
    cpu_seconds: float
    seconds: float
    """Wall time from ``ready`` to the child's exit."""
    output: tuple[str, ...] = ()
    """What the command printed on stdout, line by line."""

    def results(self) -> list[dict[str, Any]]:
        """The JSON objects among ``output`` (``--json`` prints one per run)."""
        found = []
        for line in self.output:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found


class DeltalogChild:
    """``async with DeltalogChild(args) as child``: started and ready; ``await child.stop()``."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self._process: Process | None = None
        self._lines: list[str] = []
        self._rest = ""
        self._started = 0.0

    async def __aenter__(self) -> DeltalogChild:
        command = [sys.executable, "-m", "benchmarks.child", *self.args]
        self._process = await anyio.open_process(command, stderr=None)
        assert self._process.stdout is not None
        self._stream = TextReceiveStream(self._process.stdout)
        await self._read_until_ready()
        self._started = anyio.current_time()
        return self

    async def _read_until_ready(self) -> None:
        while (line := await self._next_line()) != _READY:
            if line is None:
                raise RuntimeError(f"benchmarks.child exited before it was ready: {self.args}")
        self._lines.clear()

    async def _next_line(self) -> str | None:
        """The child's next line on stdout (kept in ``_lines``); None at its end."""
        while "\n" not in self._rest:
            try:
                self._rest += await self._stream.receive()
            except anyio.EndOfStream:
                return None
        line, self._rest = self._rest.split("\n", 1)
        self._lines.append(line)
        return line

    async def result(self, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Wait for a JSON line (``--json`` prints one per run) that ``done`` accepts."""
        while (line := await self._next_line()) is not None:
            if line.startswith("{"):
                found: dict[str, Any] = json.loads(line)
                if done(found):
                    return found
        raise RuntimeError(f"deltalog {' '.join(self.args)} exited before the awaited result")

    async def drain(self) -> None:
        """Read the child's lines as they come (kept for ``wait``), until its output ends.

        Run it as a task while nothing else reads: a child that prints more
        than a pipe holds would otherwise block.
        """
        while await self._next_line() is not None:
            pass

    def cpu_now(self) -> float:
        """The child's CPU seconds so far (from ``/proc``)."""
        assert self._process is not None
        return process_cpu(self._process.pid)

    async def stop(self) -> Usage:
        """SIGTERM (a follower finishes its run and exits), then the child's usage."""
        assert self._process is not None
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> Usage:
        assert self._process is not None
        while await self._next_line() is not None:
            pass
        await self._process.wait()
        seconds = anyio.current_time() - self._started
        lines = [line for line in self._lines if line.strip()]
        if not lines or not lines[-1].startswith("{"):
            raise RuntimeError(f"benchmarks.child {self.args} printed no usage: {lines[-5:]}")
        usage = json.loads(lines[-1])
        return Usage(
            usage["rc"],
            usage["peak_rss_mb"],
            usage["cpu_seconds"],
            round(seconds, 3),
            tuple(lines[:-1]),
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            with anyio.CancelScope(shield=True):
                await self._process.wait()


async def run_child(args: list[str]) -> Usage:
    """Run ``deltalog ARGS`` to its end in a child process; raise if it failed."""
    async with DeltalogChild(args) as child:
        usage = await child.wait()
    if usage.returncode != 0:
        raise RuntimeError(f"deltalog {' '.join(args)} exited with {usage.returncode}")
    return usage


def _main(argv: list[str]) -> int:
    import chromadb  # noqa: F401  (imported before "ready", as the CLI would on its first run)

    from benchmarks.profiling import from_environment
    from deltalog.cli import main

    from_environment()  # python -m benchmarks.profile: profile what follows "ready"
    print(_READY, flush=True)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    own = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "rc": code,
        "peak_rss_mb": peak_rss_mb(),
        "cpu_seconds": round(own.ru_utime + own.ru_stime, 3),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
