"""A log's identity: which bucket, root prefix and name its table items belong to.

A table names a log by its id (root prefix and name), not by its bucket, so
two handles that differ only in ``--bucket`` (a typo) address the same
counter, lease and state. The **identity** ``s3://{bucket}/{root}/{log}``
(``LogKeys.identity``) is recorded once, in the log's identity item, by the
first handle that writes (``deltalog init`` or the first producer or
compactor), and checked by every handle when it opens the log:

- recorded and equal: the handle proceeds;
- recorded and different: ``IdentityMismatch``, before anything is read or
  written (no seq reserved, no lease taken, no cached answer);
- not recorded: a new log, or one written by a version before identities.
  If the table already holds something of it (a head, a state), the bucket
  must hold its entries too (one listing, which every role may make):
  otherwise the handle names the wrong bucket and gets ``IdentityMismatch``;
  a missing bucket of a log the table knows is one too. A writer then
  records the identity (a conditional write: of two first uses, one wins),
  and says so once when it adopted an older log.

After ``bind_log`` the table conditions every write to the log's items on
the identity and checks every item it reads (``Table.bind``), so the
identity item is not the only check: an item recorded for another identity
refuses the write itself.
"""

from __future__ import annotations

import logging

from deltalog.errors import ConfigurationError, IdentityMismatch
from deltalog.keys import LogKeys
from deltalog.storage.store import ObjectStore
from deltalog.storage.table import Table, identity_mismatch

__all__ = ["bind_log"]

log = logging.getLogger("deltalog.identity")


async def bind_log(store: ObjectStore, table: Table, keys: LogKeys, *, record: bool) -> str | None:
    """Check (and with ``record``, record) that ``keys`` names the log the table holds.

    Returns the identity recorded for the log afterwards (None: none yet, a
    reader of a log no writer has opened since identities). Raises
    ``IdentityMismatch`` when the table's log of that id is another bucket's
    or root's; a ``ConfigurationError`` when a new log's bucket is missing.
    """
    recorded = await table.read_identity(keys.log_id)
    if recorded is not None and recorded != keys.identity:
        raise identity_mismatch(keys.log_id, recorded, keys.identity)
    if recorded is not None:
        await table.bind(keys.log_id, keys.identity, record=False)
        return recorded
    await table.bind(keys.log_id, keys.identity, record=False)  # reads below are checked
    history = await _check_unrecorded(store, table, keys)
    if not record:
        return None
    if await table.bind(keys.log_id, keys.identity, record=True) and history:
        log.warning(
            "log %s had no recorded identity (written by an older deltalog): it is now %s; "
            "a handle naming another bucket or root is refused from now on",
            keys.log_id,
            keys.identity,
        )
    return keys.identity


async def _check_unrecorded(store: ObjectStore, table: Table, keys: LogKeys) -> str:
    """For a log without a recorded identity: its history in the table ("" for none),
    after checking that the bucket holds it."""
    head = await table.read_head(keys.log_id)
    state = await table.read_state(keys.log_id)
    history = f"head {head}, hwm {state.hwm}" if head or state.hwm or state.snapshot_key else ""
    try:
        has_entries = await _any_under(store, keys.entries_prefix)
    except ConfigurationError as exc:  # a missing bucket, most often
        if not history:
            raise  # a new log: `deltalog init` creates the bucket
        # Not the store's advice to run `deltalog init` on it: the log exists elsewhere.
        why = "it does not exist" if "does not exist" in exc.message else exc.message
        raise _elsewhere(keys, history, f"its entries cannot be listed: {why}") from exc
    if head and not has_entries:  # entries are never deleted: they would be here
        raise _elsewhere(keys, history, "it holds none of its entries")
    return history


async def _any_under(store: ObjectStore, prefix: str) -> bool:
    """Whether anything is stored under ``prefix`` (one listing, which every role may make)."""
    async for _ in store.list_after(prefix, "", page_size=1):
        return True
    return False


def _elsewhere(keys: LogKeys, history: str, why: str) -> IdentityMismatch:
    return IdentityMismatch(
        f"the table holds log {keys.log_id!r} ({history}) with no recorded bucket, and "
        f"bucket {keys.bucket!r} cannot be its bucket: {why}. Check --bucket and --root "
        "(DELTALOG_BUCKET, DELTALOG_ROOT); the first handle with the right ones records them. "
        "Nothing was written",
        recorded=None,
        wanted=keys.identity,
        log=keys.log_id,
    )
