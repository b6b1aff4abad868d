"""A host's supervisord stops its programs all at once (issue 23, point 4:
stopping the local cluster took 24 s, supervisord stopping one program
after the other), shardnode/host_supervisord.py."""

from __future__ import annotations

from supervisor import supervisord

from shardnode import host_supervisord


class FakeGroup:
    def __init__(self, name: str, running: bool = True) -> None:
        self.name = name
        self.running = running
        self.asked = 0

    def stop_all(self) -> None:
        self.asked += 1

    def get_unstopped_processes(self) -> list[str]:
        return [self.name] if self.running else []


def shutdown_rounds(supervisor: object, groups: list[FakeGroup]) -> list[list[str]]:
    """The groups asked to stop in each round of supervisord's shutdown loop
    (phase 1, then phase 2, as Supervisor.runforever calls them)."""
    supervisor.stop_groups = list(groups)           # type: ignore[attr-defined]
    rounds = []
    while supervisor.stop_groups:                   # type: ignore[attr-defined]
        before = {g.name: g.asked for g in groups}
        supervisord.Supervisor.ordered_stop_groups_phase_1(supervisor)     # type: ignore[arg-type]
        rounds.append([g.name for g in groups if g.asked > before[g.name]])
        for group in groups:
            if group.asked:
                group.running = False               # it exits once asked
        supervisord.Supervisor.ordered_stop_groups_phase_2(supervisor)     # type: ignore[arg-type]
    return rounds


def test_every_program_is_asked_to_stop_in_the_first_round(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    class Bare:
        stop_groups = None

    names = ["worker-meta", "worker-g0", "worker-g1", "router"]        # priority order
    # Plain supervisord: one group per round, the last (highest priority number) first.
    assert shutdown_rounds(Bare(), [FakeGroup(n) for n in names]) == [["router"], ["worker-g1"], ["worker-g0"],
                                                                        ["worker-meta"]]
    monkeypatch.setattr(supervisord.Supervisor, "ordered_stop_groups_phase_1",
                        supervisord.Supervisor.ordered_stop_groups_phase_1)
    monkeypatch.setattr(supervisord.Supervisor, "ordered_stop_groups_phase_2",
                        supervisord.Supervisor.ordered_stop_groups_phase_2)
    host_supervisord.install()
    groups = [FakeGroup(n) for n in names] + [FakeGroup("worker-g2", running=False)]
    assert shutdown_rounds(Bare(), groups) == [["worker-meta", "worker-g0", "worker-g1", "router", "worker-g2"]]
