"""One chaos run (`shardnode chaos`): workloads, the nemesis and the
checkers against a running cluster, and a verdict per fault kind.

The run: start the register and set workloads through the cluster's
routers; carry out the seeded schedule (schedule.py, nemesis.py) for
`duration` seconds; heal everything; wait until every group (and the
metadata group) has a quorum again; stop the workloads; read back and check.

A verdict per fault kind gives the faults injected, the operations that
started while one of them was in place, how many of those succeeded
(availability: the clients go through every router, so while a minority is
cut off this is what the majority side serves), the seconds until writes
resumed after each heal (worst and median), and the anomalies whose
operations overlap that kind's faults (a window reaches SETTLE_SECONDS past
the heal: the consequences of a fault can show a little later). Anomalies
outside every window are reported under "none".
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..client import Client
from ..config import ClusterConfig
from ..supervisor import ProcessControl
from .checkers import Anomaly, CheckResult, availability, check_registers, check_set, resume_seconds
from .nemesis import FaultRecord, Nemesis
from .operations import OperationLog
from .schedule import NETWORK_KINDS, FaultKind, plan
from .workloads import RegisterWorkload, SetWorkload

#: How far past a fault's heal its window reaches, for anomalies and availability.
SETTLE_SECONDS = 5.0
#: How long the cluster may take to have every group led again after the last heal.
RECOVERY_SECONDS = 120.0


class ChaosError(Exception):
    """The run could not be made (one line: why); nothing was injected."""


@dataclass(slots=True, frozen=True)
class ChaosSettings:
    config_path: Path
    duration: float
    kinds: tuple[FaultKind, ...]
    seed: int
    clients: int = 8


@dataclass(slots=True)
class KindVerdict:
    kind: str
    faults: int = 0
    injected: int = 0
    operations: int = 0
    succeeded: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)
    resume: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def availability(self) -> float | None:
        return self.succeeded / self.operations if self.operations else None

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind, "faults": self.faults, "injected": self.injected, "operations": self.operations,
            "succeeded": self.succeeded,
            "availability": None if self.availability is None else round(self.availability, 4),
            "resume_seconds_max": round(max(self.resume), 2) if self.resume else None,
            "resume_seconds_median": round(statistics.median(self.resume), 2) if self.resume else None,
            "anomalies": [_anomaly_dict(a) for a in self.anomalies],
        }


@dataclass(slots=True)
class ChaosReport:
    settings: ChaosSettings
    verdicts: list[KindVerdict]
    checks: list[CheckResult]
    faults: list[FaultRecord]
    operations: int
    seconds: float
    recovered: bool
    recovery_note: str = ""

    @property
    def anomalies(self) -> int:
        return sum(len(check.anomalies) for check in self.checks)

    @property
    def unhealed(self) -> list[FaultRecord]:
        return [f for f in self.faults if f.injected and not f.healed]

    @property
    def exit_code(self) -> int:
        """0: no anomaly and a healed, recovered cluster; 1: anomalies; 2:
        the cluster was left unhealed or did not recover."""
        if self.anomalies or any(c.undecided for c in self.checks):
            return 1
        return 0 if self.recovered and not self.unhealed else 2

    def as_dict(self) -> dict[str, object]:
        return {
            "seed": self.settings.seed, "duration": self.settings.duration,
            "faults_requested": [k.value for k in self.settings.kinds], "seconds": round(self.seconds, 1),
            "operations": self.operations, "anomalies": self.anomalies, "recovered": self.recovered,
            "recovery_note": self.recovery_note,
            "verdicts": [v.as_dict() for v in self.verdicts],
            "checks": [{"checker": c.checker, "valid": c.valid, "operations": c.operations, "ok": c.ok,
                        "failed": c.failed, "unknown": c.unknown, "figures": dict(c.figures),
                        "undecided": c.undecided, "anomalies": [_anomaly_dict(a) for a in c.anomalies]}
                       for c in self.checks],
            "faults": [f.summary() for f in self.faults],
            "exit_code": self.exit_code,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=False)


def run_chaos(settings: ChaosSettings, on_line: Callable[[str], None] = lambda line: None,
              network: object | None = None, disks: dict[str, Callable[[], object]] | None = None) -> ChaosReport:
    """One run against the cluster of `settings.config_path`. `network`: a
    NetworkFaults (default: made when the hosts have namespaces); `disks`:
    host → power loss, where hosts run on lazyfs (default: found by their
    control sockets)."""
    cluster = ClusterConfig.load(settings.config_path)
    if network is None and all(h.namespace for h in cluster.hosts):
        from .network_faults import NetworkFaults
        network = NetworkFaults(cluster)
    needs_network = [k.value for k in settings.kinds if k in NETWORK_KINDS]
    if needs_network and network is None:
        raise ChaosError(f"{','.join(needs_network)} need each host in its own network namespace "
                         "(`make run-netns`, docs/testing.md); choose from pause,kill,powerloss,shape here")
    disks = _lazy_disks(cluster) if disks is None else disks
    if FaultKind.POWERLOSS in settings.kinds and len(disks) != len(cluster.hosts):
        raise ChaosError("powerloss needs every host's data directory on a lazyfs mount "
                         "(docs/testing.md, \"Power loss\"); choose from partition,delay,pause,kill,shape here")
    _ready_or_refuse(settings.config_path)

    netem = True
    if FaultKind.DELAY in settings.kinds:
        from .network_faults import netem_unavailable
        reason = netem_unavailable()
        netem = reason is None
        if reason is not None:
            on_line(f"chaos: delay faults are random loss only (nftables): {reason}")
    schedule = plan(settings.seed, settings.kinds, settings.duration, len(cluster.hosts), cluster.groups,
                    netem=netem)
    on_line(f"chaos: seed {settings.seed}, {len(schedule)} faults planned over {settings.duration:g} s "
            f"({', '.join(k.value for k in settings.kinds)})")
    nemesis = Nemesis(cluster, settings.config_path, ProcessControl(cluster), network, disks, netem=netem)
    operations = OperationLog()
    registers = RegisterWorkload(settings.config_path, clients=settings.clients, seed=settings.seed,
                                 log=operations)
    elements = SetWorkload(settings.config_path, clients=max(2, settings.clients // 2), seed=settings.seed,
                           log=operations)
    began = operations.clock()
    stop = threading.Event()
    registers.start()
    elements.start()
    faults_done = threading.Thread(target=nemesis.run, args=(schedule, began, stop), name="nemesis", daemon=True)
    try:
        faults_done.start()
        _report_progress(nemesis, began, settings.duration, on_line)
    finally:
        stop.set()
        faults_done.join()
        nemesis.heal_all()
        on_line(f"chaos: every fault healed ({sum(r.injected for r in nemesis.records)} injected); "
                "waiting for every group to serve")
        recovered, note = _await_recovery(settings.config_path)
        registers.stop()
        elements.stop()
    on_line("chaos: reading back and checking the histories")
    registers.read_back()
    checks = [check_registers(registers.history(), log=operations),
              check_set(elements.attempts(), elements.read_back())]
    verdicts = _verdicts(settings.kinds, nemesis.records, operations, checks)
    return ChaosReport(settings, verdicts, checks, nemesis.records, len(operations), time.monotonic() - began,
                       recovered, note)


def _report_progress(nemesis: Nemesis, began: float, duration: float, on_line: Callable[[str], None]) -> None:
    shown = 0
    # The workloads run for the whole duration, also after the schedule's last fault.
    while time.monotonic() - began < duration:
        time.sleep(0.5)
        records = list(nemesis.records)
        for record in records[shown:]:
            on_line(f"  {record.started - began:7.1f} s  {record.planned.describe():28} "
                    f"{','.join(record.targets) or '-'}")
        shown = len(records)


def _ready_or_refuse(config_path: Path) -> None:
    from ..cli.ready import NotReady, wait_ready
    with Client.from_config(config_path, timeout=5.0) as client:
        try:
            wait_ready(client, 30.0)
        except NotReady as exc:
            raise ChaosError(f"the cluster is not ready, so no fault was injected: {exc}") from None


def _await_recovery(config_path: Path) -> tuple[bool, str]:
    from ..cli.ready import NotReady, wait_ready
    began = time.monotonic()
    with Client.from_config(config_path, timeout=5.0) as client:
        try:
            wait_ready(client, RECOVERY_SECONDS)
        except NotReady as exc:
            return False, str(exc)
    return True, f"every group led {time.monotonic() - began:.1f} s after the last heal"


def _verdicts(kinds: tuple[FaultKind, ...], records: list[FaultRecord], operations: OperationLog,
              checks: list[CheckResult]) -> list[KindVerdict]:
    verdicts = {kind: KindVerdict(kind.value) for kind in kinds}
    outside = KindVerdict("none")
    windows: dict[FaultKind, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for record in records:
        verdict = verdicts[record.kind]
        verdict.faults += 1
        if record.note.startswith("not injected"):
            verdict.notes.append(record.note)
        if not record.injected:
            continue
        verdict.injected += 1
        windows[record.kind].append((record.started, record.ended))
        resumed = resume_seconds(operations, record.ended)
        if resumed is not None and record.kind is not FaultKind.SHAPE:
            verdict.resume.append(resumed)
    for kind, spans in windows.items():
        windows_seen = availability(operations, spans)
        verdicts[kind].operations = sum(w.operations for w in windows_seen)
        verdicts[kind].succeeded = sum(w.ok for w in windows_seen)
    for check in checks:
        for anomaly in check.anomalies:
            placed = False
            first, last = _span(anomaly)
            for kind, spans in windows.items():
                if any(first < end + SETTLE_SECONDS and last >= start for start, end in spans):
                    verdicts[kind].anomalies.append(anomaly)
                    placed = True
            if not placed:
                outside.anomalies.append(anomaly)
    return [*verdicts.values(), outside]


def _span(anomaly: Anomaly) -> tuple[float, float]:
    """From the first call to the last answer of the anomaly's operations
    (an operation with no answer reaches to the end of the run)."""
    starts, ends = [], []
    for op in anomaly.operations:
        start = getattr(op, "call", None)
        if start is None:
            start = getattr(op, "start", 0.0)
        end = getattr(op, "return_time", None) if hasattr(op, "return_time") else getattr(op, "end", None)
        starts.append(start)
        ends.append(float("inf") if end is None else end)
    return (min(starts), max(ends)) if starts else (0.0, float("inf"))


def _anomaly_dict(anomaly: Anomaly) -> dict[str, object]:
    return {"kind": anomaly.kind, "keys": [k.decode("utf-8", "backslashreplace") for k in anomaly.keys],
            "detail": anomaly.detail, "operations": len(anomaly.operations), "explanation": anomaly.explanation}


def _lazy_disks(cluster: ClusterConfig) -> dict[str, Callable[[], object]]:
    """The hosts whose data directory is a lazyfs mount (its control socket
    lies beside it, `<mount>.control`): host → power loss."""
    from ..testing.lazyfs import control
    disks: dict[str, Callable[[], object]] = {}
    for host in cluster.hosts:
        socket_path = cluster.data_dir / host.name
        control_path = Path(str(socket_path) + ".control")
        if control_path.exists():
            disks[host.name] = lambda path=control_path: control.request(str(path), "power_loss")
    return disks


def format_report(report: ChaosReport) -> str:
    """The verdict table a person reads."""
    lines = [f"{'fault':10} {'faults':>6} {'ops':>8} {'ok':>8} {'avail':>7} {'resume max':>10} "
             f"{'median':>7} {'anomalies':>9}"]
    for verdict in report.verdicts:
        if verdict.kind == "none" and not verdict.anomalies:
            continue
        data = verdict.as_dict()
        share = "-" if verdict.availability is None else f"{verdict.availability:.1%}"
        worst = "-" if data["resume_seconds_max"] is None else f"{data['resume_seconds_max']:.1f} s"
        median = "-" if data["resume_seconds_median"] is None else f"{data['resume_seconds_median']:.1f} s"
        lines.append(f"{verdict.kind:10} {verdict.injected:>6} {verdict.operations:>8} {verdict.succeeded:>8} "
                     f"{share:>7} {worst:>10} {median:>7} {len(verdict.anomalies):>9}")
        for note in verdict.notes[:3]:
            lines.append(f"    {note}")
    for check in report.checks:
        lines.append(check.summary())
        for anomaly in check.anomalies[:20]:
            lines.append(f"    ANOMALY {anomaly.kind}: {anomaly.detail}")
    for record in report.unhealed:
        lines.append(f"NOT HEALED {record.planned.describe()} {','.join(record.targets)}: {record.note}")
    if not report.recovered:
        lines.append(f"NOT RECOVERED: {report.recovery_note}")
    verdict = {0: "no anomaly", 1: f"{report.anomalies} anomalies" if report.anomalies else "undecided",
               2: "no anomaly, but the cluster was left unhealed or did not recover"}
    lines.append(f"verdict: {verdict[report.exit_code]} ({report.operations} operations, "
                 f"{sum(v.injected for v in report.verdicts)} faults, {report.seconds:.0f} s, "
                 f"seed {report.settings.seed})")
    return "\n".join(lines)
