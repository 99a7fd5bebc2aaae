"""``deltalog endpoint``: a local S3 + DynamoDB endpoint to try the CLI on, outside the demo.

It runs the demo's and the tests' embedded endpoint (moto's server, one
request at a time: counters and conditional writes stay atomic, as on AWS,
which a plain ``moto_server`` does not promise under concurrent producers)
in the foreground, prints the environment that points every other
``deltalog`` command (and any AWS SDK) at it, and stops on SIGINT or
SIGTERM. Nothing it stores outlives it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import anyio

from deltalog.cli.process import stop_on_signal
from deltalog.storage.endpoint import FAKE_CREDENTIALS, EmbeddedEndpoint

__all__ = ["register"]


async def cmd_endpoint(args: argparse.Namespace) -> int:
    endpoint = EmbeddedEndpoint(port=args.port, host=args.host)
    await anyio.to_thread.run_sync(endpoint.start)
    try:
        settings = {"AWS_ENDPOINT_URL": endpoint.url, **FAKE_CREDENTIALS}
        print(f"S3 + DynamoDB (moto) on {endpoint.url}; nothing is kept once it stops.")
        print("Point deltalog at it (in another shell):")
        print("export " + " ".join(f"{name}={value}" for name, value in settings.items()))
        print("SIGINT (Ctrl-C) or SIGTERM stops it", flush=True)
        async with anyio.create_task_group() as tg:
            await tg.start(stop_on_signal, tg.cancel_scope)
            await anyio.sleep_forever()
    finally:
        await anyio.to_thread.run_sync(endpoint.stop)
    print("endpoint stopped", file=sys.stderr)
    return 0


def register(commands: Any) -> None:
    """Add ``endpoint`` to the ``deltalog`` parser."""
    endpoint = commands.add_parser(
        "endpoint", help="run a local S3 + DynamoDB endpoint (moto) until stopped"
    )
    endpoint.add_argument(
        "--port", type=int, default=4566, help="the port (default 4566; 0 picks a free one)"
    )
    endpoint.add_argument(
        "--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)"
    )
    endpoint.set_defaults(run=cmd_endpoint)
