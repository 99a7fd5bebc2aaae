"""The storage shard tests run on: the compactor tests' ``backend`` (memory and moto)."""

from tests.compactor.conftest import backend, backend_config

__all__ = ["backend", "backend_config"]
