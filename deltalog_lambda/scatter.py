"""The query function's fan-out mode: one invocation per shard, none holding every shard.

With ``DELTALOG_QUERY_FANOUT=true`` a request on a sharded log is **routed**:

1. the router reads the layout and every shard's state (one query) and takes
   the **cut** ``H``: the greatest committed shard hwm (``deltalog.shards``);
   query texts are embedded here, once;
2. it asks one invocation of the function itself per shard (Lambda's
   ``Invoke``, synchronous; ``AWS_LAMBDA_FUNCTION_NAME``) with
   ``{"deltalog_shard": {"shard", "generation", "cut", "request"}}``: that
   invocation opens a reader of its shard alone (its checkpoint in its own
   ``/tmp``), shows it at ``H`` at least (``Reader.floor``) and answers
   ``{"cut", "answer"}``;
3. every shard must answer at one cut: a shard that committed past ``H``
   meanwhile answers at its own hwm, and the others are asked again at
   the greatest (``ROUNDS`` times at most, else ``Unavailable``: retry);
4. the answers merge as one index's would: the nearest of the shards'
   nearest (``merge_nearest``), or a get's rows in shard order, cut at
   ``limit``.

A shard invocation's failure fails the request (``Unavailable`` for an
outage of Lambda, the shard's own error otherwise), never a partial answer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any, Protocol

import anyio
import msgspec

from deltalog.config import LogConfig
from deltalog.errors import DataError, InvalidInput, Unavailable
from deltalog.keys import Shard
from deltalog.log import DeltaLog
from deltalog.reader import Reader
from deltalog.shards import current_shards, cut, merge_nearest, read_states
from deltalog.storage.aws import client

__all__ = [
    "ROUNDS",
    "Invoker",
    "LambdaInvoker",
    "ShardAsk",
    "answer_shard",
    "open_invoker",
    "parse_ask",
    "scatter",
]

ROUNDS = 3
"""How many times the shards are asked before their cuts agree."""
SHARD_KEY = "deltalog_shard"
"""The key of a shard invocation's event."""
_CALLERS_ERRORS = {"InvalidInput", "ValidationError", "DimensionMismatch"}


class ShardAsk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a router asks one shard's invocation."""

    shard: int
    generation: int
    cut: int
    request: dict[str, Any]
    """The query request (``deltalog_lambda.query.QueryRequest``'s fields), texts embedded."""


class Invoker(Protocol):
    """Invokes the function itself with a payload and returns its answer."""

    async def __call__(self, payload: dict[str, Any]) -> dict[str, Any]: ...


class LambdaInvoker:
    """Lambda's ``Invoke`` (synchronous) of one function, through a Lambda client."""

    def __init__(self, function: str, lambda_client: Any) -> None:
        self.function = function
        self.client = lambda_client

    async def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = await self.client.invoke(
                FunctionName=self.function,
                InvocationType="RequestResponse",
                Payload=json.dumps(payload).encode(),
            )
            body = await answer["Payload"].read()
        except Exception as exc:
            raise Unavailable(f"could not invoke {self.function} for a shard: {exc}") from exc
        result: dict[str, Any] = json.loads(body)
        if answer.get("FunctionError"):
            message = str(result.get("errorMessage", ""))[:1000]
            if result.get("errorType") in _CALLERS_ERRORS:  # the request's fault: a 400
                raise InvalidInput(message)
            raise Unavailable(f"a shard's invocation of {self.function} failed: {message}")
        return result


@asynccontextmanager
async def open_invoker(function: str, config: LogConfig) -> AsyncIterator[LambdaInvoker]:
    """A ``LambdaInvoker`` with its own client (region from ``config``; the endpoint
    botocore's own settings give Lambda, not the log's)."""
    async with AsyncExitStack() as stack:
        plain = replace(config, endpoint_url=None, dynamodb_endpoint_url=None)
        yield LambdaInvoker(function, await client(stack, plain, "lambda"))


async def scatter(
    opened: DeltaLog, invoke: Invoker, request: dict[str, Any], *, n_results: int | None
) -> dict[str, Any]:
    """The answer of every shard of a sharded log as one; see the module docstring.

    ``n_results`` is a query's (None: a get, whose ``limit`` is in ``request``).
    """
    layout = await opened.table.read_layout(opened.keys.log_id)
    shards = [s for s in current_shards(layout) if s is not None]
    if not shards:
        raise InvalidInput("the log has no shards: ask it directly", log=opened.config.log)
    states = await read_states(opened.table, opened.keys, shards)
    at = cut(layout, states)
    answers: dict[int, dict[str, Any]] = {}
    for _ in range(ROUNDS):
        stale = [s for s in shards if answers.get(s.index, {}).get("cut") != at]
        if not stale:
            return _merged([answers[s.index]["answer"] for s in shards], request, n_results)
        asked = await _ask(invoke, stale, at, request)
        answers.update(asked)
        at = max(answer["cut"] for answer in answers.values())
    raise Unavailable(
        "the shards kept committing while they were asked: ask again", log=opened.config.log
    )


async def _ask(
    invoke: Invoker, shards: Sequence[Shard], at: int, request: dict[str, Any]
) -> dict[int, dict[str, Any]]:
    answers: dict[int, dict[str, Any]] = {}

    async def one(shard: Shard) -> None:
        ask = ShardAsk(shard.index, shard.generation, at, request)
        answers[shard.index] = await invoke({SHARD_KEY: msgspec.to_builtins(ask)})

    try:
        async with anyio.create_task_group() as tg:
            for shard in shards:
                tg.start_soon(one, shard)
    except BaseExceptionGroup as group:  # one shard's error, as itself
        raise group.exceptions[0] from None
    return answers


def _merged(
    answers: list[dict[str, Any]], request: dict[str, Any], n_results: int | None
) -> dict[str, Any]:
    if n_results is not None:
        return merge_nearest(answers, n_results)
    rows = [
        row for a in answers for row in zip(a["ids"], a["documents"], a["metadatas"], strict=True)
    ]
    limit = request.get("limit")
    rows = rows[:limit] if limit is not None else rows
    return {
        "ids": [r[0] for r in rows],
        "documents": [r[1] for r in rows],
        "metadatas": [r[2] for r in rows],
    }


def parse_ask(event: dict[str, Any]) -> ShardAsk | None:
    """The shard ask of a shard invocation's event; None for any other event."""
    raw = event.get(SHARD_KEY)
    if raw is None:
        return None
    try:
        return msgspec.convert(raw, ShardAsk)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"bad shard ask: {exc}") from exc


async def answer_shard(reader: Reader, ask: ShardAsk, answer: Any) -> dict[str, Any]:
    """A shard invocation's answer: ``answer(reader)`` at the ask's cut (or the shard's own
    hwm, when it committed past it), and that cut."""
    reader.floor = ask.cut
    result = await answer(reader)
    shown = reader.statistics()
    if shown.generation != ask.generation:
        raise Unavailable(
            f"the log was resharded (generation {shown.generation}, asked {ask.generation}): "
            "ask again"
        )
    if shown.hwm < ask.cut:
        raise DataError(f"shard {ask.shard} could not be shown at seq {ask.cut}")
    return {"cut": shown.hwm, "answer": result}
