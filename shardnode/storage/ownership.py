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
  served from them until activation. At most one import covers a position
  (IMPORT_BEGIN refuses an overlap): only one move at a time writes into a
  range. Each import remembers whether its delta began: from the first
  INGEST of the delta on, copy chunks of that move are refused, so that no
  page scanned before a change lands after the delta that carried it.
- `completed`: ids of the last moves finished or aborted here, so that a
  retried step (a proposal repeated after an unknown outcome, a resumed
  mover, a late step of an aborted move) is a no-op.
- `fence`: the largest fencing token of a scheduler applied here
  (fencing.py): shard commands and membership changes with a smaller one are
  refused at apply time.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import msgpack

from ..keyspace import KeySpaceError, RangeSet, stable_hash
from .engine import CorruptionError

OWNERSHIP_FORMAT_VERSION = 3
#: Version 1 had no fencing token (read as 0); versions 1 and 2 kept an
#: import as its ranges alone (its delta not begun).
_FIELDS = {1: 6, 2: 7, 3: 7}
#: Finished move ids remembered for idempotency.
COMPLETED_KEPT = 1024


@dataclass(slots=True, frozen=True)
class Export:
    target: int
    ranges: RangeSet
    frozen: bool = False


@dataclass(slots=True, frozen=True)
class Import:
    ranges: RangeSet
    delta_begun: bool = False

    def admits(self, delta: bool) -> bool:
        """Whether an INGEST of this move may apply: a delta chunk always; a
        copy chunk only until the delta began (a page scanned before some
        change must not land after the delta that carried it)."""
        return delta or not self.delta_begun


@dataclass(slots=True, frozen=True)
class ShardState:
    owned: RangeSet | None
    version: int = 1
    exports: dict[int, Export] = field(default_factory=dict)
    imports: dict[int, Import] = field(default_factory=dict)
    completed: tuple[int, ...] = ()
    fence: int = 0

    # --- Questions asked for every operation -------------------------------------

    def accepts(self, key: bytes) -> bool:
        """Whether this group serves `key` now (owned and not frozen)."""
        if self.owned is None:
            return True
        return self.accepts_position(stable_hash(key))

    def accepts_position(self, position: int) -> bool:
        """`accepts` for a key whose position the caller has already."""
        if self.owned is None:
            return True
        if position not in self.owned:
            return False
        if not self.exports:
            return True
        return not any(e.frozen and position in e.ranges for e in self.exports.values())

    def dirty_moves(self, position: int) -> list[int]:
        """The exports (not frozen) whose delta must include a change of the
        key at `position`."""
        if not self.exports:
            return []
        return [move_id for move_id, e in self.exports.items() if not e.frozen and position in e.ranges]

    def imported_elsewhere(self, move_id: int, ranges: RangeSet) -> list[int]:
        """The other moves whose imports overlap `ranges`."""
        return [i for i, imported in self.imports.items()
                if i != move_id and imported.ranges.difference(ranges) != imported.ranges]

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
                {i: (imported.ranges.to_wire(), imported.delta_begun) for i, imported in self.imports.items()},
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
            if _FIELDS.get(version) != len(fields):
                raise ValueError(f"format {version}")
            _, owned, shard_version, exports, imports, completed = fields[:6]
            fence = fields[6] if version >= 2 else 0
            if type(fence) is not int or fence < 0:
                raise ValueError("fencing token must be a non-negative integer")
            if version >= 3:
                imported = {int(i): Import(RangeSet.from_wire(r), bool(begun)) for i, (r, begun) in imports.items()}
            else:
                imported = {int(i): Import(RangeSet.from_wire(r)) for i, r in imports.items()}
            return cls(
                owned=None if owned is None else RangeSet.from_wire(owned),
                version=int(shard_version),
                exports={int(i): Export(int(t), RangeSet.from_wire(r), bool(f)) for i, (t, r, f) in exports.items()},
                imports=imported,
                completed=tuple(int(i) for i in completed),
                fence=fence,
            )
        except (ValueError, TypeError, KeyError, IndexError, KeySpaceError) as exc:
            raise CorruptionError(f"unreadable shard state: {exc}") from None
