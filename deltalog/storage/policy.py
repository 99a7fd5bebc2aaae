"""Least-privilege IAM policy documents for the roles that touch a log.

- **producer**: create entries only with ``If-None-Match`` (put-if-absent),
  read and list entries, and update only the counter, the schema and the
  idempotency claims of its log (``dynamodb:LeadingKeys`` confines it to the
  log's partition, ``dynamodb:Attributes`` to the attributes those items
  hold). Nothing on snapshots, and it cannot write the state item's commit
  point (hwm, snapshot, lease).
- **compactor**: read entries and snapshots, create seals only if absent,
  upload snapshots in parts (multipart uploads cannot be conditioned on
  ``If-None-Match`` before their completion; snapshot keys are unique),
  delete old snapshots, and update only the state item's attributes (lease,
  hwm, snapshot, hole bookkeeping).
- **reader**: read-only: snapshots, entries (for fresh reads), the state.
- **bucket**: a bucket policy that denies unconditional writes to every
  log's ``entries/`` (``s3:if-none-match`` absent), denies deleting entries,
  and denies plain HTTP.

The templates are JSON files in ``deltalog/storage/policies``; ``render`` fills in
the bucket, table, log and account, and adds KMS statements when the log's
objects are encrypted with a customer-managed key: the roles may use the key
only through S3 (``kms:ViaService``) and only for this bucket's objects (the
``aws:s3:arn`` encryption context: the bucket's ARN with a bucket key, the
object's without); the bucket denies writes that name another key, another
encryption (``AES256``), or ``aws:kms`` without a key (which S3 would encrypt
under the AWS managed key). DynamoDB transactions
need no action of their own: each ``Update`` inside ``TransactWriteItems``
is authorised as ``dynamodb:UpdateItem``. IAM cannot condition on a sort
key, so reads are granted on the log's whole partition; writes are confined
by attribute names instead, which is why producers never use ``PutItem``.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any, Literal

from deltalog.errors import ConfigurationError
from deltalog.keys import LogKeys, valid_log_name, valid_root

__all__ = ["ROLES", "Role", "render"]

Role = Literal["producer", "compactor", "reader", "bucket"]
ROLES: tuple[Role, ...] = ("producer", "compactor", "reader", "bucket")

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_KMS_ACTIONS: dict[Role, list[str]] = {
    "producer": ["kms:GenerateDataKey", "kms:Decrypt"],
    "compactor": ["kms:GenerateDataKey", "kms:Decrypt"],
    "reader": ["kms:Decrypt"],
}


def render(
    role: str,
    *,
    bucket: str,
    table: str,
    log: str = "default",
    root: str = "",
    account: str = "*",
    region: str = "*",
    partition: str = "aws",
    kms_key_arn: str | None = None,
) -> dict[str, Any]:
    """The policy document for ``role``, ready for ``json.dumps``."""
    if role not in ROLES:
        raise ConfigurationError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    _check_names(bucket, table, log, root)
    keys = LogKeys(root, log)
    root_prefix = f"{root.strip('/')}/" if root.strip("/") else ""
    values = {
        "partition": partition,
        "bucket": bucket,
        "prefix": keys.prefix,
        "all_logs": f"{root_prefix}*/",
        "all_objects": f"{root_prefix}*",
        "log_id": keys.log_id,
        "table_arn": f"arn:{partition}:dynamodb:{region}:{account}:table/{table}",
    }
    document: dict[str, Any] = _fill(_template(role), values)
    if kms_key_arn:
        document["Statement"] += _kms_statements(role, kms_key_arn, values, region)
    return document


def _check_names(bucket: str, table: str, log: str, root: str) -> None:
    if not bucket or not table:
        raise ConfigurationError(
            "a policy needs the bucket and the table: pass --bucket and --table"
        )
    if not valid_log_name(log):
        raise ConfigurationError(f"invalid log name {log!r}")
    if not valid_root(root):
        raise ConfigurationError(f"invalid root prefix {root!r}")


def _template(role: str) -> Any:
    text = (
        resources.files("deltalog.storage").joinpath("policies", f"{role}.json").read_text("utf-8")
    )
    return json.loads(text)


def _fill(node: Any, values: dict[str, str]) -> Any:
    """Replace ``{{name}}`` in every string of a parsed template (never in raw JSON text)."""
    if isinstance(node, dict):
        return {_fill(k, values): _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(item, values) for item in node]
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], node)
    return node


_KMS_ENCRYPTIONS = ["aws:kms", "aws:kms:dsse"]


def _kms_statements(
    role: Role, key_arn: str, values: dict[str, str], region: str
) -> list[dict[str, Any]]:
    objects = "arn:{partition}:s3:::{bucket}/{all_objects}".format(**values)
    if role == "bucket":
        return [
            _deny_put(
                "DenyWritesWithoutTheLogKmsKey",
                objects,
                {
                    "StringNotEqualsIfExists": {
                        "s3:x-amz-server-side-encryption-aws-kms-key-id": key_arn
                    }
                },
            ),
            _deny_put(
                "DenyWritesUnderAnotherEncryption",
                objects,
                {"StringNotEqualsIfExists": {"s3:x-amz-server-side-encryption": _KMS_ENCRYPTIONS}},
            ),
            _deny_put(
                "DenyKmsWritesThatNameNoKey",
                objects,
                {
                    "StringEquals": {"s3:x-amz-server-side-encryption": _KMS_ENCRYPTIONS},
                    "Null": {"s3:x-amz-server-side-encryption-aws-kms-key-id": "true"},
                },
            ),
        ]
    bucket = "arn:{partition}:s3:::{bucket}".format(**values)
    return [
        {
            "Sid": "UseTheLogKmsKey",
            "Effect": "Allow",
            "Action": _KMS_ACTIONS[role],
            "Resource": key_arn,
            "Condition": {
                "StringLike": {
                    "kms:ViaService": f"s3.{region}.amazonaws.com",
                    "kms:EncryptionContext:aws:s3:arn": [
                        bucket,
                        "{}/{}*".format(bucket, values["prefix"]),
                    ],
                }
            },
        }
    ]


def _deny_put(sid: str, resource: str, condition: dict[str, Any]) -> dict[str, Any]:
    return {
        "Sid": sid,
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:PutObject",
        "Resource": resource,
        "Condition": condition,
    }
