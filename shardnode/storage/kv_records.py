"""What the kv family stores for a key: its value and the etcd metadata of
the key (docs/etcd.md, "Revisions").

Each stored value is a record::

    0x01 | create_revision (8) | mod_revision (8) | version (8) | lease (8) | value

(signed big-endian 64-bit integers, as etcd's int64 fields). The metadata
lives in the same RocksDB value as the user's bytes on purpose: everything
that copies kv records byte for byte — snapshots, a move's copy and delta,
an ingest — carries the metadata along without knowing about it, so a key
keeps its create revision and version when its group changes.

A store written before records existed holds the bare values; open()
upgrades it once (`ensure_upgraded`), resumably: a crash part way never
wraps a value twice.

The group's revision (the last revision it assigned) is a record of the
shard family (``revision``), which snapshots carry: every replica resumes
the same counter after an install, so revisions stay a function of the log.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .engine import CorruptionError, Engine, new_batch

RECORD_TAG = 0x01
_HEADER = struct.Struct(">Bqqqq")
HEADER_BYTES = _HEADER.size

#: The meta family's marker: present once every kv value is a record.
META_KV_RECORDS = b"kv_records"
#: While upgrading: the last key already rewritten (in the same batch as its rewrite).
META_KV_RECORDS_PROGRESS = b"kv_records_progress"
_UPGRADE_BATCH = 4096

#: The shard family's record of the group's last assigned revision (8 bytes, big-endian).
SHARD_REVISION = b"revision"

#: The shard family's lease records (docs/etcd.md, "Leases"): the index of the keys attached to a
#: lease (b"l" + lease + key -> b"": a hint, checked against the key's record when used; a key that
#: moved away leaves its entry behind until the lease is revoked), and the leases revoked in this
#: group (b"x" + lease -> the state machine clock then: a put with one is refused).
LEASE_INDEX_PREFIX = b"l"
REVOKED_PREFIX = b"x"


def lease_index_key(lease: int, key: bytes) -> bytes:
    return LEASE_INDEX_PREFIX + lease.to_bytes(8, "big") + key


def lease_index_prefix(lease: int) -> bytes:
    return LEASE_INDEX_PREFIX + lease.to_bytes(8, "big")


def revoked_key(lease: int) -> bytes:
    return REVOKED_PREFIX + lease.to_bytes(8, "big")


#: What a bare value of a store written before records is given: etcd's
#: "this key exists" (create_revision 0 would mean absent in a compare).
LEGACY_REVISION = 1


@dataclass(slots=True, frozen=True)
class KeyRecord:
    """A key's value with etcd's per-key metadata. `version` counts the puts
    since the key was (re)created; `lease` is 0 for none."""

    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


def encode_record(record: KeyRecord) -> bytes:
    return _HEADER.pack(RECORD_TAG, record.create_revision, record.mod_revision, record.version,
                        record.lease) + record.value


def decode_record(raw: bytes) -> KeyRecord:
    """CorruptionError if `raw` is not a record (a bare value of an old store)."""
    if len(raw) < HEADER_BYTES or raw[0] != RECORD_TAG:
        raise CorruptionError(f"kv value is not a record (tag {raw[:1]!r}, {len(raw)} bytes)")
    _, create, mod, version, lease = _HEADER.unpack_from(raw)
    return KeyRecord(raw[HEADER_BYTES:], create, mod, version, lease)


def record_value(raw: bytes) -> bytes:
    """The user's value of a stored record, without decoding the rest."""
    if len(raw) < HEADER_BYTES or raw[0] != RECORD_TAG:
        raise CorruptionError(f"kv value is not a record (tag {raw[:1]!r}, {len(raw)} bytes)")
    return raw[HEADER_BYTES:]


def is_record(raw: bytes) -> bool:
    return len(raw) >= HEADER_BYTES and raw[0] == RECORD_TAG


def encode_revision(revision: int) -> bytes:
    return revision.to_bytes(8, "big")


def decode_revision(raw: bytes | None) -> int:
    if raw is None:
        return 0
    if len(raw) != 8:
        raise CorruptionError(f"group revision record of {len(raw)} bytes")
    return int.from_bytes(raw, "big")


def next_revision(last: int, clock_ms: int, floor: int = 0) -> int:
    """The revision of a group's next change: a hybrid logical clock.

    ``clock_ms << 12`` keeps revisions of different groups in the order of
    their leaders' clocks (4096 changes per millisecond before the counter
    runs ahead of the clock, which it may: it only has to grow); ``last + 1``
    keeps them increasing within the group whatever the clocks do; `floor`
    (a key's own mod revision + 1) keeps a key's revisions increasing when
    it arrived from another group whose clock ran ahead. Every input comes
    from the log, so every replica computes the same."""
    return max(last + 1, clock_ms << 12, floor)


def ensure_upgraded(engine: Engine) -> bool:
    """Turn every bare kv value of a store of the earlier format into a
    record (revisions LEGACY_REVISION, version 1); returns whether there was
    anything to do. In batches, each with the last key it rewrote, so a
    crash part way resumes after it; the marker is written last, synced."""
    meta = engine.meta
    if meta.view.get(META_KV_RECORDS) is not None:
        return False
    kv = engine.kv
    after = meta.view.get(META_KV_RECORDS_PROGRESS)
    cursor = engine.iterator(kv)
    if after is None:
        cursor.seek_to_first()
    else:
        cursor.seek(after)
        if cursor.valid() and cursor.key() == after:
            cursor.next()
    batch = new_batch()
    count = 0
    while cursor.valid():
        key = cursor.key()
        legacy = KeyRecord(cursor.value(), LEGACY_REVISION, LEGACY_REVISION, 1)
        batch.put(key, encode_record(legacy), kv.handle)
        count += 1
        if count % _UPGRADE_BATCH == 0:
            batch.put(META_KV_RECORDS_PROGRESS, key, meta.handle)
            engine.write(batch, sync=False)
            batch = new_batch()
        cursor.next()
    del cursor
    batch.delete(META_KV_RECORDS_PROGRESS, meta.handle)
    batch.put(META_KV_RECORDS, b"\x01", meta.handle)
    engine.write(batch, sync=True)
    return count > 0 or after is not None
