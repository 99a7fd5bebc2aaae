"""Fixtures: moto's server on loopback (a child process), fresh logs, seeded randomness.

Hypothesis profiles (README "Development"):

- ``ci``, loaded here, so the README's test command and ``.ci/run`` use it:
  derandomized (each test draws the same examples on every run, chosen
  from a hash of the test, until the test or Hypothesis changes), no
  example database (nothing a run leaves behind changes the next one), no
  deadline (a loaded machine is slow, not wrong), failures printed with
  their ``@reproduce_failure`` blob.
- ``explore``: random seeds, with the local example database
  (``.hypothesis/``, so a failure found is tried first next time). Chosen
  with ``pytest --hypothesis-profile explore``, which hypothesis's pytest
  plugin loads after this module. ``DELTALOG_EXPLORE_SCALE=N`` multiplies
  each property test's example count (``examples``) for a longer search.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from hypothesis import settings

from deltalog import DeltaLog, LogConfig
from deltalog.storage.dynamo import DynamoTable
from deltalog.storage.endpoint import FAKE_CREDENTIALS, EmbeddedEndpoint
from deltalog.storage.s3 import S3Store
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile("ci")


def examples(n: int) -> int:
    """A property test's example count: ``n``, times ``DELTALOG_EXPLORE_SCALE`` if set."""
    return n * int(os.environ.get("DELTALOG_EXPLORE_SCALE", "1"))


BUCKET = "deltalog-tests"
TABLE = "deltalog-tests"
MIN_PART_SIZE = 1024


@pytest.fixture(scope="session")
def endpoint() -> Iterator[str]:
    """moto's S3 + DynamoDB server, once per test session, with fake credentials.

    Multipart parts may be as small as ``MIN_PART_SIZE`` (S3: 5 MiB), so
    tests stream archives of many parts.
    """
    for name, value in FAKE_CREDENTIALS.items():
        os.environ[name] = value
    os.environ.pop("AWS_PROFILE", None)
    with EmbeddedEndpoint(min_part_size=MIN_PART_SIZE) as server:
        yield server.url


@pytest.fixture(scope="session")
async def initialized(endpoint: str) -> str:
    """The shared test bucket and table exist."""
    config = LogConfig(bucket=BUCKET, table=TABLE, endpoint_url=endpoint)
    store = await S3Store.connect(config)
    await store.ensure_bucket()
    await store.aclose()
    table = await DynamoTable.connect(config)
    await table.ensure_table()
    await table.aclose()
    return endpoint


@pytest.fixture
def config(initialized: str) -> LogConfig:
    """A fresh, empty log on the shared endpoint."""
    return LogConfig(
        bucket=BUCKET, table=TABLE, log=f"t-{uuid.uuid4().hex[:12]}", endpoint_url=initialized
    )


@pytest.fixture
async def log(config: LogConfig) -> AsyncIterator[DeltaLog]:
    async with DeltaLog.open(config) as opened:
        yield opened


@pytest.fixture
async def memory_log() -> AsyncIterator[DeltaLog]:
    config = LogConfig(bucket="memory", table="memory", log="mem")
    async with DeltaLog.open(config, store=MemoryStore(), table=MemoryTable()) as opened:
        yield opened


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """Seeded randomness; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("DELTALOG_TEST_SEED", uuid.uuid4().int % 2**32))
    print(f"{request.node.nodeid}: DELTALOG_TEST_SEED={seed}")
    return np.random.default_rng(seed)
