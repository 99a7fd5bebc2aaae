"""CPU attribution inside a process: per thread from ``/proc``, per call, per module.

- ``ThreadCpu``: each thread's CPU seconds from ``/proc/PID/task``, sampled
  by a daemon thread (a thread that exits keeps what it used), summed by
  kind: ``main`` (the event loop), ``python`` (worker threads: Chroma's
  Python side, archives), and Chroma's native threads by name
  (``tokio-rt-worker``: its runtime, HNSW inserts; ``sqlx-sqlite-wor``:
  its SQLite).
- ``CallCpu``: CPU of chosen blocking calls in the thread that runs them
  (``time.thread_time``), e.g. Chroma's ``add`` and deltalog's batching
  around it.
- ``Profiler``: the child side of ``python -m benchmarks.profile``:
  ``ThreadCpu``, ``CallCpu`` on deltalog's sink, and py-spy sampling the
  process (``py-spy record --threads``, when installed: it costs the
  profiled process nothing per call, unlike ``cProfile``, whose per-call
  overhead would inflate call-heavy code); written to a directory as the
  process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ENV", "CallCpu", "Profiler", "ThreadCpu"]

ENV = "DELTALOG_BENCH_PROFILE"
"""Set in a benchmark child's environment: the directory its profile is written to."""
T = TypeVar("T")
_HZ = os.sysconf("SC_CLK_TCK")


class ThreadCpu:
    """Per-thread CPU of process ``pid`` (default: this one), summed by kind."""

    def __init__(self, pid: int | None = None, *, every: float = 0.2) -> None:
        self.pid = pid or os.getpid()
        self.every = every
        self._seen: dict[str, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> ThreadCpu:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="thread-cpu")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        for tid in tids:
            try:
                stat = Path(f"/proc/{self.pid}/task/{tid}/stat").read_text()
                comm = Path(f"/proc/{self.pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / _HZ
            kind = "main" if tid == str(self.pid) else comm
            with self._lock:
                old = self._seen.get(tid)
                self._seen[tid] = (kind, max(cpu, old[1] if old else 0.0))

    def by_kind(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        with self._lock:
            for kind, cpu in self._seen.values():
                totals[kind] = totals.get(kind, 0.0) + cpu
        return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


class CallCpu:
    """CPU seconds of chosen calls, in the thread that runs them, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        started = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self.seconds[name] = self.seconds.get(name, 0.0) + spent
                self.calls[name] += 1

    def wrap(self, name: str, func: Callable[..., T]) -> Callable[..., T]:
        def wrapped(*args: Any, **kwargs: Any) -> T:
            with self.measure(name):
                return func(*args, **kwargs)

        return wrapped


class Profiler:
    """The profile of a ``benchmarks.child`` process; see the module docstring."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.threads = ThreadCpu()
        self.calls = CallCpu()
        self.spy: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Instrument deltalog's sink, then profile the main thread until exit."""
        from chromadb.api.models.Collection import Collection

        from deltalog.snapshot import sink

        Collection.add = self.calls.wrap("chroma add", Collection.add)  # type: ignore[method-assign]
        sink._add = self.calls.wrap("sink._add (chroma add included)", sink._add)
        sink._remove_existing = self.calls.wrap("existence check + delete", sink._remove_existing)
        sink._count = self.calls.wrap("counts", sink._count)
        self.out.mkdir(parents=True, exist_ok=True)
        self.threads.start()
        self.started = time.process_time()
        self.spy = _py_spy(self.out / "py-spy.txt")
        atexit.register(self.write)

    def write(self) -> None:
        self.threads.stop()
        if self.spy is not None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes its samples and exits
            self.spy.wait(timeout=60)
        report = {
            "process_cpu_seconds": round(time.process_time() - self.started, 3),
            "threads": self.threads.by_kind(),
            "calls": {k: round(v, 4) for k, v in self.calls.seconds.items()},
            "call_counts": dict(self.calls.calls),
        }
        (self.out / "profile.json").write_text(json.dumps(report, indent=2))


def _py_spy(out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling this process into ``out`` (raw collapsed stacks), if installed."""
    beside = Path(sys.executable).with_name("py-spy")
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        return None
    command = [spy, "record", "--threads", "-r", "100", "-f", "raw", "-o", str(out)]
    command += ["--pid", str(os.getpid())]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def from_environment() -> Profiler | None:
    """The profiler ``ENV`` asks for, started; None when it is not set."""
    where = os.environ.get(ENV)
    if not where:
        return None
    profiler = Profiler(Path(where))
    profiler.start()
    return profiler
