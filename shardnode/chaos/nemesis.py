"""The nemesis: it carries out a schedule of faults (schedule.py) against a
running cluster, each bounded, logged when it starts and when it ends, and
healed; `heal_all` undoes whatever is still in place (the run's end, an
interrupted run).

Where each fault acts:
- partitions and delay: nftables rules and netem queues inside the hosts'
  network namespaces (network_faults.py); the clients, in the root
  namespace, keep reaching every router;
- pauses: SIGSTOP, later SIGCONT, to a host's router and workers (or one
  group's leader worker) through its supervisord;
- kills: SIGKILL of the same through supervisord, started again at the
  fault's end (a crash and a reboot);
- power loss: a kill, then the host's disk drops everything not fsynced (its
  data directory must be a lazyfs mount, as the test harness makes), then a
  start;
- shape: an operator's command (`shardnode member remove`, `leave`, `group
  add`, `rebalance`) as a subprocess, and at the fault's end its inverse
  (`member add`, `start --new`, `group remove`), so the cluster ends with the
  shape it began with. A refusal (the change would cost a live majority
  while some host is cut off) is logged and is no anomaly.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ClusterConfig, HostConfig
from ..errors import ShardnodeError
from ..placement.membership import MembershipAdmin
from ..supervisor import ROUTER_PROGRAM, ProcessControl, worker_program
from .schedule import FaultKind, PlannedFault

log = logging.getLogger("shardnode.chaos")

#: How long one change of shape (or its inverse) may take, reruns included,
#: before it is given up. A group add or remove on a loaded machine, behind
#: another change and through pauses and partitions, took four minutes in a
#: long run: the command's own wait (900 s) is the bound.
SHAPE_COMMAND_SECONDS = 900.0


@dataclass(slots=True)
class FaultRecord:
    """One fault as it happened: when (time.monotonic()), on what, and how
    it ended. `note`: what an operator command printed last, or why the
    fault could not be injected."""

    planned: PlannedFault
    targets: tuple[str, ...] = ()
    started: float = 0.0
    ended: float = 0.0
    injected: bool = False
    healed: bool = False
    note: str = ""

    @property
    def kind(self) -> FaultKind:
        return self.planned.kind

    def summary(self) -> dict[str, object]:
        return {"kind": self.kind.value, "variant": self.planned.variant, "at": self.planned.at,
                "targets": list(self.targets), "seconds": round(max(0.0, self.ended - self.started), 2),
                "injected": self.injected, "healed": self.healed, "note": self.note}


@dataclass
class Nemesis:
    """`network`: a NetworkFaults for namespaced clusters (None: network
    faults cannot run); `disks`: host name → a callable dropping that
    host's unsynced data (power loss), where the hosts run on lazyfs."""

    cluster: ClusterConfig
    config_path: Path
    control: ProcessControl
    network: object | None = None
    disks: dict[str, Callable[[], object]] = field(default_factory=dict)
    netem: bool = True
    records: list[FaultRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _undo: dict[int, Callable[[], None]] = field(default_factory=dict)

    # --- Running a schedule ------------------------------------------------------------------

    def run(self, schedule: list[PlannedFault], began: float, stop: threading.Event) -> None:
        """Carry out `schedule` (offsets from `began`, a time.monotonic()),
        the network and process faults on one thread, the shape changes on
        another, until it ends or `stop` is set; heal everything before
        returning."""
        tracks = [[f for f in schedule if f.kind is not FaultKind.SHAPE],
                  [f for f in schedule if f.kind is FaultKind.SHAPE]]
        threads = [threading.Thread(target=self._track, args=(faults, began, stop), daemon=True,
                                    name=f"nemesis-{i}") for i, faults in enumerate(tracks) if faults]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=SHAPE_COMMAND_SECONDS)
            self.heal_all()

    def _track(self, faults: list[PlannedFault], began: float, stop: threading.Event) -> None:
        for fault in faults:
            if stop.wait(max(0.0, began + fault.at - time.monotonic())):
                return
            record = FaultRecord(fault)
            with self._lock:
                self.records.append(record)
            self._inject(record)
            if record.injected:
                stop.wait(max(0.0, began + fault.at + fault.duration - time.monotonic()))
            self._heal(record)

    # --- One fault ------------------------------------------------------------------------------

    def _inject(self, record: FaultRecord) -> None:
        fault = record.planned
        record.started = time.monotonic()
        try:
            undo = self._injectors()[fault.kind](record)
        except (ShardnodeError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            record.note = f"not injected: {exc}"
            record.ended = time.monotonic()
            log.warning("chaos.fault_not_injected", extra={"kind": fault.kind.value, "variant": fault.variant,
                                                            "error": str(exc)})
            return
        record.injected = True
        with self._lock:
            self._undo[id(record)] = undo
        log.info("chaos.fault_start", extra={"kind": fault.kind.value, "variant": fault.variant,
                                              "targets": ",".join(record.targets) or "-", "at": fault.at})

    def _heal(self, record: FaultRecord) -> None:
        with self._lock:
            undo = self._undo.pop(id(record), None)
        if undo is None:
            return
        try:
            undo()
            record.healed = True
        except (ShardnodeError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
            record.note = (record.note + "; " if record.note else "") + f"heal failed: {exc}"
            log.error("chaos.heal_failed", extra={"kind": record.kind.value, "error": str(exc)})
        record.ended = time.monotonic()
        log.info("chaos.fault_end", extra={"kind": record.kind.value, "variant": record.planned.variant,
                                            "targets": ",".join(record.targets) or "-",
                                            "seconds": round(record.ended - record.started, 2),
                                            "healed": record.healed})

    def heal_all(self) -> None:
        """Undo every fault still in place (each at most once)."""
        with self._lock:
            pending = [r for r in self.records if id(r) in self._undo]
        for record in pending:
            self._heal(record)
        if self.network is not None:
            self.network.heal()     # type: ignore[attr-defined]   (belt and braces: nothing of ours stays)

    def _injectors(self) -> dict[FaultKind, Callable[[FaultRecord], Callable[[], None]]]:
        return {FaultKind.PARTITION: self._partition, FaultKind.DELAY: self._delay, FaultKind.PAUSE: self._pause,
                FaultKind.KILL: self._kill, FaultKind.POWERLOSS: self._power_loss, FaultKind.SHAPE: self._shape}

    # --- Network ----------------------------------------------------------------------------------

    def _network(self):  # type: ignore[no-untyped-def]
        if self.network is None:
            raise RuntimeError("network faults need each host in its own network namespace (docs/testing.md)")
        return self.network

    def _partition(self, record: FaultRecord) -> Callable[[], None]:
        network = self._network()
        fault = record.planned
        hosts = self._hosts(fault)
        names = [h.name for h in hosts]
        pairs: set[tuple[str, str]] = set()
        if fault.variant in ("isolate-leader", "one-way-from-leader", "one-way-to-leader"):
            leader = self._leader_host(self._group(fault.group))
            others = [n for n in names if n != leader]
            if fault.variant in ("isolate-leader", "one-way-from-leader"):
                pairs |= {(leader, other) for other in others}
            if fault.variant in ("isolate-leader", "one-way-to-leader"):
                pairs |= {(other, leader) for other in others}
            record.targets = (leader,)
        elif fault.variant == "halves":
            small, large = names[:len(names) // 2], names[len(names) // 2:]
            pairs = _both_ways(small, large)
            record.targets = (*small, "|", *large)
        elif fault.variant == "bridge":
            # Two sides that cannot see each other, and one host that sees both.
            side = (len(names) - 1) // 2
            left, bridge, right = names[:side], names[side], names[side + 1:]
            pairs = _both_ways(left, right)
            record.targets = (*left, "|", bridge, "|", *right)
        elif fault.variant == "ring":
            # Each host sees only its two neighbours in the ring.
            count = len(names)
            for i, a in enumerate(names):
                for j, b in enumerate(names):
                    if a != b and min((i - j) % count, (j - i) % count) > 1:
                        pairs.add((a, b))
            record.targets = tuple(names)
        else:
            raise RuntimeError(f"unknown partition {fault.variant}")
        network.block(pairs)

        def undo() -> None:
            network.unblock(pairs)
        return undo

    def _delay(self, record: FaultRecord) -> Callable[[], None]:
        network = self._network()
        fault = record.planned
        hosts = [h.name for h in self._hosts(fault)]
        if fault.variant == "delay-one":
            hosts = hosts[:1]
        record.targets = tuple(hosts)
        if not self.netem:
            # No netem in this kernel: random loss with nftables (the schedule draws nothing else).
            for host in hosts:
                network.drop_randomly(host, fault.loss_percent)
            record.note = f"random loss {fault.loss_percent:g}% (nftables; no netem here)"

            def stop_loss() -> None:
                for host in hosts:
                    network.drop_randomly(host, 0)
            return stop_loss
        for host in hosts:
            network.shape(host, delay_ms=fault.delay_ms, jitter_ms=fault.jitter_ms,
                          loss_percent=fault.loss_percent, reorder_percent=fault.reorder_percent)
        record.note = (f"delay {fault.delay_ms} ms, jitter {fault.jitter_ms} ms, loss {fault.loss_percent:g}%, "
                       f"reorder {fault.reorder_percent:g}%")

        def undo() -> None:
            for host in hosts:
                network.unshape(host)
        return undo

    # --- Processes --------------------------------------------------------------------------------

    def _programs(self, record: FaultRecord) -> tuple[HostConfig, tuple[str, ...]]:
        """The host and programs a pause, kill or power loss acts on: a whole
        host (its router and every worker running there), or the leader
        worker of a group."""
        fault = record.planned
        if fault.variant == "leader":
            group = self._group(fault.group)
            host = self.cluster.host(self._leader_host(group))
            record.targets = (f"{host.name}/{worker_program(group)}",)
            return host, (worker_program(group),)
        host = self._hosts(fault)[0]
        running = [name for name, info in self.control.processes(host.name).items()
                   if info.state == "RUNNING" and (name == ROUTER_PROGRAM or name.startswith("worker-"))]
        record.targets = (host.name,)
        return host, tuple(sorted(running))

    def _pause(self, record: FaultRecord) -> Callable[[], None]:
        host, programs = self._programs(record)
        paused = self.control.signal_programs(host.name, programs, "STOP")

        def undo() -> None:
            self.control.signal_programs(host.name, paused, "CONT")
        return undo

    def _kill(self, record: FaultRecord) -> Callable[[], None]:
        host, programs = self._programs(record)
        self._stop_hard(host, programs)
        return lambda: self._start(host, programs)

    def _power_loss(self, record: FaultRecord) -> Callable[[], None]:
        host, programs = self._programs(record)
        drop = self.disks.get(host.name)
        if drop is None:
            raise RuntimeError(f"power loss needs {host.name}'s data directory on a lazyfs mount "
                               "(the test harness makes one per host)")
        self._stop_hard(host, programs)
        record.note = f"dropped {drop()}"
        return lambda: self._start(host, programs)

    def _stop_hard(self, host: HostConfig, programs: tuple[str, ...]) -> None:
        """SIGKILL, kept down until started again (supervisord's own stop,
        as `shardnode die` does: no restart in between)."""
        self.control.kill_programs(host.name, programs)

    def _start(self, host: HostConfig, programs: tuple[str, ...]) -> None:
        """Start what was running (workers first: the router finds them serving)."""
        self.control.start_programs(host.name, sorted(programs, key=lambda name: name == ROUTER_PROGRAM))

    # --- Shape ------------------------------------------------------------------------------------

    def _shape(self, record: FaultRecord) -> Callable[[], None]:
        fault = record.planned
        if fault.variant == "rebalance":
            record.note = self._command("rebalance")
            record.targets = ("all",)
            return lambda: None
        if fault.variant == "member":
            group = self._group(fault.group)
            with MembershipAdmin(self.cluster) as admin:
                state = admin.group(group)
            leader = state.leader
            hosts = [m.host for m in state.voters if leader is None or m.node_id != leader.node_id]
            if not hosts:
                raise RuntimeError(f"group {group} has no follower to remove")
            host = hosts[fault.hosts[0] % len(hosts)]
            record.targets = (f"{host}/group-{group}",)
            record.note = self._command("member", "remove", str(group), host)
            return lambda: self._restore(record, "member", "add", str(group), host)
        if fault.variant == "leave":
            host = self._hosts(fault)[0]
            record.targets = (host.name,)
            record.note = self._command("leave", host.router_address, "--clean")
            return lambda: self._restore(record, "start", host.router_address, "--new")
        if fault.variant == "group":
            before = set(self._live_groups())
            try:
                record.note = self._command("group", "add")
            except RuntimeError as exc:
                # Refused, or failed part way: a group may be live all the same,
                # and then the inverse must run (the cluster ends as it began).
                added = sorted(set(self._live_groups()) - before)
                if not added:
                    raise
                record.note = f"{exc} (group {added[0]} is live)"
            added = sorted(set(self._live_groups()) - before)
            if not added:
                raise RuntimeError("group add finished but no new group is live")
            record.targets = (f"group-{added[0]}",)
            return lambda: self._restore(record, "group", "remove", str(added[0]))
        raise RuntimeError(f"unknown shape change {fault.variant}")

    def _restore(self, record: FaultRecord, *args: str) -> None:
        """The inverse of a shape fault, retried while it is refused for a
        passing reason (a host cut off by a fault of the other track)."""
        deadline = time.monotonic() + SHAPE_COMMAND_SECONDS
        while True:
            try:
                record.note += f"; {self._command(*args)}"
                return
            except RuntimeError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(2.0)

    def _command(self, *args: str) -> str:
        """Run `shardnode ARGS` as an operator would; its last line, or a
        RuntimeError with its error line (also when it ran out of time: the
        change it recorded goes on, and a rerun attaches to it)."""
        command = [sys.executable, "-m", "shardnode.cli", "--config", str(self.config_path), *args]
        log.info("chaos.shape_command", extra={"command": " ".join(args)})
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=SHAPE_COMMAND_SECONDS)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"`shardnode {' '.join(args)}` did not finish in {SHAPE_COMMAND_SECONDS:g} s") from None
        lines = (done.stdout.strip() or done.stderr.strip()).splitlines()
        last = lines[-1] if lines else ""
        if done.returncode != 0:
            error = done.stderr.strip().splitlines()
            raise RuntimeError(f"`shardnode {' '.join(args)}` exited {done.returncode}: "
                               f"{error[-1] if error else last}")
        return f"`shardnode {' '.join(args)}`: {last}"

    # --- The cluster as it is now ------------------------------------------------------------

    def _hosts(self, fault: PlannedFault) -> list[HostConfig]:
        """The fault's hosts, in its order (places in cluster.toml's host list)."""
        hosts = list(self.cluster.hosts)
        return [hosts[i % len(hosts)] for i in fault.hosts] or hosts

    def _live_groups(self) -> list[int]:
        with MembershipAdmin(self.cluster) as admin:
            return sorted(admin.live_groups())

    def _group(self, index: int) -> int:
        groups = self._live_groups()
        return groups[index % len(groups)]

    def _leader_host(self, group: int) -> str:
        with MembershipAdmin(self.cluster) as admin:
            leader = admin.group(group).leader
        if leader is None:
            raise RuntimeError(f"group {group} has no leader now")
        return leader.host


def _both_ways(left: list[str], right: list[str]) -> set[tuple[str, str]]:
    return {(a, b) for a in left for b in right} | {(b, a) for a in left for b in right}
