"""Secrets read at run time: the OpenAI API key and the entry signing key.

The template passes secret *names* (``DELTALOG_OPENAI_KEY_SECRET``,
``DELTALOG_OPENAI_KEY_PARAMETER``, ``DELTALOG_SIGNING_KEY_SECRET``), never
values. ``Secrets`` reads the values from AWS Secrets Manager or an SSM
SecureString parameter through Powertools' parameter providers, which cache
each value for ``max_age`` seconds, so a warm execution environment asks
once per five minutes and picks up a rotation within that time.

Errors name the secret, never its value: a missing secret, or one the role
may not read, is a ``ConfigurationError``.
"""

from __future__ import annotations

from aws_lambda_powertools.utilities.parameters import SecretsProvider, SSMProvider
from aws_lambda_powertools.utilities.parameters.exceptions import GetParameterError

from deltalog.errors import ConfigurationError
from deltalog.signing import parse_key
from deltalog_lambda.settings import Settings

__all__ = ["Secrets"]

MAX_AGE = 300
"""Seconds a secret's value is cached before it is read again."""


class Secrets:
    """The secrets a deployment names, read when first needed."""

    def __init__(self, settings: Settings, *, max_age: int = MAX_AGE) -> None:
        self.settings = settings
        self.max_age = max_age
        self._secrets: SecretsProvider | None = None
        self._parameters: SSMProvider | None = None

    def openai_key(self) -> str | None:
        """The OpenAI API key, or None when no secret or parameter is named."""
        s = self.settings
        if s.openai_key_secret:
            return self._secret(s.openai_key_secret, "DELTALOG_OPENAI_KEY_SECRET")
        if s.openai_key_parameter:
            return self._parameter(s.openai_key_parameter, "DELTALOG_OPENAI_KEY_PARAMETER")
        return None

    def signing_key(self) -> bytes | None:
        """The entry signing key, or None when no secret is named."""
        name = self.settings.signing_key_secret
        if not name:
            return None
        text = self._secret(name, "DELTALOG_SIGNING_KEY_SECRET")
        return parse_key(text, f"the secret {name} (DELTALOG_SIGNING_KEY_SECRET)")

    def _secret(self, name: str, variable: str) -> str:
        if self._secrets is None:
            self._secrets = SecretsProvider()
        try:
            value = self._secrets.get(name, max_age=self.max_age)
        except GetParameterError as exc:
            raise _unreadable("secret", name, variable, exc) from None
        return _text(value, name, variable)

    def _parameter(self, name: str, variable: str) -> str:
        if self._parameters is None:
            self._parameters = SSMProvider()
        try:
            value = self._parameters.get(name, max_age=self.max_age, decrypt=True)
        except GetParameterError as exc:
            raise _unreadable("parameter", name, variable, exc) from None
        return _text(value, name, variable)


def _text(value: object, name: str, variable: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"the secret {name} ({variable}) is empty: store the key in it")
    return value.strip()


def _unreadable(kind: str, name: str, variable: str, exc: Exception) -> ConfigurationError:
    # The provider's message is botocore's (an error code and the name), never a value.
    return ConfigurationError(
        f"cannot read the {kind} {name} ({variable}): {exc}; check that it exists and that "
        "the function's role may read it"
    )
