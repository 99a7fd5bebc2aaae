"""Flags shared by the commands: where the log lives, the embedder, how output looks.

Every command takes the log's location from flags or ``DELTALOG_*``
variables, and AWS settings (region, credentials, endpoints) from the
standard AWS variables and profiles, read by botocore itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from deltalog.config import LogConfig
from deltalog.errors import DeltalogError
from deltalog.receipts.embed import EMBEDDER_KINDS

__all__ = [
    "add_embedder_flags",
    "add_location_flags",
    "add_output_flags",
    "argument",
    "config_from",
]

T = TypeVar("T")


def argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` from a parser that raises deltalog's errors: a bad value is a
    usage error (exit 2) that says what to give, not a traceback."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except DeltalogError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


def config_from(args: argparse.Namespace, log: str | None = None) -> LogConfig:
    """The ``LogConfig`` named by the location flags and the environment."""
    return LogConfig.from_env(
        bucket=args.bucket,
        table=args.table,
        log=log or args.log,
        root=args.root,
        endpoint_url=args.endpoint_url,
        region=args.region,
        profile=args.profile,
    )


def add_location_flags(parser: argparse.ArgumentParser) -> None:
    """``--bucket``, ``--table``, ``--log``, ``--root`` and the AWS settings."""
    group = parser.add_argument_group("where the log lives")
    group.add_argument("--bucket", help="S3 bucket (DELTALOG_BUCKET)")
    group.add_argument("--table", help="DynamoDB table (DELTALOG_TABLE)")
    group.add_argument("--log", help="log name (DELTALOG_LOG, default 'default')")
    group.add_argument("--root", help="key prefix inside the bucket (DELTALOG_ROOT)")
    group.add_argument(
        "--endpoint-url", help="one endpoint for S3 and DynamoDB (else AWS_ENDPOINT_URL_*)"
    )
    group.add_argument("--region", help="AWS region (else AWS_REGION / AWS_DEFAULT_REGION)")
    group.add_argument("--profile", help="AWS profile (else AWS_PROFILE)")


def add_output_flags(
    parser: argparse.ArgumentParser, *, json: bool = True, quiet: bool = True
) -> None:
    """``--json`` (machine-readable output) and ``-q/--quiet`` (no progress)."""
    if json:
        parser.add_argument("--json", action="store_true", help="print JSON")
    if quiet:
        parser.add_argument(
            "-q", "--quiet", action="store_true", help="no progress display on stderr"
        )


def add_embedder_flags(parser: argparse.ArgumentParser) -> None:
    """``--embedder auto|openai|wordllama|hash`` and ``--dim``."""
    group = parser.add_argument_group("embedder (README 'Embedders')")
    group.add_argument(
        "--embedder",
        choices=EMBEDDER_KINDS,
        default="auto",
        help="auto (default): openai if OPENAI_API_KEY is set, else wordllama (offline model); "
        "hash: offline feature hashing, for tests and machines without wordllama",
    )
    group.add_argument(
        "--dim",
        type=int,
        help="vector dimension: wordllama 64/128/256 (default 256), hash (default 384), "
        "openai 'dimensions'",
    )
