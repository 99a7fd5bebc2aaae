"""Security: IAM policies, signed entries, server-side encryption, no secrets in logs."""

from __future__ import annotations

import json
import logging
import sys
import uuid
import weakref
import zlib
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from compactor import Compactor
from deltalog import ConfigurationError, Delta, DeltaLog, LogConfig, Upsert
from deltalog.codec import (
    FLAG_SIGNED,
    HEADER_SIZE,
    TRAILER_SIZE,
    Frame,
    batch_body,
    decode_entry,
    encode_delta,
)
from deltalog.errors import CorruptEntry, UntrustedEntry
from deltalog.receipts.embed import OpenAIEmbedder
from deltalog.signing import Signer, Verifier, key_id
from deltalog.storage import aws
from deltalog.storage.aws import client
from deltalog.storage.policy import ROLES, render
from deltalog.storage.store import MemoryStore
from deltalog.storage.table import MemoryTable
from tests.builders import delete, delta
from tests.commands import deltalog
from tests.compaction import committed_state
from tests.http_stubs import StubServer, forwarding
from tests.openai_server import OpenAIServer

MEMORY = LogConfig(bucket="memory", table="memory", log="mem")
KEY = bytes.fromhex("a1" * 32)
NEW_KEY = bytes.fromhex("b2" * 32)
STATE_ATTRIBUTES = {"hwm", "snapshot_key", "snapshot_sha256", "owner", "token", "expires_at"}


# -- IAM policies -----------------------------------------------------------------------


def statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    assert document["Version"] == "2012-10-17"
    found: list[dict[str, Any]] = document["Statement"]
    return found


def listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def actions(document: dict[str, Any]) -> set[str]:
    return {a for s in statements(document) for a in listed(s["Action"])}


def allowing(document: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in statements(document) if action in listed(s["Action"])]


def policy(role: str, **changes: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "bucket": "receipts-bucket",
        "table": "deltalog",
        "log": "receipts",
        "root": "prod",
        "account": "123456789012",
        "region": "eu-west-1",
    }
    settings.update(changes)
    return render(role, **settings)


TABLE_ARN = "arn:aws:dynamodb:eu-west-1:123456789012:table/deltalog"
ENTRIES = "arn:aws:s3:::receipts-bucket/prod/receipts/entries/*"
SNAPSHOTS = "arn:aws:s3:::receipts-bucket/prod/receipts/snapshots/*"


def dynamo_conditions(document: dict[str, Any], table: str = TABLE_ARN) -> list[dict[str, Any]]:
    found = [s for s in statements(document) if listed(s["Action"])[0].startswith("dynamodb:")]
    assert found and all(s["Resource"] == table for s in found)
    return [s["Condition"] for s in found]


def leading_keys(condition: dict[str, Any]) -> list[str]:
    keys: list[str] = condition["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"]
    return keys


def test_producer_policy_creates_entries_only_if_absent_and_never_touches_the_state() -> None:
    doc = policy("producer")
    assert actions(doc) == {
        "s3:PutObject",
        "s3:GetObject",
        "s3:ListBucket",
        "dynamodb:UpdateItem",
        "dynamodb:GetItem",
        "dynamodb:BatchGetItem",
    }
    (put,) = allowing(doc, "s3:PutObject")
    assert put["Resource"] == ENTRIES
    assert put["Condition"] == {"Null": {"s3:if-none-match": "false"}}
    (get,) = allowing(doc, "s3:GetObject")
    assert get["Resource"] == ENTRIES
    (lister,) = allowing(doc, "s3:ListBucket")
    assert lister["Resource"] == "arn:aws:s3:::receipts-bucket"
    assert lister["Condition"] == {"StringLike": {"s3:prefix": "prod/receipts/entries/*"}}
    assert "snapshots" not in json.dumps(doc)
    for condition in dynamo_conditions(doc):
        assert leading_keys(condition) == ["prod/receipts"]
    (update,) = allowing(doc, "dynamodb:UpdateItem")
    writable = set(update["Condition"]["ForAllValues:StringLike"]["dynamodb:Attributes"])
    assert {"next_seq", "dim#*", "seq", "entry_id"} <= writable
    assert not writable & STATE_ATTRIBUTES
    assert not {"dynamodb:PutItem", "dynamodb:DeleteItem", "s3:DeleteObject"} & actions(doc)


def test_compactor_policy_seals_only_if_absent_and_writes_only_the_state() -> None:
    doc = policy("compactor")
    seal, publish = allowing(doc, "s3:PutObject")
    assert seal["Resource"] == ENTRIES
    assert seal["Condition"] == {"Null": {"s3:if-none-match": "false"}}
    # Snapshots stream as multipart uploads: S3 authorises CreateMultipartUpload and
    # UploadPart as s3:PutObject with no If-None-Match to condition on (only the
    # completion carries it), and snapshot keys are unique: not conditioned.
    assert publish["Resource"] == SNAPSHOTS
    assert publish["Action"] == ["s3:PutObject", "s3:AbortMultipartUpload"]
    (prune,) = allowing(doc, "s3:DeleteObject")
    assert prune["Resource"] == SNAPSHOTS, "entries are never deleted"
    (update,) = allowing(doc, "dynamodb:UpdateItem")
    writable = set(update["Condition"]["ForAllValues:StringEquals"]["dynamodb:Attributes"])
    assert writable >= STATE_ATTRIBUTES
    assert not writable & {"next_seq", "seq", "entry_id"}
    for condition in dynamo_conditions(doc):
        assert leading_keys(condition) == ["prod/receipts"]


def test_reader_policy_is_read_only() -> None:
    doc = policy("reader")
    assert actions(doc) == {"s3:GetObject", "s3:ListBucket", "dynamodb:GetItem", "dynamodb:Query"}
    (get,) = allowing(doc, "s3:GetObject")
    assert sorted(get["Resource"]) == [ENTRIES, SNAPSHOTS]


def test_bucket_policy_refuses_unconditional_entry_writes_and_deletes() -> None:
    doc = policy("bucket")
    by_sid = {s["Sid"]: s for s in statements(doc)}
    deny = by_sid["DenyUnconditionalEntryWrites"]
    assert (deny["Effect"], deny["Principal"], deny["Action"]) == ("Deny", "*", "s3:PutObject")
    assert deny["Resource"] == "arn:aws:s3:::receipts-bucket/prod/*/entries/*"
    assert deny["Condition"] == {"Null": {"s3:if-none-match": "true"}}
    assert by_sid["DenyEntryDeletes"]["Action"] == "s3:DeleteObject"
    assert by_sid["DenyInsecureTransport"]["Condition"] == {
        "Bool": {"aws:SecureTransport": "false"}
    }
    assert all(s["Effect"] == "Deny" for s in statements(doc))


def test_a_kms_key_adds_its_statements() -> None:
    arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    for role, wanted in (
        ("producer", ["kms:GenerateDataKey", "kms:Decrypt"]),
        ("compactor", ["kms:GenerateDataKey", "kms:Decrypt"]),
        ("reader", ["kms:Decrypt"]),
    ):
        (kms,) = [s for s in statements(policy(role, kms_key_arn=arn)) if s["Resource"] == arn]
        assert kms["Action"] == wanted, role
        # Through S3 only, for this bucket's objects only (bucket key: the bucket's ARN).
        like = kms["Condition"]["StringLike"]
        assert like["kms:ViaService"].startswith("s3.")
        context = like["kms:EncryptionContext:aws:s3:arn"]
        assert context == [
            "arn:aws:s3:::receipts-bucket",
            "arn:aws:s3:::receipts-bucket/prod/receipts/*",
        ]
    denies = {
        s["Sid"]: s["Condition"]
        for s in statements(policy("bucket", kms_key_arn=arn))
        if s["Sid"] != "DenyInsecureTransport" and "entries" not in s["Resource"]
    }
    kms_ = ["aws:kms", "aws:kms:dsse"]
    assert denies == {
        # another key named
        "DenyWritesWithoutTheLogKmsKey": {
            "StringNotEqualsIfExists": {"s3:x-amz-server-side-encryption-aws-kms-key-id": arn}
        },
        # another encryption (SSE=AES256 got past the key-id deny: it names no key)
        "DenyWritesUnderAnotherEncryption": {
            "StringNotEqualsIfExists": {"s3:x-amz-server-side-encryption": kms_}
        },
        # aws:kms without a key: S3 would use the AWS managed key
        "DenyKmsWritesThatNameNoKey": {
            "StringEquals": {"s3:x-amz-server-side-encryption": kms_},
            "Null": {"s3:x-amz-server-side-encryption-aws-kms-key-id": "true"},
        },
    }


def test_a_policy_without_root_and_an_unknown_role() -> None:
    doc = render("producer", bucket="b", table="t", log="receipts")
    (put,) = allowing(doc, "s3:PutObject")
    assert put["Resource"] == "arn:aws:s3:::b/receipts/entries/*"
    assert leading_keys(dynamo_conditions(doc, "arn:aws:dynamodb:*:*:table/t")[0]) == ["receipts"]
    with pytest.raises(ConfigurationError, match="unknown role 'admin'"):
        render("admin", bucket="b", table="t")
    with pytest.raises(ConfigurationError, match="invalid log name"):
        render("producer", bucket="b", table="t", log="../x")


async def test_identity_policies_pass_iam_validation(endpoint: str) -> None:
    """moto's IAM checks policy grammar: actions, ARNs, condition operators."""
    async with AsyncExitStack() as stack:
        config = LogConfig(bucket="b", table="t", endpoint_url=endpoint)
        iam = await client(stack, config, "iam")
        for role in ("producer", "compactor", "reader"):
            doc = policy(role, kms_key_arn="arn:aws:kms:eu-west-1:123456789012:key/k")
            name = f"deltalog-{role}-{id(doc)}"
            made = await iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(doc))
            assert made["Policy"]["PolicyName"] == name


async def test_policy_command_prints_the_json() -> None:
    env = {"PATH": "/usr/bin:/bin", "DELTALOG_ROOT": "prod"}
    flags = "--role producer --bucket b --table t --log receipts --account 123456789012"
    done = await anyio.run_process(
        [sys.executable, "-m", "deltalog", "policy", *flags.split(), "--region", "eu-west-1"],
        env=env,
    )
    printed = json.loads(done.stdout)
    assert printed == render(
        "producer",
        bucket="b",
        table="t",
        log="receipts",
        root="prod",
        account="123456789012",
        region="eu-west-1",
    )
    assert set(ROLES) == {"producer", "compactor", "reader", "bucket"}


# -- signed entries -----------------------------------------------------------------------


async def raw_entry(store: MemoryStore, seq: int) -> bytes:
    stored = await store.get(MEMORY.keys.entry(seq))
    assert stored is not None
    return stored.data


async def read_seqs(config: LogConfig, store: MemoryStore, table: MemoryTable) -> list[int]:
    async with DeltaLog.open(config, store=store, table=table) as log:
        return [seq async for seq, _entry in log.read()]


async def test_signed_entries_carry_the_flag_and_the_key_id(rng: np.random.Generator) -> None:
    store, table = MemoryStore(), MemoryTable()
    signed = replace(MEMORY, signing_key=KEY)
    async with DeltaLog.open(signed, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        async with log.producer(linger_ms=1) as producer:
            await producer.submit(delta(rng, "b"))
    for seq in (1, 2):
        data = await raw_entry(store, seq)
        length = int.from_bytes(data[16:20], "little")
        assert data[5] == FLAG_SIGNED and len(data) == HEADER_SIZE + length + TRAILER_SIZE
        assert data[HEADER_SIZE + length : HEADER_SIZE + length + 8] == key_id(KEY)
        decode_entry(data, seq=seq)  # a reader without keys reads signed entries too
    assert await read_seqs(signed, store, table) == [1, 2]
    assert await read_seqs(MEMORY, store, table) == [1, 2]


def test_every_byte_of_a_signed_entry_is_covered() -> None:
    """Flip any bit of a signed entry, fix both CRCs: verification still refuses it."""
    body = batch_body("e", [encode_delta(delete("a", "b"))], producer_id="p", created_at=1.0)
    data = Frame(body).at(7, signer=Signer(KEY))
    verifier = Verifier.of([KEY])
    assert decode_entry(data, seq=7, verifier=verifier).deltas[0].ops[0].ids == ["a", "b"]
    for at in range(len(data)):
        if 20 <= at < HEADER_SIZE:
            continue  # the two CRCs: recomputed below, so a flip there undoes itself
        damaged = bytearray(data)
        damaged[at] ^= 0x01
        length = int.from_bytes(damaged[16:20], "little")
        damaged[20:24] = zlib.crc32(damaged[HEADER_SIZE : HEADER_SIZE + length]).to_bytes(
            4, "little"
        )
        damaged[24:28] = zlib.crc32(damaged[:24]).to_bytes(4, "little")
        with pytest.raises(CorruptEntry) as refused:
            decode_entry(bytes(damaged), seq=7, verifier=verifier)
        body_end = len(data) - TRAILER_SIZE
        if at in (6, 7) or HEADER_SIZE <= at < body_end or at >= body_end + 8:
            # the reserved header bytes, the body, the tag: only the signature can tell
            assert "signature does not match" in str(refused.value), at
        assert refused.value.seq == 7, at


async def test_a_verifying_reader_refuses_unsigned_and_foreign_entries(
    rng: np.random.Generator,
) -> None:
    store, table = MemoryStore(), MemoryTable()
    async with DeltaLog.open(replace(MEMORY, signing_key=KEY), store=store, table=table) as log:
        await log.append(delta(rng, "a"))
    async with DeltaLog.open(MEMORY, store=store, table=table) as log:
        await log.append(delta(rng, "unsigned"))
    trusting = replace(MEMORY, verify_keys={KEY})
    with pytest.raises(UntrustedEntry) as unsigned:
        await read_seqs(trusting, store, table)
    assert (unsigned.value.seq, unsigned.value.key_id, unsigned.value.log) == (2, None, "mem")
    assert key_id(KEY).hex() in str(unsigned.value) and KEY.hex() not in str(unsigned.value)
    with pytest.raises(UntrustedEntry) as foreign:
        await read_seqs(replace(MEMORY, verify_keys={NEW_KEY}), store, table)
    assert (foreign.value.seq, foreign.value.key_id) == (1, key_id(KEY).hex())
    assert "not trusted" in str(foreign.value) and KEY.hex() not in str(foreign.value)


async def test_keys_rotate_by_trusting_both(rng: np.random.Generator) -> None:
    store, table = MemoryStore(), MemoryTable()
    for key in (KEY, NEW_KEY):
        async with DeltaLog.open(replace(MEMORY, signing_key=key), store=store, table=table) as log:
            await log.append(delta(rng, key.hex()[:4]))
    rotated = replace(MEMORY, signing_key=NEW_KEY, verify_keys={KEY})
    assert await read_seqs(rotated, store, table) == [1, 2]
    with pytest.raises(UntrustedEntry) as dropped:
        await read_seqs(replace(MEMORY, signing_key=NEW_KEY), store, table)
    assert (dropped.value.seq, dropped.value.key_id) == (1, key_id(KEY).hex())


async def test_the_compactor_signs_seals_and_stops_at_an_impostor_until_quarantined(
    rng: np.random.Generator, tmp_path: Path
) -> None:
    store, table = MemoryStore(), MemoryTable()
    signed = replace(MEMORY, signing_key=KEY)
    async with DeltaLog.open(signed, store=store, table=table) as log:
        await log.append(delta(rng, "a"))
        await table.reserve(log.keys.log_id)  # a hole at 2
        await log.append(delta(rng, "b"))
    async with DeltaLog.open(MEMORY, store=store, table=table) as impostor:
        await impostor.append(delta(rng, "impostor"))  # unsigned, at 4
    async with Compactor(signed, cache_dir=tmp_path, store=store, table=table, grace=0) as c:
        with pytest.raises(UntrustedEntry) as refused:
            await c.run_once()
        assert refused.value.seq == 4
        seal = await raw_entry(store, 2)
        assert seal[5] == FLAG_SIGNED
        assert decode_entry(seal, seq=2, verifier=signed.verifier).is_seal
        assert (await table.read_state(MEMORY.keys.log_id)).hwm == 3
        await table.quarantine(MEMORY.keys.log_id, 4, "unsigned impostor", now=0.0)
        assert (await c.run_once()).hwm_after == 4
        words = (await committed_state(c))["words"]
    assert sorted(words) == ["a#0", "a#1", "b#0", "b#1"]


def test_keys_come_from_the_environment_and_never_show() -> None:
    env = {
        "DELTALOG_BUCKET": "b",
        "DELTALOG_TABLE": "t",
        "DELTALOG_SIGNING_KEY": KEY.hex(),
        "DELTALOG_VERIFY_KEYS": f"{NEW_KEY.hex()}, {bytes(16).hex()}",
    }
    config = LogConfig.from_env(env)
    assert config.signing_key == KEY
    assert config.verify_keys == frozenset({NEW_KEY, bytes(16)})
    assert config.verifier is not None
    assert set(config.verifier.key_ids) == {key_id(k).hex() for k in (KEY, NEW_KEY, bytes(16))}
    for shown in (repr(config), str(config)):
        assert KEY.hex() not in shown and "signing_key" not in shown
    assert LogConfig(bucket="b", table="t").verifier is None
    with pytest.raises(ConfigurationError, match="a verify key is 4 bytes"):
        LogConfig(bucket="b", table="t", verify_keys={b"abcd"})
    with pytest.raises(ConfigurationError, match="collection of keys, not one key"):
        LogConfig(bucket="b", table="t", verify_keys=KEY)  # type: ignore[arg-type]


# -- server-side encryption ---------------------------------------------------------------


@pytest.mark.parametrize(("sse", "kms_key"), [("aws:kms", "alias/deltalog-test"), ("AES256", None)])
async def test_every_object_is_written_with_server_side_encryption(
    config: LogConfig,
    rng: np.random.Generator,
    tmp_path: Path,
    sse: str,
    kms_key: str | None,
) -> None:
    encrypted = replace(config, sse=sse, sse_kms_key_id=kms_key)
    async with DeltaLog.open(encrypted) as log:
        await log.append(delta(rng, "a"))
        await log.table.reserve(log.keys.log_id)  # a hole: the compactor seals it
        await log.append(delete("a#0"))
    async with Compactor(encrypted, cache_dir=tmp_path, grace=0) as compactor:
        result = await compactor.run_once()
    assert result.seals_written == 1 and result.snapshot_key is not None
    keys = [config.keys.entry(seq) for seq in (1, 2, 3)] + [result.snapshot_key]
    async with AsyncExitStack() as stack:
        s3 = await client(stack, config, "s3")
        for key in keys:
            head = await s3.head_object(Bucket=config.bucket, Key=key)
            assert head["ServerSideEncryption"] == sse, key
            assert head.get("SSEKMSKeyId") == kms_key, key


@pytest.mark.parametrize(("sse", "kms_key"), [("aws:kms", "alias/deltalog-test"), ("AES256", None)])
async def test_the_init_probe_is_written_with_server_side_encryption(
    endpoint: str, sse: str, kms_key: str | None
) -> None:
    """``deltalog init``'s probe objects carry the SSE headers, seen on the wire by a proxy."""
    bucket, table = f"sse-{uuid.uuid4().hex[:12]}", f"sse-{uuid.uuid4().hex[:12]}"
    env = {"DELTALOG_SSE": sse, "AWS_ENDPOINT_URL_DYNAMODB": endpoint}
    if kms_key:
        env["DELTALOG_SSE_KMS_KEY_ID"] = kms_key
    init = ["init", "--bucket", bucket, "--table", table]
    with StubServer(forwarding(endpoint, drop=set())) as proxy:
        run = await deltalog(*init, AWS_ENDPOINT_URL_S3=proxy.url, **env)
    assert run.code == 0, run.err
    probes = [
        (method, {name.lower(): value for name, value in headers.items()})
        for method, path, headers in proxy.requests
        if "/_deltalog/probes/" in path
    ]
    assert [method for method, _ in probes] == ["PUT", "PUT", "DELETE"], "written twice, deleted"
    for _, headers in probes[:2]:
        assert headers["if-none-match"] == "*"
        assert headers["x-amz-server-side-encryption"] == sse
        assert headers.get("x-amz-server-side-encryption-aws-kms-key-id") == kms_key


# -- no secrets or payloads in logs -------------------------------------------------------

AWS_SECRET = "deltalogTestSecretKey/0123456789abcdefXYZ"
OPENAI_KEY = "sk-deltalog-test-9f8e7d6c5b4a"
DOCUMENT = "GRAND-TOTAL-4711-private-document-text"


async def test_logs_hold_no_secrets_and_no_payloads(
    initialized: str,
    rng: np.random.Generator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every logger at DEBUG (ours, botocore, openai) through embed, append, seal, compact."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setattr(aws, "_sessions", weakref.WeakKeyDictionary())  # reads it
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    caplog.set_level(logging.DEBUG)
    config = LogConfig(
        bucket="deltalog-tests",
        table="deltalog-tests",
        log=f"secrets-{rng.integers(1 << 40)}",
        endpoint_url=initialized,
        signing_key=KEY,
    )
    with OpenAIServer(dim=8, api_key=OPENAI_KEY) as server:
        embedder = OpenAIEmbedder(base_url=server.url, dimensions=8)
        try:
            vectors = await embedder.embed([DOCUMENT, "x"])
        finally:
            await embedder.aclose()
    async with DeltaLog.open(config) as log:
        upsert = Upsert("words", ["w1", "w2"], vectors, [DOCUMENT, "x"], [{"m": DOCUMENT}] * 2)
        await log.append(Delta(ops=[upsert]))
        await log.table.reserve(log.keys.log_id)  # a hole, sealed: the compactor logs it
        await log.append(delete("w2"))
    async with Compactor(config, cache_dir=tmp_path, grace=0, retain=1) as compactor:
        await compactor.run_once()
        await compactor.run_once()
    records = caplog.records
    text = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in records)
    assert any(r.name.startswith("botocore") for r in records), "DEBUG logging was captured"
    assert any(r.name.startswith("compactor") for r in records), "our logs were captured"
    for secret in (AWS_SECRET, OPENAI_KEY, KEY.hex(), repr(KEY)[2:-1]):
        assert secret not in text
    assert DOCUMENT not in text
