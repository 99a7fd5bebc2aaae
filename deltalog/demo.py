"""The README's main command: the log end to end on an embedded endpoint.

Starts moto's S3 + DynamoDB server on loopback (unless ``AWS_ENDPOINT_URL``
points elsewhere), creates the bucket and table, appends synthetic deltas
from many concurrent producer tasks through group commit, reads the log
back, checks that every acknowledged delta is there exactly once, at the
seq its submitter was given, and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import ExitStack

import anyio
import numpy as np

from deltalog.config import LogConfig
from deltalog.dynamo import DynamoTable
from deltalog.endpoint import FAKE_CREDENTIALS, EmbeddedEndpoint
from deltalog.entry import Delta, Upsert
from deltalog.errors import DataError
from deltalog.log import DeltaLog
from deltalog.s3 import S3Store

__all__ = ["run_demo"]


def _delta(rng: np.random.Generator, n: int, dim: int) -> Delta:
    ids = [f"IMAGE#{n:08d}#RECEIPT#00001#LINE#{i:05d}" for i in range(int(rng.integers(1, 4)))]
    vectors = rng.standard_normal((len(ids), dim), dtype=np.float32)
    return Delta(
        ops=[
            Upsert(
                collection="lines",
                ids=ids,
                embeddings=vectors,
                documents=[f"line {i} of receipt {n}" for i in range(len(ids))],
                metadatas=[{"receipt_id": n, "line_id": i} for i in range(len(ids))],
            )
        ]
    )


async def _init(config: LogConfig) -> None:
    store = await S3Store.connect(config)
    try:
        await store.ensure_bucket()
    finally:
        await store.aclose()
    table = await DynamoTable.connect(config)
    try:
        await table.ensure_table()
    finally:
        await table.aclose()


async def _append(log: DeltaLog, deltas: int, producers: int, dim: int) -> dict[str, int]:
    acknowledged: dict[str, int] = {}
    rng = np.random.default_rng(7)
    prepared = [_delta(rng, n, dim) for n in range(deltas)]
    async with log.producer(linger_ms=5) as producer:

        async def worker(first: int) -> None:
            for n in range(first, deltas, producers):
                delta = prepared[n]
                acknowledged[delta.delta_id] = await producer.submit(delta)

        async with anyio.create_task_group() as tg:
            for w in range(producers):
                tg.start_soon(worker, w)
    return acknowledged


async def _read_back(log: DeltaLog, acknowledged: dict[str, int]) -> tuple[int, int]:
    seen: dict[str, int] = {}
    entries = 0
    async for seq, entry in log.read(after=0):
        entries += 1
        for delta in entry.deltas:
            if delta.delta_id in seen:
                raise DataError(f"delta {delta.delta_id} appears twice", seq=seq)
            seen[delta.delta_id] = seq
    if seen != acknowledged:
        raise DataError("the log does not hold exactly the acknowledged deltas")
    return entries, len(seen)


async def run_demo(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if not endpoint:
            print("starting an embedded S3 + DynamoDB endpoint on loopback ...", flush=True)
            endpoint = stack.enter_context(EmbeddedEndpoint()).url
            for name, value in FAKE_CREDENTIALS.items():
                os.environ.setdefault(name, value)
        config = LogConfig(
            bucket="deltalog-demo", table="deltalog-demo", log="receipts", endpoint_url=endpoint
        )
        await _init(config)
        print(f"endpoint {endpoint}, bucket {config.bucket}, table {config.table}", flush=True)
        async with DeltaLog.open(config) as log:
            start = time.perf_counter()
            acknowledged = await _append(log, args.deltas, args.producers, args.dim)
            append_s = time.perf_counter() - start
            start = time.perf_counter()
            entries, deltas = await _read_back(log, acknowledged)
            read_s = time.perf_counter() - start
            status = await log.status()
    _summary(args, append_s, read_s, entries, deltas, status.head, status.hole_count)
    return 0


def _summary(
    args: argparse.Namespace,
    append_s: float,
    read_s: float,
    entries: int,
    deltas: int,
    head: int,
    holes: int,
) -> None:
    rows = [
        ("producer tasks", f"{args.producers}"),
        ("deltas acknowledged", f"{deltas}"),
        (
            "entries written (group commit)",
            f"{entries}  ({deltas / max(entries, 1):.0f} deltas/entry)",
        ),
        ("append throughput", f"{deltas / append_s:,.0f} deltas/s"),
        ("read-back throughput", f"{deltas / read_s:,.0f} deltas/s"),
        ("head / holes", f"{head} / {holes}"),
        ("exactly once", "yes: every acknowledged delta once, at its seq"),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
