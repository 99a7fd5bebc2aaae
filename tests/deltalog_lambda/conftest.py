"""The handlers' environment: what the template sets, pointed at moto's server."""

from __future__ import annotations

import pytest

from deltalog import LogConfig

NAMESPACE = "deltalog/test"
DIM = 16


@pytest.fixture
def lambda_env(config: LogConfig, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> LogConfig:
    """The environment variables the template gives the functions, for ``config``'s log."""
    assert config.endpoint_url is not None
    for name in (
        "DELTALOG_SIGNING_KEY",
        "DELTALOG_VERIFY_KEYS",
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    values = {
        "AWS_ENDPOINT_URL": config.endpoint_url,
        "AWS_REGION": "us-east-1",
        "DELTALOG_BUCKET": config.bucket,
        "DELTALOG_TABLE": config.table,
        "DELTALOG_LOG": config.log,
        "DELTALOG_LOGS": config.log,
        "DELTALOG_CACHE_DIR": f"{tmp_path}/tmp-deltalog",
        "DELTALOG_EMBEDDER": "hash",
        "DELTALOG_EMBEDDER_DIM": str(DIM),
        "POWERTOOLS_METRICS_NAMESPACE": NAMESPACE,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return config
