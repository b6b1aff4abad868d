"""MembershipAdmin's wait for a new learner, against scripted group states
(no processes): the joining worker's start is retried when it is down."""

from pathlib import Path

import pytest

from shardnode.placement import membership
from shardnode.config import ClusterConfig
from shardnode.placement.membership import GroupState, MemberState, MembershipAdmin

ROOT = Path(__file__).resolve().parents[2]


class FakeControl:
    def __init__(self) -> None:
        self.ensured: list[tuple[str, list[int]]] = []

    def ensure_workers(self, host_name: str, groups: list[int], wait: bool = True) -> tuple[str, ...]:
        self.ensured.append((host_name, list(groups)))
        return tuple(f"worker-g{g}" for g in groups)


class ScriptedAdmin(MembershipAdmin):
    """group() answers from a script: one GroupState per call, the last repeated."""

    def __init__(self, states: list[GroupState], control: FakeControl) -> None:
        super().__init__(ClusterConfig.load(ROOT / "etc" / "cluster.toml"), control, timeout=60.0)  # type: ignore[arg-type]
        self.states = states
        self.calls = 0

    def group(self, group: int) -> GroupState:
        state = self.states[min(self.calls, len(self.states) - 1)]
        self.calls += 1
        return state


def _state(*, learner: bool, reachable: bool) -> GroupState:
    voters = [MemberState(n, f"h{n}", f"127.0.0.{n}:50100", False, True) for n in (1, 2, 3)]
    joining = MemberState(9, "h5", "127.0.0.5:50100", learner, reachable)
    return GroupState(0, leader_id=1, term=2, commit_index=10, members=[*voters, joining])


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(10_000))   # a second passes at each look at the clock (two per look at the group)
    monkeypatch.setattr(membership.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(membership.time, "sleep", lambda seconds: None)


def test_a_learner_whose_worker_stays_down_is_started_again() -> None:
    control = FakeControl()
    down = _state(learner=True, reachable=False)
    admin = ScriptedAdmin([down, down, down, down, _state(learner=True, reachable=True),
                           _state(learner=False, reachable=True)], control)
    member = admin._await_promotion(0, 9)
    assert not member.learner
    assert control.ensured == [("h5", [0])]


def test_a_learner_that_answers_is_left_alone() -> None:
    control = FakeControl()
    admin = ScriptedAdmin([_state(learner=True, reachable=True)] * 6 + [_state(learner=False, reachable=True)],
                          control)
    admin._await_promotion(0, 9)
    assert control.ensured == []


class HostControl:
    """A host's supervisord as `restart` sees it, recording starts."""

    def __init__(self, processes: dict) -> None:
        self.table = processes
        self.started: list[tuple[str, list[int]]] = []

    def processes(self, host_name: str) -> dict:
        return self.table

    def start(self, server: str, groups: list[int] | None = None) -> None:
        self.started.append((server, list(groups or [])))


def test_a_host_restarted_without_the_metadata_group_brings_back_its_groups_created_online() -> None:
    """Issue 23: `die` of two hosts (the metadata group lost its quorum), then
    `start`: the live groups are unknown, and the start named only
    cluster.toml's groups; group 4, created online, ran on the host before
    and stayed down."""
    from shardnode.supervisor import ProcessInfo

    def info(name: str, state: str, started_at: float) -> ProcessInfo:
        return ProcessInfo(name, state, 0, 0, "", "", started_at)

    control = HostControl({
        "worker-g4": info("worker-g4", "STOPPED", 1234.0),    # ran here, stopped with the host
        "worker-g5": info("worker-g5", "STOPPED", 0.0),       # never ran here
        "worker-g6": info("worker-g6", "EXITED", 1200.0),     # found no replica here
    })
    lines: list[str] = []
    admin = MembershipAdmin(ClusterConfig.load(ROOT / "etc" / "cluster.toml"), control,  # type: ignore[arg-type]
                            progress=lines.append)

    def unknown() -> list[int]:
        raise membership.ShapeRefused("the live groups are unknown: the metadata group did not answer")

    admin.live_groups = unknown                      # type: ignore[method-assign]
    admin.group = lambda group: GroupState(group)    # type: ignore[method-assign]  (no replica answers)
    admin.restart("127.0.0.1:50051")
    assert control.started == [("127.0.0.1:50051", [0, 1, 2, 3, 4])]
    assert "and 4 (created online, ran there before)" in lines[0]


class _HintingStub:
    """A leader that answers NOT_LEADER and points elsewhere."""

    def __init__(self, hint: str, calls: list[str], address: str) -> None:
        self.hint, self.calls, self.address = hint, calls, address

    def ChangeMembership(self, request, timeout, metadata):  # type: ignore[no-untyped-def]  # noqa: N802
        self.calls.append(self.address)
        return membership.pb.ChangeMembershipResponse(status=membership.Answer.NOT_LEADER,
                                                     leader_address=self.hint)


def test_the_admin_credential_never_follows_a_hint_to_an_address_outside_cluster_toml(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With TLS off an answer can be forged: a NOT_LEADER hint to a stranger's
    address must not get the credential sent there."""
    admin = ScriptedAdmin([_state(learner=False, reachable=True)], FakeControl())
    calls: list[str] = []
    monkeypatch.setattr(membership.pb_grpc, "WorkerStub",
                        lambda channel: _HintingStub("10.66.6.6:50100", calls, channel))
    monkeypatch.setattr(admin, "_channel", lambda address: address)
    answer, why = admin._propose("127.0.0.1:50100", membership.pb.ChangeMembershipRequest(), deadline=1e9)
    assert answer is None and "refused to send the admin credential to 10.66.6.6:50100" in why
    assert calls == ["127.0.0.1:50100"]          # asked the configured leader, never the stranger
    with pytest.raises(membership.SecurityError, match="not an address of a host in cluster.toml"):
        admin._admin_stub("10.66.6.6:50100")
