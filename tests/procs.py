"""Producer processes for the crash tests, run as ``python -m tests.procs COMMAND``.

- ``produce``: append random deltas through a group-commit producer until
  killed, printing one JSON line ``{"delta_id": ..., "seq": ...}`` per
  acknowledged delta (a delta is acknowledged once its line is out).
- ``reserve``: print ``ready``, then on ``SIGUSR1`` reserve seqs with the
  counter, print them, and hang without writing: killed, it leaves holes,
  like a producer that died between reserving a seq and writing its entry.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
from collections.abc import Sequence

import anyio
import numpy as np

from deltalog import DeltaLog, LogConfig
from deltalog.cli.soak import Ledger, produce


def argv(command: str, config: LogConfig, *extra: str) -> list[str]:
    """The command line that runs ``command`` on ``config``'s log."""
    location = ["--bucket", config.bucket, "--table", config.table, "--log", config.log]
    endpoint = ["--endpoint-url", config.endpoint_url or ""]
    return [sys.executable, "-m", "tests.procs", command, *location, *endpoint, *extra]


def acknowledged(stdout: str) -> dict[str, int]:
    """``delta_id -> seq`` from a ``produce`` process's output (a cut last line is not)."""
    lines = stdout.split("\n")[:-1]  # the text after the last newline may be cut
    return {record["delta_id"]: record["seq"] for record in map(json.loads, lines)}


class _PrintingLedger(Ledger):
    """A ledger that prints each acknowledgement as it is made."""

    def __init__(self) -> None:
        super().__init__()
        self.acked = _Printing()


class _Printing(dict[str, int]):
    def __setitem__(self, delta_id: str, seq: int) -> None:
        super().__setitem__(delta_id, seq)
        print(json.dumps({"delta_id": delta_id, "seq": seq}), flush=True)


async def _produce(config: LogConfig, tasks: int, seed: int, pause: float) -> None:
    ledger = _PrintingLedger()
    stop = anyio.Event()  # never set: the process runs until killed
    rng = np.random.default_rng(seed)
    async with (
        DeltaLog.open(config) as log,
        log.producer(linger_ms=2, max_deltas=8) as producer,
        anyio.create_task_group() as tg,
    ):
        for _ in range(tasks):
            tg.start_soon(functools.partial(produce, pause=pause), producer, ledger, rng, stop)


async def _reserve(config: LogConfig, count: int) -> None:
    async with DeltaLog.open(config) as log:
        with anyio.open_signal_receiver(signal.SIGUSR1) as signals:
            print("ready", flush=True)
            async for _ in signals:
                for _ in range(count):
                    print(await log.table.reserve(log.keys.log_id), flush=True)
                await anyio.sleep_forever()


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.procs")
    parser.add_argument("command", choices=["produce", "reserve"])
    for name in ("--bucket", "--table", "--log", "--endpoint-url"):
        parser.add_argument(name, required=True)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.02, help="between deltas, per task")
    parsed = parser.parse_args(args)
    config = LogConfig(
        bucket=parsed.bucket, table=parsed.table, log=parsed.log, endpoint_url=parsed.endpoint_url
    )
    if parsed.command == "produce":
        anyio.run(_produce, config, parsed.tasks, parsed.seed, parsed.pause)
    else:
        anyio.run(_reserve, config, parsed.count)


if __name__ == "__main__":
    main()
