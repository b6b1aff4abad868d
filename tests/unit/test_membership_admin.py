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
