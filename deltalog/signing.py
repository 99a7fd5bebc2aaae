"""Optional HMAC signing of entries: who may write into a log.

- A **signing key** is a shared secret (at least 16 random bytes; 32 is
  recommended) held by trusted producers and the compactor. Writers
  configured with one sign every entry they write, seals included.
- A **key id** names a key without revealing it: the first 8 bytes of
  ``SHA-256("deltalog-key-id" || key)``, shown as 16 hex digits. Errors and
  the entry itself carry the id, never the key.
- **Trusted keys** are the keys a reader accepts signatures from: its
  ``verify_keys`` plus its own signing key. Several keys are trusted at once
  so a key can be rotated: add the new key to every reader, switch the
  writers to it, then drop the old one once every entry signed with it is
  below the committed hwm. When a reader trusts any key, it refuses unsigned
  entries and entries signed by other keys (``UntrustedEntry``).

The signature is HMAC-SHA256 over the entry's header fields (magic,
version, flags, seq, body length, body CRC), the key id and the body; it
travels after the body, with the key id (see ``deltalog.codec``). Binding the
seq means a signed entry copied to another seq fails verification.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from deltalog.errors import ConfigurationError

__all__ = [
    "KEY_ID_SIZE",
    "MIN_KEY_BYTES",
    "TAG_SIZE",
    "Signer",
    "Verifier",
    "check_key",
    "key_id",
    "parse_key",
]

KEY_ID_SIZE = 8
TAG_SIZE = 32
MIN_KEY_BYTES = 16
_KEY_ID_CONTEXT = b"deltalog-key-id"


def key_id(key: bytes) -> bytes:
    """The 8-byte id of a key; it reveals nothing about the key."""
    return hashlib.sha256(_KEY_ID_CONTEXT + key).digest()[:KEY_ID_SIZE]


def check_key(key: object, what: str) -> bytes:
    """``key`` as bytes if it is a usable signing key; never echoes it in errors."""
    if not isinstance(key, bytes | bytearray):
        raise ConfigurationError(f"{what} must be bytes, not {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"{what} is {len(key)} bytes: use at least {MIN_KEY_BYTES} random bytes "
            "(32 recommended)"
        )
    return bytes(key)


def parse_key(text: str, what: str) -> bytes:
    """A key given as hex (the ``DELTALOG_SIGNING_KEY`` form); the error never shows it."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigurationError(
            f"{what} is not hex: give the key as hex digits, e.g. from "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        ) from None
    return check_key(key, what)


@dataclass(frozen=True, slots=True)
class Signer:
    """Signs entries with one key."""

    key: bytes = field(repr=False)

    @property
    def key_id(self) -> bytes:
        return key_id(self.key)

    def tag(self, header: bytes, body: bytes | memoryview) -> bytes:
        return _tag(self.key, header, self.key_id, body)


@dataclass(frozen=True, slots=True)
class Verifier:
    """Checks signatures against a set of trusted keys, found by key id."""

    keys: Mapping[bytes, bytes] = field(repr=False)

    @classmethod
    def of(cls, keys: Iterable[bytes]) -> Verifier:
        return cls({key_id(k): k for k in keys})

    @property
    def key_ids(self) -> list[str]:
        return sorted(k.hex() for k in self.keys)

    def key_for(self, kid: bytes) -> bytes | None:
        return self.keys.get(kid)

    def matches(self, key: bytes, header: bytes, kid: bytes, body: memoryview, tag: bytes) -> bool:
        return hmac.compare_digest(_tag(key, header, kid, body), tag)


def _tag(key: bytes, header: bytes, kid: bytes, body: bytes | memoryview) -> bytes:
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(kid)
    mac.update(body)
    return mac.digest()
