"""The ``deltalog`` command in a subprocess, as a user runs it.

``deltalog(*args, **env)`` runs ``python -m deltalog`` with the test
process's environment minus every deltalog and AWS location setting (so only
the flags and ``env`` say where the log is) plus moto's fake credentials,
and returns its exit status and output.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import anyio

from deltalog.config import LogConfig
from deltalog.storage.endpoint import FAKE_CREDENTIALS

__all__ = ["Run", "cli_env", "deltalog", "where"]


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def cli_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any deltalog or AWS location settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DELTALOG_", "AWS_ENDPOINT_URL", "AWS_PROFILE"))
    }
    return {**env, **FAKE_CREDENTIALS, **extra}


async def deltalog(*args: str, **env: str) -> Run:
    done = await anyio.run_process(
        [sys.executable, "-m", "deltalog", *args], env=cli_env(**env), check=False
    )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def where(config: LogConfig) -> list[str]:
    """The location flags of ``config``'s log."""
    location = ["--bucket", config.bucket, "--table", config.table, "--log", config.log]
    return [*location, "--endpoint-url", config.endpoint_url or ""]
