"""``DynamoTable``: the table seam on DynamoDB.

One table holds every log: partition key ``pk`` (the log id), sort key
``sk`` (the item kind, see ``deltalog.keys``), on-demand billing. Every
read that decides something is strongly consistent.

Producers write only with ``UpdateItem`` (never ``PutItem``, which replaces
a whole item), so an IAM policy can confine them to the attributes they own
(``dynamodb:Attributes``) and keep them off the state item's commit point;
see ``deltalog/storage/policies``.

Every write to a log's item goes through ``_update`` (the claims'
transaction adds the same clause), which conditions it on the item's
``identity`` attribute when the log is bound (``Table.bind``), and every
read through ``_check_item``: the identity check is made there and nowhere
else, for every item kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any, ClassVar

from botocore.exceptions import ClientError

from deltalog.config import LogConfig
from deltalog.errors import (
    Closed,
    ConfigurationError,
    Conflict,
    DeltalogError,
    LeaseBusy,
    LeaseLost,
    Resharded,
    Unavailable,
)
from deltalog.keys import (
    HEAD_SK,
    IDEMPOTENCY_PREFIX,
    IDENTITY_SK,
    LAYOUT_SK,
    QUARANTINE_PREFIX,
    SCHEMA_SK,
    STATE_SK,
    idempotency_sk,
    lease_sk,
    quarantine_sk,
    version_sk,
)
from deltalog.storage.aws import Reachability, client, error_code, translate
from deltalog.storage.table import (
    Bindings,
    Claim,
    Commit,
    Layout,
    LeaseState,
    LogState,
    Retiring,
    held_until,
    identity_mismatch,
)

__all__ = ["DynamoTable"]

_TRANSACTION_LIMIT = 100
_DIM_PREFIX = "dim#"
_RETRYABLE_CANCELLATIONS = {
    "TransactionConflict",
    "ThrottlingError",
    "ProvisionedThroughputExceeded",
}


def _s(value: str) -> dict[str, str]:
    return {"S": value}


def _n(value: int | float) -> dict[str, str]:
    return {"N": str(value)}


def _item_key(log_id: str, sk: str) -> dict[str, dict[str, str]]:
    return {"pk": _s(log_id), "sk": _s(sk)}


_IDENTITY = "identity"
"""The attribute every item of a bound log carries: the log's identity."""
_IDENTITY_HOLDS = "(attribute_not_exists(#ident) OR #ident = :ident)"


def _identity_of(item: dict[str, Any]) -> str | None:
    value: str | None = item.get(_IDENTITY, {}).get("S")
    return value


def _setting_identity(update: str) -> str:
    """``update`` that also sets the item's identity (one SET clause per expression)."""
    if not update:
        return "SET #ident = :ident"
    if "SET " in update:
        return update.replace("SET ", "SET #ident = :ident, ", 1)
    return f"{update} SET #ident = :ident"


def _claim_of(item: dict[str, Any]) -> Claim:
    key = item["sk"]["S"][len(IDEMPOTENCY_PREFIX) :]
    at = float(item["claimed_at"]["N"]) if "claimed_at" in item else 0.0
    return Claim(key, int(item["seq"]["N"]), item["entry_id"]["S"], at)


class DynamoTable:
    """The table seam over one DynamoDB table."""

    def __init__(self, config: LogConfig) -> None:
        self.config = config
        self.name = config.table
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._closed = False
        self._reach = Reachability()
        self._bindings = Bindings()

    @classmethod
    async def connect(cls, config: LogConfig) -> DynamoTable:
        table = cls(config)
        table._client = await client(table._stack, config, "dynamodb", table._reach)
        return table

    async def aclose(self) -> None:
        self._closed = True
        await self._stack.aclose()

    @property
    def _db(self) -> Any:
        if self._closed or self._client is None:
            raise Closed("the DynamoDB table is closed")
        return self._client

    def _missing_table(self, what: str) -> DeltalogError:
        return ConfigurationError(
            f"{what}: table {self.name!r} does not exist; run "
            f"`deltalog init --bucket {self.config.bucket} --table {self.name}`"
        )

    def _error(self, exc: BaseException, what: str, *, ambiguous: bool) -> DeltalogError:
        return translate(
            exc,
            what,
            ambiguous=ambiguous,
            missing=self._missing_table,
            reached=self._reach.answered,
        )

    async def _call(self, method: str, what: str, *, ambiguous: bool, **kwargs: Any) -> Any:
        try:
            return await getattr(self._db, method)(TableName=self.name, **kwargs)
        except Exception as exc:
            raise self._error(exc, what, ambiguous=ambiguous) from exc

    def _check_item(self, log_id: str, item: dict[str, Any]) -> None:
        """The identity check of every item read (see ``Table.bind``)."""
        self._bindings.check(log_id, _identity_of(item))

    async def _update(
        self,
        log_id: str,
        sk: str,
        what: str,
        *,
        update: str = "",
        condition: str | None = None,
        names: dict[str, str] | None = None,
        values: dict[str, Any] | None = None,
        returns: str = "ALL_NEW",
    ) -> dict[str, Any] | None:
        """Update one item of a log; None if ``condition`` failed (nothing was written).

        Every write to a log's items comes here. When the log is bound, the
        write is also conditioned on the item's identity and records it; an
        item of another identity raises ``IdentityMismatch``, writing nothing.
        """
        names, values = dict(names or {}), dict(values or {})
        wanted, conditional = self._bindings.get(log_id), condition is not None
        if wanted is not None:
            condition = f"({condition}) AND {_IDENTITY_HOLDS}" if condition else _IDENTITY_HOLDS
            update = _setting_identity(update)
            names["#ident"] = _IDENTITY
            values[":ident"] = _s(wanted)
        kwargs: dict[str, Any] = {"UpdateExpression": update, "ReturnValues": returns}
        if condition:
            kwargs["ConditionExpression"] = condition
            kwargs["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"  # to tell whose it is
        if names:
            kwargs["ExpressionAttributeNames"] = names
        if values:
            kwargs["ExpressionAttributeValues"] = values
        try:
            answer = await self._db.update_item(
                TableName=self.name, Key=_item_key(log_id, sk), **kwargs
            )
        except ClientError as exc:
            if error_code(exc) != "ConditionalCheckFailedException":
                raise self._error(exc, what, ambiguous=True) from exc
            self._check_item(log_id, exc.response.get("Item", {}))  # another identity's?
            if wanted is not None and not conditional:  # only the identity's could fail
                raise identity_mismatch(log_id, None, wanted) from exc
            return None
        except Exception as exc:
            raise self._error(exc, what, ambiguous=True) from exc
        attributes: dict[str, Any] = answer.get("Attributes", {})
        return attributes

    async def read_identity(self, log_id: str) -> str | None:
        return _identity_of(await self._get(log_id, IDENTITY_SK, "read the log's identity"))

    async def bind(self, log_id: str, identity: str, *, record: bool) -> bool:
        self._bindings.add(log_id, identity)
        if not record:
            return False
        try:
            old = await self._update(
                log_id, IDENTITY_SK, "record the log's identity", returns="ALL_OLD"
            )
        except BaseException:
            self._bindings.discard(log_id, identity)
            raise
        return old is not None and _IDENTITY not in old

    async def reserve(self, log_id: str) -> int:
        answer = await self._update(
            log_id,
            HEAD_SK,
            "reserve a seq",
            update="ADD next_seq :one",
            values={":one": _n(1)},
            returns="UPDATED_NEW",
        )
        assert answer is not None  # no condition but the identity's, which raises
        return int(answer["next_seq"]["N"])

    async def _get(self, log_id: str, sk: str, what: str) -> dict[str, Any]:
        answer = await self._call(
            "get_item", what, ambiguous=False, Key=_item_key(log_id, sk), ConsistentRead=True
        )
        item: dict[str, Any] = answer.get("Item", {})
        self._check_item(log_id, item)
        return item

    async def read_head(self, log_id: str) -> int:
        item = await self._get(log_id, HEAD_SK, "read the head")
        return int(item["next_seq"]["N"]) if "next_seq" in item else 0

    async def record_dim(self, log_id: str, collection: str, dim: int) -> int:
        answer = await self._update(
            log_id,
            SCHEMA_SK,
            "record a collection's dimension",
            update="SET #d = if_not_exists(#d, :d)",
            names={"#d": f"{_DIM_PREFIX}{collection}"},
            values={":d": _n(dim)},
        )
        assert answer is not None  # no condition but the identity's, which raises
        return int(answer[f"{_DIM_PREFIX}{collection}"]["N"])

    async def read_dims(self, log_id: str) -> dict[str, int]:
        item = await self._get(log_id, SCHEMA_SK, "read the schema")
        return {
            name[len(_DIM_PREFIX) :]: int(value["N"])
            for name, value in item.items()
            if name.startswith(_DIM_PREFIX)
        }

    async def advance_version(self, log_id: str, subject: str, version: int) -> int:
        what = f"record version {version} of {subject}"
        advanced = await self._update(
            log_id,
            version_sk(subject),
            what,
            update="SET version = :v",
            condition="attribute_not_exists(version) OR version <= :v",
            values={":v": _n(version)},
            returns="NONE",
        )
        if advanced is not None:
            return version
        item = await self._get(log_id, version_sk(subject), what)
        return max(version, int(item["version"]["N"]))  # versions only ever grow

    async def claim_keys(self, log_id: str, claims: Sequence[Claim]) -> dict[str, Claim]:
        held: dict[str, Claim] = {}
        for start in range(0, len(claims), _TRANSACTION_LIMIT):
            held.update(
                await self._claim_chunk(log_id, list(claims[start : start + _TRANSACTION_LIMIT]))
            )
        return held

    async def _claim_chunk(self, log_id: str, claims: list[Claim]) -> dict[str, Claim]:
        held: dict[str, Claim] = {}
        pending = claims
        while pending:
            failed = set(await self._try_claims(log_id, pending))
            if not failed:
                break
            existing = await self.get_claims(log_id, sorted(failed))
            for claim in pending:
                other = existing.get(claim.key)
                if claim.key in failed and other is not None and other.entry_id != claim.entry_id:
                    held[claim.key] = other
            # The transaction was cancelled as a whole: the rest try again.
            pending = [c for c in pending if c.key not in failed]
        return held

    async def _try_claims(self, log_id: str, claims: list[Claim]) -> list[str]:
        """Write all claims in one transaction; return the keys whose condition failed.

        A bound log's claims are conditioned on their identity as in ``_update``;
        a key that fails on it is read back by the caller, which raises.
        """
        wanted = self._bindings.get(log_id)
        update, condition = "SET seq = :s, entry_id = :e, claimed_at = :t", "entry_id = :e"
        condition = f"(attribute_not_exists(pk) OR {condition})"
        guard: dict[str, Any] = {}
        if wanted is not None:
            update, condition = _setting_identity(update), f"{condition} AND {_IDENTITY_HOLDS}"
            guard = {"ExpressionAttributeNames": {"#ident": _IDENTITY}}
        items = [
            {
                "Update": {
                    "TableName": self.name,
                    "Key": _item_key(log_id, idempotency_sk(c.key)),
                    "UpdateExpression": update,
                    "ConditionExpression": condition,
                    "ExpressionAttributeValues": {
                        ":s": _n(c.seq),
                        ":e": _s(c.entry_id),
                        ":t": _n(c.claimed_at),
                        **({":ident": _s(wanted)} if wanted is not None else {}),
                    },
                    **guard,
                }
            }
            for c in claims
        ]
        try:
            await self._db.transact_write_items(TransactItems=items)
        except ClientError as exc:
            if error_code(exc) != "TransactionCanceledException":
                raise self._error(exc, "claim idempotency keys", ambiguous=True) from exc
            reasons = exc.response.get("CancellationReasons", [])
            failed = [
                c.key
                for c, r in zip(claims, reasons, strict=False)
                if r.get("Code") == "ConditionalCheckFailed"
            ]
            if failed:
                return failed
            codes = {r.get("Code") for r in reasons} - {"None", None}
            if codes and codes <= _RETRYABLE_CANCELLATIONS:
                # A concurrent transaction on the same key, or throttling: a
                # cancelled transaction wrote nothing, so retrying is safe.
                raise Unavailable(
                    f"claim idempotency keys: transaction cancelled ({', '.join(sorted(codes))})",
                    log=log_id,
                ) from exc
            raise self._error(exc, "claim idempotency keys", ambiguous=True) from exc
        except Exception as exc:
            raise self._error(exc, "claim idempotency keys", ambiguous=True) from exc
        return []

    async def get_claims(self, log_id: str, keys: Sequence[str]) -> dict[str, Claim]:
        found: dict[str, Claim] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _TRANSACTION_LIMIT):
            request: dict[str, Any] = {
                self.name: {
                    "Keys": [
                        _item_key(log_id, idempotency_sk(k))
                        for k in unique[start : start + _TRANSACTION_LIMIT]
                    ],
                    "ConsistentRead": True,
                }
            }
            while request:
                try:
                    answer = await self._db.batch_get_item(RequestItems=request)
                except Exception as exc:
                    raise self._error(exc, "read idempotency claims", ambiguous=False) from exc
                for item in answer.get("Responses", {}).get(self.name, []):
                    self._check_item(log_id, item)
                    claim = _claim_of(item)
                    found[claim.key] = claim
                request = answer.get("UnprocessedKeys") or {}
        return found

    async def replace_claim(self, log_id: str, old: Claim, new: Claim) -> bool:
        swapped = await self._update(
            log_id,
            idempotency_sk(new.key),
            "replace an idempotency claim",
            update="SET seq = :n, entry_id = :f, claimed_at = :t",
            # The second clause makes a retried swap (answer lost) succeed.
            condition="(seq = :s AND entry_id = :e) OR (seq = :n AND entry_id = :f)",
            values={
                ":s": _n(old.seq),
                ":e": _s(old.entry_id),
                ":n": _n(new.seq),
                ":f": _s(new.entry_id),
                ":t": _n(new.claimed_at),
            },
            returns="NONE",
        )
        return swapped is not None

    async def read_state(self, log_id: str, *, sk: str = STATE_SK) -> LogState:
        item = await self._get(log_id, sk, "read the state")
        return _state_of(item)

    async def _update_state(
        self,
        log_id: str,
        what: str,
        *,
        condition: str,
        sk: str = STATE_SK,
        update: str,
        names: dict[str, str],
        values: dict[str, Any],
    ) -> dict[str, Any] | None:
        """A conditional update of the state item (or another); None if the condition failed."""
        return await self._update(
            log_id, sk, what, update=update, condition=condition, names=names, values=values
        )

    async def _lost(self, log_id: str, token: int, what: str, sk: str = STATE_SK) -> LeaseLost:
        state = await self.read_state(log_id, sk=sk)
        if state.retired_by:
            return _retired(log_id, sk, state)
        return LeaseLost(
            f"{what}: lease lost (now held by {state.owner} with token {state.token}, "
            f"ours was {token}); stop: a newer compactor owns this log",
            log=log_id,
        )

    async def _take(
        self,
        log_id: str,
        sk: str,
        what: str,
        owner: str,
        *,
        ttl: float,
        now: float,
        current: str = "",
    ) -> dict[str, Any] | None:
        """Take a lease item if free or expired, adding one to its token; None if held.

        ``current`` is a further condition (a state item must not be retired).
        """
        return await self._update_state(
            log_id,
            what,
            sk=sk,
            # DynamoDB refuses redundant parentheses (``_update`` adds its own)
            condition=f"(attribute_not_exists(#owner) OR #exp <= :now){current}"
            if current
            else "attribute_not_exists(#owner) OR #exp <= :now",
            update="SET #owner = :owner, #exp = :exp, updated_at = :now ADD #token :one",
            names={"#owner": "owner", "#exp": "expires_at", "#token": "token"},
            values={
                ":owner": _s(owner),
                ":exp": _n(now + ttl),
                ":now": _n(now),
                ":one": _n(1),
            },
        )

    async def _extend(
        self,
        log_id: str,
        sk: str,
        what: str,
        owner: str,
        token: int,
        *,
        ttl: float,
        now: float,
        current: str = "",
    ) -> dict[str, Any] | None:
        """Extend a lease item held by (owner, token); None if it is not."""
        return await self._update_state(
            log_id,
            what,
            sk=sk,
            condition=f"{self._HELD}{current}",
            update="SET expires_at = :exp, updated_at = :now",
            names=self._HELD_NAMES,
            values={
                **self._held_values(owner, token),
                ":exp": _n(now + ttl),
                ":now": _n(now),
            },
        )

    async def acquire(
        self, log_id: str, owner: str, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> LogState:
        item = await self._take(
            log_id, sk, "acquire the lease", owner, ttl=ttl, now=now, current=_CURRENT
        )
        if item is None:
            state = await self.read_state(log_id, sk=sk)
            if state.retired_by:
                raise _retired(log_id, sk, state)
            raise LeaseBusy(
                f"the lease is {held_until(state.owner, state.expires_at, now)}", log=log_id
            )
        return _state_of(item)

    _HELD = "#owner = :owner AND #token = :token"
    _HELD_NAMES: ClassVar[dict[str, str]] = {"#owner": "owner", "#token": "token"}

    def _held_values(self, owner: str, token: int) -> dict[str, Any]:
        return {":owner": _s(owner), ":token": _n(token)}

    async def renew(
        self, log_id: str, owner: str, token: int, *, ttl: float, now: float, sk: str = STATE_SK
    ) -> None:
        item = await self._extend(
            log_id, sk, "renew the lease", owner, token, ttl=ttl, now=now, current=_CURRENT
        )
        if item is None:
            raise await self._lost(log_id, token, "renew", sk)

    async def commit(
        self,
        log_id: str,
        owner: str,
        token: int,
        *,
        prev_hwm: int,
        commit: Commit,
        now: float,
        sk: str = STATE_SK,
    ) -> LogState:
        hwm_matches = "hwm = :prev" if prev_hwm else "(attribute_not_exists(hwm) OR hwm = :prev)"
        sets, values = _commit_sets(commit)
        item = await self._update_state(
            log_id,
            "commit",
            sk=sk,
            condition=f"{self._HELD} AND {hwm_matches}{_CURRENT}",
            update=f"SET {', '.join(sets)}",
            names=self._HELD_NAMES,
            values={
                **self._held_values(owner, token),
                ":prev": _n(prev_hwm),
                ":now": _n(now),
                **values,
            },
        )
        if item is not None:
            return _state_of(item)
        state = await self.read_state(log_id, sk=sk)
        if state.retired_by:
            raise _retired(log_id, sk, state)
        if state.owner == owner and state.token == token:
            raise Conflict(f"commit refused: hwm moved from {prev_hwm} to {state.hwm}", log=log_id)
        raise await self._lost(log_id, token, "commit", sk)

    async def release(
        self, log_id: str, owner: str, token: int, *, last_run: str = "", sk: str = STATE_SK
    ) -> bool:
        run = ", last_run = :run" if last_run else ""
        item = await self._update_state(
            log_id,
            "release the lease",
            sk=sk,
            condition=self._HELD,
            update=f"REMOVE #owner SET expires_at = :zero{run}",
            names=self._HELD_NAMES,
            values={
                **self._held_values(owner, token),
                ":zero": _n(0),
                **({":run": _s(last_run)} if last_run else {}),
            },
        )
        return item is not None

    async def note_hole(
        self, log_id: str, owner: str, token: int, *, seq: int, now: float, sk: str = STATE_SK
    ) -> float:
        state = await self.read_state(log_id, sk=sk)
        if state.owner != owner or state.token != token:
            raise await self._lost(log_id, token, "note a hole", sk)
        if state.hole_seq == seq:
            return state.hole_first_seen
        item = await self._update_state(
            log_id,
            "note a hole",
            sk=sk,
            condition=self._HELD,
            update="SET hole_seq = :seq, hole_first_seen = :now",
            names=self._HELD_NAMES,
            values={
                **self._held_values(owner, token),
                ":seq": _n(seq),
                ":now": _n(now),
            },
        )
        if item is None:
            raise await self._lost(log_id, token, "note a hole", sk)
        return now

    async def read_states(self, log_id: str, prefix: str) -> dict[str, LogState]:
        found: dict[str, LogState] = {}
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": {":pk": _s(log_id), ":prefix": _s(prefix)},
            "ConsistentRead": True,
        }
        while True:
            answer = await self._call("query", "read the shards' states", ambiguous=False, **kwargs)
            for item in answer.get("Items", []):
                self._check_item(log_id, item)
                found[item["sk"]["S"]] = _state_of(item)
            if "LastEvaluatedKey" not in answer:
                return found
            kwargs["ExclusiveStartKey"] = answer["LastEvaluatedKey"]

    async def retire_state(self, log_id: str, *, sk: str, generation: int, now: float) -> LogState:
        item = await self._update_state(
            log_id,
            "retire a state",
            sk=sk,
            condition="attribute_not_exists(retired_by) OR retired_by = :gen",
            update="SET retired_by = :gen, updated_at = :now",
            names={},
            values={":gen": _n(generation), ":now": _n(now)},
        )
        if item is not None:
            return _state_of(item)
        state = await self.read_state(log_id, sk=sk)
        raise Conflict(
            f"the state {sk!r} was retired by generation {state.retired_by}, not {generation}",
            log=log_id,
        )

    async def read_layout(self, log_id: str) -> Layout:
        return _layout_of(await self._get(log_id, LAYOUT_SK, "read the layout"))

    async def write_layout(
        self, log_id: str, layout: Layout, *, expected: Layout, now: float
    ) -> Layout:
        names = {f"#{name}": name for name in _LAYOUT_NUMBERS}
        values: dict[str, Any] = {f":{name}": _n(getattr(layout, name)) for name in _LAYOUT_NUMBERS}
        names["#retiring"] = "retiring"
        values[":retiring"] = {"L": [_retiring_item(r) for r in layout.retiring]}
        names["#at"], values[":at"] = "updated_at", _n(now)
        if expected.stored:
            condition = "#generation = :was AND #pending_generation = :was_pending"
            values |= {
                ":was": _n(expected.generation),
                ":was_pending": _n(expected.pending_generation),
            }
        else:
            condition = "attribute_not_exists(pk)"
        item = await self._update_state(
            log_id,
            "write the layout",
            sk=LAYOUT_SK,
            condition=condition,
            update="SET " + ", ".join(f"{n} = :{n[1:]}" for n in names),
            names=names,
            values=values,
        )
        if item is None:
            stored = await self.read_layout(log_id)
            raise Conflict(
                f"the layout changed: generation {stored.generation} (pending "
                f"{stored.pending_generation}), not {expected.generation} (pending "
                f"{expected.pending_generation}); read it again",
                log=log_id,
            )
        return _layout_of(item)

    async def quarantine(self, log_id: str, seq: int, reason: str, *, now: float) -> None:
        await self._update(
            log_id,
            quarantine_sk(seq),
            "quarantine an entry",
            update="SET #reason = :reason, #at = :at",
            names={"#reason": "reason", "#at": "at"},
            values={":reason": _s(reason), ":at": _n(now)},
            returns="NONE",
        )

    async def read_quarantined(self, log_id: str) -> dict[int, str]:
        found: dict[int, str] = {}
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :prefix)",
            "ExpressionAttributeValues": {":pk": _s(log_id), ":prefix": _s(QUARANTINE_PREFIX)},
            "ConsistentRead": True,
        }
        while True:
            answer = await self._call("query", "read quarantine marks", ambiguous=False, **kwargs)
            for item in answer.get("Items", []):
                self._check_item(log_id, item)
                found[int(item["sk"]["S"][len(QUARANTINE_PREFIX) :])] = item["reason"]["S"]
            if "LastEvaluatedKey" not in answer:
                return found
            kwargs["ExclusiveStartKey"] = answer["LastEvaluatedKey"]

    async def read_lease(self, log_id: str, name: str) -> LeaseState:
        return _lease_of(await self._get(log_id, lease_sk(name), f"read the lease {name!r}"))

    async def acquire_lease(
        self, log_id: str, name: str, owner: str, *, ttl: float, now: float
    ) -> LeaseState:
        what = f"acquire the lease {name!r}"
        item = await self._take(log_id, lease_sk(name), what, owner, ttl=ttl, now=now)
        if item is None:
            lease = await self.read_lease(log_id, name)
            raise LeaseBusy(
                f"the lease {name!r} is {held_until(lease.owner, lease.expires_at, now)}",
                log=log_id,
            )
        return _lease_of(item)

    async def _lease_lost(self, log_id: str, name: str, token: int, what: str) -> LeaseLost:
        lease = await self.read_lease(log_id, name)
        return LeaseLost(
            f"{what}: lease {name!r} lost (now held by {lease.owner} with token "
            f"{lease.token}, ours was {token}); stop: a newer owner exists",
            log=log_id,
        )

    async def renew_lease(
        self, log_id: str, name: str, owner: str, token: int, *, ttl: float, now: float
    ) -> None:
        what = f"renew the lease {name!r}"
        item = await self._extend(log_id, lease_sk(name), what, owner, token, ttl=ttl, now=now)
        if item is None:
            raise await self._lease_lost(log_id, name, token, "renew")

    async def release_lease(self, log_id: str, name: str, owner: str, token: int) -> bool:
        item = await self._update_state(
            log_id,
            f"release the lease {name!r}",
            sk=lease_sk(name),
            condition=self._HELD,
            update="REMOVE #owner SET expires_at = :zero",
            names=self._HELD_NAMES,
            values={**self._held_values(owner, token), ":zero": _n(0)},
        )
        return item is not None

    async def ensure_table(self) -> bool:
        """Create the table if it is missing; True if it was created."""
        try:
            await self._db.describe_table(TableName=self.name)
            return False
        except ClientError as exc:
            if error_code(exc) != "ResourceNotFoundException":
                raise self._error(exc, "describe table", ambiguous=False) from exc
        except Exception as exc:
            raise self._error(exc, "describe table", ambiguous=False) from exc
        await self._call(
            "create_table",
            "create table",
            ambiguous=False,
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        waiter = self._db.get_waiter("table_exists")
        await waiter.wait(TableName=self.name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        return True


_CURRENT = " AND attribute_not_exists(retired_by)"
"""The condition every acquire, renewal and commit of a state item adds: not retired."""
_LAYOUT_NUMBERS = ("shards", "generation", "pending_shards", "pending_generation", "floor")


def _retired(log_id: str, sk: str, state: LogState) -> Resharded:
    return Resharded(
        f"the state {sk!r} was retired by layout generation {state.retired_by} (the log was "
        "resharded): read the layout again and use its shards",
        generation=state.retired_by,
        log=log_id,
    )


def _retiring_item(retiring: Retiring) -> dict[str, Any]:
    return {
        "M": {
            "generation": _n(retiring.generation),
            "shards": _n(retiring.shards),
            "since": _n(retiring.since),
        }
    }


def _layout_of(item: dict[str, Any]) -> Layout:
    if not item:
        return Layout()
    numbers = {name: int(item[name]["N"]) for name in _LAYOUT_NUMBERS if name in item}
    retiring = tuple(
        Retiring(int(m["generation"]["N"]), int(m["shards"]["N"]), float(m["since"]["N"]))
        for v in item.get("retiring", {}).get("L", ())
        if (m := v.get("M"))
    )
    updated = float(item["updated_at"]["N"]) if "updated_at" in item else 0.0
    return Layout(**numbers, retiring=retiring, updated_at=updated, stored=True)


def _lease_of(item: dict[str, Any]) -> LeaseState:
    owner = item.get("owner", {}).get("S")
    return LeaseState(
        owner=owner,
        token=int(item["token"]["N"]) if "token" in item else 0,
        expires_at=float(item["expires_at"]["N"]) if "expires_at" in item else 0.0,
        updated_at=float(item["updated_at"]["N"]) if "updated_at" in item else 0.0,
    )


def _commit_sets(commit: Commit) -> tuple[list[str], dict[str, Any]]:
    """The SET clauses and values of a commit (see ``Commit``).

    A commit without a checkpoint keeps the snapshot attributes; on a state
    written before checkpoints it records ``snapshot_hwm`` as the previous
    hwm, which that snapshot holds.
    """
    sets = ["hwm = :hwm", "tail_bytes = :tail", "updated_at = :now"]
    values: dict[str, Any] = {":hwm": _n(commit.hwm), ":tail": _n(commit.tail_bytes)}
    if commit.snapshot_key is not None and commit.snapshot_sha256 is not None:
        sets += [
            "snapshot_key = :key",
            "snapshot_sha256 = :sha",
            "snapshot_size = :size",
            "snapshot_hwm = :hwm",
        ]
        values |= {
            ":key": _s(commit.snapshot_key),
            ":sha": _s(commit.snapshot_sha256),
            ":size": _n(commit.snapshot_size),
        }
    else:
        sets.append("snapshot_hwm = if_not_exists(snapshot_hwm, :prev)")
    if commit.last_run:  # an empty last_run keeps the one recorded, as in the memory adapter
        sets.append("last_run = :run")
        values[":run"] = _s(commit.last_run)
    if commit.recent_snapshots:
        sets.append("recent_snapshots = :recent")
        values[":recent"] = {"L": [_s(k) for k in commit.recent_snapshots]}
    if commit.lineage is not None:
        sets.append("lineage = :lineage")
        values[":lineage"] = _s(commit.lineage)
    return sets, values


def _state_of(item: dict[str, Any]) -> LogState:
    def text(name: str) -> str | None:
        return item[name]["S"] if name in item and "S" in item[name] else None

    def number(name: str) -> float:
        return float(item[name]["N"]) if name in item else 0.0

    return LogState(
        hwm=int(number("hwm")),
        snapshot_key=text("snapshot_key"),
        snapshot_sha256=text("snapshot_sha256"),
        snapshot_size=int(number("snapshot_size")),
        snapshot_hwm=int(item["snapshot_hwm"]["N"]) if "snapshot_hwm" in item else None,
        tail_bytes=int(number("tail_bytes")),
        owner=text("owner"),
        token=int(number("token")),
        expires_at=number("expires_at"),
        updated_at=number("updated_at"),
        hole_seq=int(number("hole_seq")),
        hole_first_seen=number("hole_first_seen"),
        last_run=text("last_run") or "",
        recent_snapshots=tuple(
            v["S"] for v in item.get("recent_snapshots", {}).get("L", ()) if "S" in v
        ),
        retired_by=int(number("retired_by")),
        lineage=text("lineage") or "",
    )
