"""Safety invariants of Raft, checked incrementally after every simulated step.

- Election safety: at most one leader per term, ever.
- Vote safety: a node grants at most one vote per term in each life of its
  disk (a wiped disk forgot its vote: a new life's vote is another voter's,
  which the group must never count under the old one's id; whether it does
  shows in election safety and in the commit checks).
- Log matching: an (index, term) pair names one entry, with one predecessor
  term, in every log that holds it (so equal pairs imply equal prefixes).
- Durable commit: when an entry is first committed, a majority of the voters
  of the configuration in force holds it on stable storage (nothing is
  acknowledged before an fsync on a majority). The configuration in force is
  computed here, independently of the core, from the committed log: a
  configuration takes effect when its entry is applied, and a leader
  proposes a change only once the previous one is applied, so a leader
  commits under the latest committed configuration before the entry or the
  one before it, and the entry must be on a majority of one of the two.
- Committed entries are never lost or changed: every node's committed prefix
  agrees with the cluster's, and every new leader holds all of it (leader
  completeness).
- State machine safety: every node applies the same entry at each index, in
  order, and only committed entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from shardnode.raft import (
    CompactedError,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    StateRole,
    UnavailableError,
)

from .node import SimNode


class SafetyViolation(AssertionError):
    pass


@dataclass(frozen=True)
class Membership:
    """A configuration as the checker computes it from the committed log."""

    voters: frozenset[int]
    learners: frozenset[int] = frozenset()
    removed: frozenset[int] = frozenset()

    @classmethod
    def of(cls, conf: ConfState) -> "Membership":
        return cls(frozenset(conf.voters), frozenset(conf.learners), frozenset(conf.removed))

    def members(self) -> frozenset[int]:
        return self.voters | self.learners

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def after(self, entry: Entry) -> "Membership":
        """The rules of the protocol, restated: a learner joins if the id is
        new, a learner becomes a voter, a member leaves for good (never the
        last voter); anything else is a no-op."""
        try:
            change = ConfChange.decode(entry.data)
        except ValueError:
            return self
        node = change.node_id
        if node in self.removed:
            return self
        if change.type is ConfChangeType.ADD_LEARNER_NODE and node not in self.members() and node > 0:
            return Membership(self.voters, self.learners | {node}, self.removed)
        if change.type is ConfChangeType.ADD_NODE and node in self.learners:
            return Membership(self.voters | {node}, self.learners - {node}, self.removed)
        if change.type is ConfChangeType.REMOVE_NODE and node in self.members() and self.voters != {node}:
            return Membership(self.voters - {node}, self.learners - {node}, self.removed | {node})
        return self  # a binding (SafetyChecker.bindings) or a no-op


@dataclass
class SafetyChecker:
    nodes: dict[int, SimNode]
    initial: Membership
    # Tests of broken variants switch the early warning off to show that the
    # same bug then loses committed data (caught by the checks that follow).
    check_durable_commit: ClassVar[bool] = True
    leaders_by_term: dict[int, int] = field(default_factory=dict)
    votes_granted: dict[tuple[int, int, int], int] = field(default_factory=dict)
    # (index, term) -> (data, type, term of the previous entry)
    entries_seen: dict[tuple[int, int], tuple[bytes, int, int]] = field(default_factory=dict)
    committed: list[Entry] = field(default_factory=list)     # committed[i-1] is entry i
    commit_seen: dict[int, int] = field(default_factory=dict)
    # (index of the conf change entry, configuration after it), in log
    # order; the first is the initial configuration at index 0.
    configurations: list[tuple[int, Membership]] = field(default_factory=list)
    noop_conf_changes: int = 0
    # Committed bindings: node id -> (incarnation, index of the entry); the first wins.
    bindings: dict[int, tuple[int, int]] = field(default_factory=dict)
    checks: int = 0

    def __post_init__(self) -> None:
        self.configurations.append((0, self.initial))

    @property
    def membership(self) -> Membership:
        """The latest committed configuration."""
        return self.configurations[-1][1]

    def _configurations_in_force(self, index: int) -> list[Membership]:
        """Configurations a correct leader may commit `index` under."""
        before = [conf for at, conf in self.configurations if at < index]
        return before[-2:]

    def _fail(self, what: str) -> None:
        raise SafetyViolation(what)

    # --- Hooks the cluster calls -------------------------------------------------------

    def on_persist(self, node: SimNode, entries: list[Entry]) -> None:
        disk = node.disk
        for entry in entries:
            try:
                prev_term = disk.term(entry.index - 1)
            except (CompactedError, UnavailableError):
                continue
            key = (entry.index, entry.term)
            known = self.entries_seen.get(key)
            mine = (entry.data, int(entry.type), prev_term)
            if known is None:
                self.entries_seen[key] = mine
            elif known != mine:
                self._fail(
                    f"log matching: node {node.id} holds entry {key} with data/prev-term {mine[0]!r}/{prev_term}, "
                    f"another log holds {known[0]!r}/{known[2]}"
                )

    def on_message_sent(self, message: Message) -> None:
        if message.type is MessageType.VOTE_RESP and not message.reject:
            key = (message.from_, message.incarnation, message.term)
            previous = self.votes_granted.setdefault(key, message.to)
            if previous != message.to:
                self._fail(
                    f"vote safety: node {message.from_} granted its term-{message.term} vote "
                    f"to {previous} and to {message.to}"
                )

    def after_step(self, node: SimNode) -> None:
        """Check what may have changed in `node` (role, commit index)."""
        self.checks += 1
        raft = node.rawnode.raft
        if raft.role is StateRole.LEADER:
            leader = self.leaders_by_term.get(raft.term)
            if leader is None:
                self.leaders_by_term[raft.term] = node.id
                self._check_leader_completeness(node)
            elif leader != node.id:
                self._fail(f"election safety: nodes {leader} and {node.id} both leaders in term {raft.term}")
        committed = raft.log.committed
        if committed > self.commit_seen.get(node.id, 0):
            self._check_commit(node, committed)
            self.commit_seen[node.id] = committed

    def on_restart(self, node: SimNode) -> None:
        self.commit_seen[node.id] = 0

    def on_apply(self, node: SimNode, entry: Entry, expected_index: int) -> None:
        if entry.index != expected_index:
            self._fail(f"state machine safety: node {node.id} applied {entry.index}, expected {expected_index}")
        if entry.index > len(self.committed):
            self._fail(f"state machine safety: node {node.id} applied uncommitted entry {entry.index}")
        agreed = self.committed[entry.index - 1]
        if (agreed.term, agreed.data, agreed.type) != (entry.term, entry.data, entry.type):
            self._fail(
                f"state machine safety: node {node.id} applied {entry.index}/{entry.term} {entry.data!r}, "
                f"committed is {agreed.index}/{agreed.term} {agreed.data!r}"
            )

    # --- Checks -----------------------------------------------------------------------------

    def _check_commit(self, node: SimNode, committed: int) -> None:
        raft_log = node.rawnode.raft.log
        start = self.commit_seen.get(node.id, 0) + 1
        first = raft_log.first_index()
        for index in range(max(start, first), committed + 1):
            entry = raft_log.slice(index, index + 1)[0]
            if index <= len(self.committed):
                agreed = self.committed[index - 1]
                if (agreed.term, agreed.data) != (entry.term, entry.data):
                    self._fail(
                        f"committed entry changed: node {node.id} commits {index}/{entry.term} {entry.data!r}, "
                        f"cluster committed {index}/{agreed.term} {agreed.data!r}"
                    )
                continue
            if index != len(self.committed) + 1:
                self._fail(f"node {node.id} committed {index} but the cluster only knows up to {len(self.committed)}")
            holders = {n.id for n in self.nodes.values() if _durably_holds(n, entry)}
            in_force = self._configurations_in_force(index)
            if self.check_durable_commit and not any(len(holders & conf.voters) >= conf.quorum() for conf in in_force):
                self._fail(
                    f"durable commit: node {node.id} committed {index}/{entry.term} while only "
                    f"{sorted(holders)} had it on disk; voters in force: "
                    + " or ".join(str(sorted(conf.voters)) for conf in in_force)
                )
            self.committed.append(entry)
            if entry.type is EntryType.CONF_CHANGE:
                after = self.membership.after(entry)
                if after != self.membership:
                    self.configurations.append((index, after))
                elif not self._binds(entry, index):
                    # Refused at apply time on every replica: no configuration change.
                    self.noop_conf_changes += 1

    def _binds(self, entry: Entry, index: int) -> bool:
        """Record a committed binding (the first of a member wins); whether
        `entry` was one that took effect."""
        try:
            change = ConfChange.decode(entry.data)
        except ValueError:
            return False
        node = change.node_id
        if (change.type is not ConfChangeType.BIND_INCARNATION or change.incarnation <= 0
                or node not in self.membership.members() or node in self.bindings):
            return False
        self.bindings[node] = (change.incarnation, index)
        return True

    def _check_leader_completeness(self, node: SimNode) -> None:
        raft_log = node.rawnode.raft.log
        first = raft_log.first_index()
        if len(self.committed) > raft_log.last_index():
            self._fail(
                f"leader completeness: node {node.id} leads term {node.rawnode.raft.term} with last index "
                f"{raft_log.last_index()}, but {len(self.committed)} entries are committed"
            )
        for index in range(max(first, 1), len(self.committed) + 1):
            if raft_log.term(index) != self.committed[index - 1].term:
                self._fail(
                    f"leader completeness: node {node.id} leads term {node.rawnode.raft.term} without "
                    f"committed entry {index}/{self.committed[index - 1].term}"
                )


def _durably_holds(node: SimNode, entry: Entry) -> bool:
    disk = node.disk
    if disk.snapshot().metadata.index >= entry.index:
        return True  # compacted: only committed, applied entries are
    try:
        return disk.term(entry.index) == entry.term
    except (CompactedError, UnavailableError):
        return False
