"""Which part of the key space a group's state machine serves, and the moves
of key space in and out of it (docs/sharding.md).

This is replicated state, changed only by shard commands in the group's own
log (shard_commands.py), so every replica agrees at every log index on
whether a key is owned. That is what makes the ownership check at apply
time sound: a write that reaches a group after its key moved away is refused
by every replica alike, whatever the router believed when it sent it.

- `owned`: the ranges the group serves; None for "everything" (the metadata
  group).
- `version`: the shard map epoch of the group's last ownership change; the
  worker reports it with a wrong-group answer so that a router knows how new
  a map it needs.
- `exports`: moves out in progress. Keys of a non-frozen export are served
  and every change to one is recorded as dirty (the delta shipped at the
  end); keys of a frozen export are refused: the target is taking over.
- `imports`: moves in progress: ingest allowed into those ranges, nothing
  served from them until activation.
- `completed`: ids of the last moves finished here, so that a retried step
  (a proposal repeated after an unknown outcome, a resumed mover) is a
  no-op.
- `fence`: the largest fencing token of a scheduler applied here
  (fencing.py): shard commands and membership changes with a smaller one are
  refused at apply time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import msgpack

from ..keyspace import KeySpaceError, RangeSet, stable_hash
from .engine import CorruptionError

OWNERSHIP_FORMAT_VERSION = 2
#: Version 1 had no fencing token (read as 0).
_FORMATS = (1, 2)
#: Finished move ids remembered for idempotency.
COMPLETED_KEPT = 1024


@dataclass(slots=True, frozen=True)
class Export:
    target: int
    ranges: RangeSet
    frozen: bool = False


@dataclass(slots=True, frozen=True)
class ShardState:
    owned: RangeSet | None
    version: int = 1
    exports: dict[int, Export] = field(default_factory=dict)
    imports: dict[int, RangeSet] = field(default_factory=dict)
    completed: tuple[int, ...] = ()
    fence: int = 0

    # --- Questions asked for every operation -------------------------------------

    def accepts(self, key: bytes) -> bool:
        """Whether this group serves `key` now (owned and not frozen)."""
        if self.owned is None:
            return True
        position = stable_hash(key)
        if position not in self.owned:
            return False
        if not self.exports:
            return True
        return not any(e.frozen and position in e.ranges for e in self.exports.values())

    def dirty_moves(self, key: bytes) -> list[int]:
        """The exports (not frozen) whose delta must include a change of `key`."""
        if not self.exports:
            return []
        position = stable_hash(key)
        return [move_id for move_id, e in self.exports.items() if not e.frozen and position in e.ranges]

    def importing(self, move_id: int, key: bytes) -> bool:
        ranges = self.imports.get(move_id)
        return ranges is not None and stable_hash(key) in ranges

    # --- Changes ----------------------------------------------------------------

    def complete(self, move_id: int, **changes: object) -> ShardState:
        completed = (self.completed + (move_id,))[-COMPLETED_KEPT:]
        return replace(self, completed=completed, **changes)

    # --- Encoding ---------------------------------------------------------------

    def encode(self) -> bytes:
        return msgpack.packb(
            (
                OWNERSHIP_FORMAT_VERSION,
                None if self.owned is None else self.owned.to_wire(),
                self.version,
                {i: (e.target, e.ranges.to_wire(), e.frozen) for i, e in self.exports.items()},
                {i: r.to_wire() for i, r in self.imports.items()},
                list(self.completed),
                self.fence,
            ),
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> ShardState:
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
            version = fields[0]
            if version not in _FORMATS or len(fields) != 5 + version:
                raise ValueError(f"format {version}")
            _, owned, shard_version, exports, imports, completed = fields[:6]
            fence = fields[6] if version >= 2 else 0
            if type(fence) is not int or fence < 0:
                raise ValueError("fencing token must be a non-negative integer")
            return cls(
                owned=None if owned is None else RangeSet.from_wire(owned),
                version=int(shard_version),
                exports={int(i): Export(int(t), RangeSet.from_wire(r), bool(f)) for i, (t, r, f) in exports.items()},
                imports={int(i): RangeSet.from_wire(r) for i, r in imports.items()},
                completed=tuple(int(i) for i in completed),
                fence=fence,
            )
        except (ValueError, TypeError, KeyError, IndexError, KeySpaceError) as exc:
            raise CorruptionError(f"unreadable shard state: {exc}") from None
