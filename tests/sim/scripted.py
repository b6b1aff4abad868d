"""A scripted cluster for hand-written interaction tests (the counterpart of
etcd's datadriven tests): the test decides which message is delivered when,
which links are cut, who crashes; the same safety checker as the random
simulation runs after every step. Every event is written to `transcript`, so
a failing test shows a short readable story.

Messages travel as the worker's transport carries them (node.py:
`transport_sends`, `transport_delivers`), stamped with their sender's
incarnation. With `bind=True` a leader proposes the bindings of members'
incarnations after each Ready, as the worker's driver does.
"""

from __future__ import annotations

from collections.abc import Callable

from shardnode.raft import ConfChange, ConfState, InvalidConfChange, Message, ProposalDropped, StateRole, confchange

from .cluster import _fmt_message
from .invariants import Membership, SafetyChecker
from .node import NodeParams, SimNode, encode_command, transport_delivers, transport_sends


class ScriptedCluster:
    def __init__(self, size: int, params: NodeParams | None = None, *, bind: bool = False) -> None:
        voters = tuple(range(1, size + 1))
        initial = ConfState(voters=voters)
        self.bind = bind
        self.params = params or NodeParams(election_tick=10, heartbeat_tick=1, max_inflight_msgs=256)
        self.nodes = {i: SimNode(i, initial, self.params, seed=i) for i in voters}
        self.checker = SafetyChecker(self.nodes, Membership.of(initial))
        self.queue: list[Message] = []
        self.cut: set[tuple[int, int]] = set()
        self.transcript: list[str] = []
        self.reads_done: list[tuple[int, bytes]] = []    # (node, context) of every read state handed out
        self._handles = 0
        for node in self.nodes.values():
            node.start()

    def __getitem__(self, node_id: int) -> SimNode:
        return self.nodes[node_id]

    def note(self, text: str) -> None:
        self.transcript.append(text)

    # --- Topology -----------------------------------------------------------------

    def isolate(self, node_id: int) -> None:
        for other in self.nodes:
            if other != node_id:
                self.cut |= {(node_id, other), (other, node_id)}
        self.note(f"isolate n{node_id}")

    def connect_only(self, *groups: set[int]) -> None:
        """Links work only inside each group."""
        self.cut = {
            (a, b) for a in self.nodes for b in self.nodes if a != b and not any(a in g and b in g for g in groups)
        }
        self.note(f"partition {[sorted(g) for g in groups]}")

    def heal(self) -> None:
        self.cut = set()
        self.note("heal")

    def crash(self, node_id: int) -> None:
        self.nodes[node_id].crash()
        self.queue = [m for m in self.queue if m.from_ != node_id and m.to != node_id]
        self.note(f"crash n{node_id}")

    def wipe(self, node_id: int) -> None:
        """The node (down) loses its disk: it will start empty, under the
        same id, with its first configuration and a new incarnation."""
        node = self.nodes[node_id]
        node.wipe()
        self.note(f"n{node_id} loses its disk (new incarnation {node.incarnation:x})")

    def restart(self, node_id: int) -> None:
        node = self.nodes[node_id]
        node.start()
        self.checker.on_restart(node)
        self.note(f"restart n{node_id} (term {node.rawnode.raft.term}, last {node.rawnode.raft.log.last_index()})")
        self._process(node)

    # --- Driving ---------------------------------------------------------------------

    def _process(self, node: SimNode) -> None:
        """Carry out every Ready of `node`, persisting at once."""
        self.checker.after_step(node)
        while node.alive and node.rawnode.has_ready():
            ready = node.rawnode.ready()
            node.persist(ready)
            self.checker.on_persist(node, ready.entries)
            if ready.snapshot is not None:
                node.install_snapshot(ready.snapshot)
            for message in ready.messages:
                if not transport_sends(node, message, self.nodes):
                    continue
                message = node.stamp(message)
                self.checker.on_message_sent(message)
                self.queue.append(message)
            for entry in ready.committed_entries:
                self.checker.on_apply(node, entry, node.applied_index + 1)
                node.apply(entry)
            self.reads_done += [(node.id, state.request_context) for state in ready.read_states]
            node.rawnode.advance(ready)
            node.maybe_compact()
            if self.bind:
                self._bind_one(node)
            self.checker.after_step(node)

    def _bind_one(self, node: SimNode) -> None:
        unbound = node.rawnode.incarnations_to_bind()
        if not unbound:
            return
        node_id, incarnation = unbound[0]
        try:
            node.rawnode.propose_conf_change(ConfChange.bind(node_id, incarnation))
        except (ProposalDropped, InvalidConfChange):
            return
        self.note(f"n{node.id} proposes to bind n{node_id} to incarnation {incarnation:x}")

    def step(self, node_id: int, action: Callable[[SimNode], None], what: str) -> None:
        node = self.nodes[node_id]
        before = node.rawnode.raft.role
        action(node)
        after = node.rawnode.raft.role
        self.note(f"n{node_id} {what}" + (f"  [{before.name} -> {after.name} term {node.rawnode.raft.term}]" if after is not before else ""))
        self._process(node)

    def deliver_one(self) -> Message | None:
        """Deliver (or drop, if its link is cut or its target is down) the oldest message."""
        if not self.queue:
            return None
        message = self.queue.pop(0)
        target = self.nodes[message.to]
        if (message.from_, message.to) in self.cut or not target.alive:
            self.note(f"  drop n{message.from_}->n{message.to} {_fmt_message(message)}")
            return message
        if not transport_delivers(target, message):
            self.note(f"  refused (a stranger) n{message.from_}->n{message.to} {_fmt_message(message)}")
            return message
        self.step(message.to, lambda n: n.rawnode.step(message), f"<- n{message.from_} {_fmt_message(message)}")
        return message

    def deliver_all(self, limit: int = 10_000) -> None:
        for _ in range(limit):
            if self.deliver_one() is None:
                return
        raise AssertionError("messages kept flowing: livelock?")

    def deliver_until(self, done: Callable[[], bool], limit: int = 10_000) -> None:
        for _ in range(limit):
            if done() or self.deliver_one() is None:
                return

    def tick(self, node_id: int, times: int = 1) -> None:
        for _ in range(times):
            self.step(node_id, lambda n: n.rawnode.tick(), "tick")

    def tick_all(self, times: int = 1) -> None:
        for _ in range(times):
            for node_id, node in list(self.nodes.items()):
                if node.alive:
                    self.step(node_id, lambda n: n.rawnode.tick(), "tick")
            self.deliver_all()

    def campaign(self, node_id: int) -> None:
        self.step(node_id, lambda n: n.rawnode.campaign(), "campaign")

    def elect(self, node_id: int, attempts: int = 5) -> None:
        """Campaign (again, if a higher term elsewhere defeats us) until leader."""
        node = self.nodes[node_id]
        for _ in range(attempts):
            self.campaign(node_id)
            # Stop at the moment of winning: what follows is the caller's to script.
            self.deliver_until(lambda: node.rawnode.raft.role is StateRole.LEADER)
            if node.rawnode.raft.role is StateRole.LEADER:
                return
        raise AssertionError(f"n{node_id} could not be elected:\n" + "\n".join(self.transcript[-40:]))

    def propose(self, node_id: int, key: bytes, value: bytes) -> int:
        self._handles += 1
        data = encode_command(0, self._handles, "put", key, value)
        index = 0

        def do(node: SimNode) -> None:
            nonlocal index
            index = node.rawnode.propose(data).index

        self.step(node_id, do, f"propose {key!r}={value!r}")
        return index

    def change(self, leader_id: int, change: ConfChange) -> int:
        """Propose a configuration change at `leader_id`; returns its index."""
        index = 0

        def do(node: SimNode) -> None:
            nonlocal index
            index = node.rawnode.propose_conf_change(change).index

        self.step(leader_id, do, f"propose {change.describe()}")
        return index

    def add_learner(self, leader_id: int, node_id: int) -> int:
        """Propose `node_id` as a learner and start it, as an operator would,
        from the configuration that adds it."""
        change = ConfChange.add_learner(node_id, f"host{node_id}", f"10.0.0.{node_id}:50100")
        bootstrap = confchange.apply(self.nodes[leader_id].rawnode.conf_state(), change)
        index = self.change(leader_id, change)
        node = SimNode(node_id, bootstrap, self.params, seed=node_id)
        self.nodes[node_id] = node
        node.start()
        self.note(f"start n{node_id} (joining)")
        return index

    def leader(self) -> int | None:
        leaders = [i for i, n in self.nodes.items() if n.alive and n.rawnode.raft.role is StateRole.LEADER]
        return max(leaders, key=lambda i: self.nodes[i].rawnode.raft.term) if leaders else None

    def role(self, node_id: int) -> StateRole:
        return self.nodes[node_id].rawnode.raft.role

    def term(self, node_id: int) -> int:
        return self.nodes[node_id].rawnode.raft.term
