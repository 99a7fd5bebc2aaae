"""``Handler``: what the three handlers share.

A handler is an object Lambda calls as ``handler(event, context)``: the
module-level ``handler`` function of ``ingest``, ``compact`` and ``query``
creates one per execution environment from the environment and keeps it,
so its ``Runtime`` (event loop and open resources: logs, compactors,
readers, the embedder) serves every warm invocation. ``context`` is
Lambda's: only ``get_remaining_time_in_millis()`` is used.

When a call fails with an error that is not the caller's input, the
resources are closed (``Runtime.reset``) so the next call opens them
afresh.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import AbstractAsyncContextManager, aclosing
from pathlib import Path
from typing import Any, Protocol

from compactor.runner import Compactor
from deltalog.config import LogConfig
from deltalog.log import DeltaLog
from deltalog.reader import Consistency, Reader
from deltalog.receipts.embed import Embedder, OpenAIEmbedder, make_embedder
from deltalog_lambda.runtime import Runtime
from deltalog_lambda.secrets import Secrets
from deltalog_lambda.settings import Settings

__all__ = ["Context", "Handler"]


class Context(Protocol):
    """The part of Lambda's context object the handlers use."""

    def get_remaining_time_in_millis(self) -> int: ...


class Handler:
    """Settings, secrets and the runtime of one execution environment. ``close()`` when done."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        secrets: Secrets | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env()
        self.secrets = secrets or Secrets(self.settings)
        self.runtime = runtime or Runtime()

    def close(self) -> None:
        self.runtime.close()

    @staticmethod
    def remaining(context: Context | None) -> float | None:
        """Seconds left in this invocation (None without a context: a local call)."""
        if context is None:
            return None
        return context.get_remaining_time_in_millis() / 1000.0

    # -- resources kept across invocations ---------------------------------------

    def config(self, log: str) -> LogConfig:
        return self.settings.config(log, signing_key=self.secrets.signing_key())

    def log(self, name: str) -> DeltaLog:
        config = self.config(name)
        return self.runtime.resource(("log", name), lambda: DeltaLog.open(config), version=config)

    @property
    def cache_root(self) -> Path:
        """Where each compactor keeps its snapshot cache (one directory per log)."""
        return self.settings.cache_dir / "cache"

    def compactor(self, name: str, **options: Any) -> Compactor:
        config, s = self.config(name), self.settings
        return self.runtime.resource(
            ("compactor", name),
            lambda: Compactor(
                config,
                cache_dir=self.cache_root,
                lease_ttl=s.lease_ttl,
                grace=s.grace,
                retain=s.retain,
                compression=s.compression,
                checkpoint_ratio=s.checkpoint_ratio,
                max_tail_entries=s.max_tail_entries,
                max_tail_bytes=s.max_tail_bytes,
                **options,
            ),
            version=config,
        )

    def reader(self, name: str, consistency: Consistency) -> Reader:
        config = self.config(name)
        cache = self.settings.cache_dir / "cache"
        return self.runtime.resource(
            ("reader", name, consistency),
            lambda: Reader.open(config, consistency=consistency, cache_dir=cache),
            version=config,
        )

    def embedder(self) -> Embedder:
        """The configured embedder; OpenAI's key comes from the named secret or parameter."""
        s = self.settings
        key = self.secrets.openai_key() if s.embedder in ("auto", "openai") else None
        version = hashlib.sha256(key.encode()).hexdigest() if key else None

        def open_() -> AbstractAsyncContextManager[Embedder]:
            if key:
                base_url = s.env.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                embedder: Embedder = OpenAIEmbedder(
                    api_key=key, base_url=base_url, dimensions=s.embedder_dim
                )
            else:
                embedder = make_embedder(s.embedder, dim=s.embedder_dim)
            return aclosing(embedder)

        return self.runtime.resource(("embedder",), open_, version=version)
