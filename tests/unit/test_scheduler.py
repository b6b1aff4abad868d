"""The scheduler's lease, the intent records and the scheduler's loop
(shardnode/placement/lease.py, intents.py, scheduler.py), against an
in-memory metadata group: one holder at a time, a deposed holder's writes
refused, intents recorded once and carried on by whoever holds the lease."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shardnode.config import ClusterConfig
from shardnode.errors import ShardnodeError
from shardnode.placement.intents import IntentBook, IntentKind, IntentState, ShapeRefused
from shardnode.placement.lease import (FENCE_KEY, LEASE_KEY, LeaseLost, LeaseState, SchedulerLease, decode_fence,
                                      encode_fence)
from shardnode.placement.scheduler import Execution, Outcome, Scheduler
from tests.sim.metadata import InMemoryMetadata


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


# --- The lease -------------------------------------------------------------------------------------


def test_one_holder_at_a_time_and_a_take_over_raises_the_token() -> None:
    async def scenario() -> None:
        meta, clock = InMemoryMetadata(), Clock()
        a = SchedulerLease(meta, "a", duration=8.0, clock=clock)
        b = SchedulerLease(meta, "b", duration=8.0, clock=clock)
        assert await a.acquire() and a.token == 1
        assert not await b.acquire()                     # a's lease is live
        clock.now += 5
        await a.renew()
        clock.now += 5
        assert not await b.acquire()                     # renewed: still live
        clock.now += 9
        assert await b.acquire() and b.token == 2        # expired: taken over, a larger token
        assert decode_fence(meta.values[FENCE_KEY]) == 2
        with pytest.raises(LeaseLost):
            await a.renew()
        # a's guarded writes no longer land; b's do.
        swapped, _ = await meta.compare_and_set(b"k", None, b"from a", guards=((FENCE_KEY, encode_fence(1)),))
        assert not swapped
        swapped, _ = await meta.compare_and_set(b"k", None, b"from b", guards=b.guards)
        assert swapped
        await b.release()
        assert LeaseState.decode(meta.values[LEASE_KEY]).expired(int(clock.now * 1000))
        assert await a.acquire() and a.token == 3        # released: no need to wait for the expiry

    run(scenario())


def test_a_renewal_that_timed_out_but_landed_does_not_lose_the_lease() -> None:
    """The metadata group applied a renewal whose answer was lost (a
    timeout on a loaded machine): the next renewal finds its own newer
    lease, not a rival's, and keeps it (it used to raise LeaseLost)."""
    async def scenario() -> None:
        meta, clock = InMemoryMetadata(), Clock()
        lease = SchedulerLease(meta, "a", duration=8.0, clock=clock)
        assert await lease.acquire()
        landed = meta.compare_and_set

        async def applied_then_timed_out(*args, **kwargs):  # type: ignore[no-untyped-def]
            await landed(*args, **kwargs)
            raise ShardnodeError("the metadata group did not answer in time")

        meta.compare_and_set = applied_then_timed_out   # type: ignore[method-assign]
        clock.now += 2
        with pytest.raises(ShardnodeError):
            await lease.renew()
        meta.compare_and_set = landed                   # type: ignore[method-assign]
        clock.now += 2
        await lease.renew()
        assert lease.held and LeaseState.decode(meta.values[LEASE_KEY]).holder == "a"

    run(scenario())


def test_the_renewal_task_outlives_a_renewal_that_failed() -> None:
    """One renewal that fails (the metadata group slow for a moment) must not
    end the renewals: the lease would run out under a holder still working,
    and a router would take over and fence it out (seen in a long chaos run:
    the lease went from holder to holder and a group remove never finished)."""
    async def scenario() -> None:
        meta = InMemoryMetadata()
        failures = {"left": 1}

        async def slow(run: Execution) -> Outcome:
            await asyncio.sleep(1.0)            # several renewal periods
            return Outcome("ok")

        scheduler = Scheduler(cluster(), meta, {IntentKind.REBALANCE: slow}, holder="a",
                              lease=SchedulerLease(meta, "a", duration=0.3))
        renew = scheduler.lease.renew
        renewals = {"count": 0}

        async def flaky_renew() -> None:
            if failures["left"]:
                failures["left"] -= 1
                raise ShardnodeError("the metadata group did not answer in time")
            renewals["count"] += 1
            await renew()

        scheduler.lease.renew = flaky_renew            # type: ignore[method-assign]
        intent, _ = await scheduler.submit(IntentKind.REBALANCE, {})
        finished = await scheduler.run_until_finished(intent.intent_id)
        assert finished.state is IntentState.DONE
        assert renewals["count"] >= 3, renewals      # it went on renewing after the failure

    run(scenario())


def test_a_deposed_holder_paused_past_its_expiry_cannot_write() -> None:
    async def scenario() -> None:
        meta, clock = InMemoryMetadata(), Clock()
        a = SchedulerLease(meta, "a", clock=clock)
        assert await a.acquire()
        stale_guards = a.guards
        clock.now += 60                                  # a is paused (SIGSTOP) for a minute
        b = SchedulerLease(meta, "b", clock=clock)
        assert await b.acquire()
        swapped, _ = await meta.compare_and_set(b"placement/intents", None, b"x", guards=stale_guards)
        assert not swapped                               # a wakes up and writes: refused

    run(scenario())


def test_an_unreadable_lease_is_taken_over_with_a_larger_token() -> None:
    async def scenario() -> None:
        meta, clock = InMemoryMetadata(), Clock()
        meta.values[LEASE_KEY] = b"garbage"
        meta.values[FENCE_KEY] = b"\x91\x07"             # [7]
        lease = SchedulerLease(meta, "a", clock=clock)
        assert await lease.acquire() and lease.token == 8

    run(scenario())


# --- Intents ---------------------------------------------------------------------------------------


def test_the_same_request_attaches_to_the_unfinished_intent() -> None:
    async def scenario() -> None:
        book = IntentBook(InMemoryMetadata())
        first, new = await book.submit(IntentKind.LEAVE, {"server": "h5:1", "clean": True})
        again, new_again = await book.submit(IntentKind.LEAVE, {"server": "h5:1", "clean": True})
        other, new_other = await book.submit(IntentKind.GROUP_ADD, {"hosts": ("h1", "h2", "h3")})
        same_hosts, _ = await book.submit(IntentKind.GROUP_ADD, {"hosts": ["h1", "h2", "h3"]})
        assert new and not new_again and again.intent_id == first.intent_id
        assert new_other and same_hosts.intent_id == other.intent_id
        assert len(await book.all()) == 2
        cancelled = await book.cancel(first.intent_id)
        assert cancelled.cancel_requested

    run(scenario())


# --- The scheduler ---------------------------------------------------------------------------------


def cluster() -> ClusterConfig:
    return ClusterConfig.from_dict({
        "cluster": {"name": "t", "replicas": 3, "groups": 1},
        "host": [{"name": f"h{i}", "address": f"127.0.0.{i}", "router_port": 50051, "worker_port_base": 50100,
                  "metrics_port": 9090} for i in (1, 2, 3)],
    })


class Recorder:
    """An executor that records what it did in the intent's work, in steps,
    so that a take-over can be seen to carry on from the last recorded step."""

    def __init__(self, steps: int = 3, stop_at: int | None = None) -> None:
        self.steps = steps
        self.stop_at = stop_at
        self.done: list[tuple[str, int]] = []
        self.stopped = asyncio.Event()

    async def __call__(self, run: Execution) -> Outcome:
        step = run.work.get("step", 0)
        while step < self.steps:
            if self.stop_at is not None and step == self.stop_at:
                self.stopped.set()
                await asyncio.sleep(3600)            # the holder hangs here (paused, cut off)
            self.done.append((run.scheduler.lease.holder, step))
            await run.say(f"step {step}")
            step += 1
            await run.save(step=step)
        return Outcome(f"{self.steps} steps", {"steps": self.steps})


def test_a_command_drives_its_intent_and_gets_its_outcome() -> None:
    async def scenario() -> None:
        meta = InMemoryMetadata()
        recorder = Recorder()
        scheduler = Scheduler(cluster(), meta, {IntentKind.REBALANCE: recorder}, holder="cli-1")
        intent, _ = await scheduler.submit(IntentKind.REBALANCE, {})
        lines: list[str] = []
        finished = await scheduler.run_until_finished(intent.intent_id, on_line=lines.append)
        assert finished.state is IntentState.DONE and finished.outcome == "3 steps"
        assert lines == ["step 0", "step 1", "step 2"]
        assert not scheduler.lease.held                  # released once its intent is done

    run(scenario())


def test_a_refusal_fails_the_intent_with_its_reason() -> None:
    async def scenario() -> None:
        async def refuse(run: Execution) -> Outcome:
            raise ShapeRefused("group 0 would drop to 2 voters")

        scheduler = Scheduler(cluster(), InMemoryMetadata(), {IntentKind.LEAVE: refuse}, holder="cli")
        intent, _ = await scheduler.submit(IntentKind.LEAVE, {"server": "x", "clean": False})
        finished = await scheduler.run_until_finished(intent.intent_id)
        assert finished.state is IntentState.FAILED and "drop to 2 voters" in finished.outcome

    run(scenario())


def test_a_killed_command_is_carried_on_from_its_work_and_the_zombie_changes_nothing() -> None:
    async def scenario() -> None:
        meta, clock = InMemoryMetadata(), Clock()
        first = Recorder(steps=4, stop_at=2)
        zombie = Scheduler(cluster(), meta, {IntentKind.REBALANCE: first}, holder="cli-1",
                           lease=SchedulerLease(meta, "cli-1", duration=8.0, clock=clock))
        intent, _ = await zombie.submit(IntentKind.REBALANCE, {})
        hung = asyncio.create_task(zombie.run_until_finished(intent.intent_id))
        await first.stopped.wait()
        # Its lease runs out (the renewal task is as stuck as the command).
        clock.now += 60
        second = Recorder(steps=4)
        rerun = Scheduler(cluster(), meta, {IntentKind.REBALANCE: second}, holder="cli-2",
                          lease=SchedulerLease(meta, "cli-2", duration=8.0, clock=clock))
        again, new = await rerun.submit(IntentKind.REBALANCE, {})
        assert not new and again.intent_id == intent.intent_id
        finished = await rerun.run_until_finished(intent.intent_id)
        assert finished.state is IntentState.DONE
        assert [s for _, s in first.done] == [0, 1] and [s for _, s in second.done] == [2, 3]
        # The zombie wakes up and tries to record progress: refused.
        execution = Execution(zombie, finished, lambda line: None)
        with pytest.raises(LeaseLost):
            await execution.say("late line")
        hung.cancel()
        await asyncio.gather(hung, return_exceptions=True)

    run(scenario())


def test_a_command_whose_lease_is_taken_over_mid_work_goes_on_watching() -> None:
    """The holder's renewal finds the lease taken (it was paused past its
    expiry): its work is stopped, and the command follows the new holder to
    the intent's end instead of dying of the cancellation (seen in CI: the
    CLI exited 1 with a CancelledError)."""
    async def scenario() -> None:
        meta, clock = InMemoryMetadata(), Clock()
        gate, running = asyncio.Event(), asyncio.Event()

        async def slow(run: Execution) -> Outcome:
            running.set()
            await gate.wait()
            await run.say(f"finished by {run.scheduler.lease.holder}")
            return Outcome("ok")

        first = Scheduler(cluster(), meta, {IntentKind.REBALANCE: slow}, holder="a",
                          lease=SchedulerLease(meta, "a", duration=0.3, clock=clock))
        intent, _ = await first.submit(IntentKind.REBALANCE, {})
        lines: list[str] = []
        deposed = asyncio.create_task(first.run_until_finished(intent.intent_id, on_line=lines.append))
        await running.wait()
        clock.now += 60                                  # a's lease ran out while it was paused
        second = Scheduler(cluster(), meta, {IntentKind.REBALANCE: slow}, holder="b",
                           lease=SchedulerLease(meta, "b", duration=0.3, clock=clock))
        assert await second.lease.acquire()
        await asyncio.sleep(0.3)                         # a's renewal finds out and stops a's work
        gate.set()
        await second._drive(until=intent.intent_id)
        finished = await asyncio.wait_for(deposed, 10)
        assert finished.state is IntentState.DONE and lines == ["finished by b"], lines

    run(scenario())


def test_a_waiting_command_follows_the_holder_and_prints_its_lines() -> None:
    async def scenario() -> None:
        meta = InMemoryMetadata()
        gate = asyncio.Event()

        async def slow(run: Execution) -> Outcome:
            await run.say("started")
            await gate.wait()
            await run.say("finished")
            return Outcome("ok")

        holder = Scheduler(cluster(), meta, {IntentKind.REBALANCE: slow}, holder="a")
        intent, _ = await holder.submit(IntentKind.REBALANCE, {})
        driving = asyncio.create_task(holder.run_until_finished(intent.intent_id))
        await asyncio.sleep(0.05)
        watcher = Scheduler(cluster(), meta, {IntentKind.REBALANCE: slow}, holder="b")
        lines: list[str] = []
        watching = asyncio.create_task(watcher.run_until_finished(intent.intent_id, on_line=lines.append))
        await asyncio.sleep(0.6)
        gate.set()
        finished = await watching
        await driving
        assert finished.state is IntentState.DONE and lines == ["started", "finished"]

    run(scenario())


def test_intents_run_one_at_a_time_in_the_order_recorded() -> None:
    async def scenario() -> None:
        meta = InMemoryMetadata()
        order: list[str] = []

        def executor(name: str):  # type: ignore[no-untyped-def]
            async def act(run: Execution) -> Outcome:
                order.append(f"{name} start")
                await asyncio.sleep(0.01)
                order.append(f"{name} end")
                return Outcome(name)
            return act

        executors: dict[IntentKind, Any] = {IntentKind.LEAVE: executor("leave"),
                                             IntentKind.REBALANCE: executor("rebalance")}
        a = Scheduler(cluster(), meta, executors, holder="a")
        b = Scheduler(cluster(), meta, executors, holder="b")
        first, _ = await a.submit(IntentKind.LEAVE, {"server": "h3", "clean": False})
        second, _ = await b.submit(IntentKind.REBALANCE, {})
        await asyncio.gather(b.run_until_finished(second.intent_id), a.run_until_finished(first.intent_id))
        assert order == ["leave start", "leave end", "rebalance start", "rebalance end"]

    run(scenario())


def test_a_cancelled_intent_that_has_not_started_is_dropped_unrun() -> None:
    async def scenario() -> None:
        meta = InMemoryMetadata()
        ran: list[str] = []

        async def act(run: Execution) -> Outcome:
            ran.append(run.intent.kind.value)
            return Outcome("done")

        scheduler = Scheduler(cluster(), meta, {IntentKind.LEAVE: act, IntentKind.REBALANCE: act}, holder="a")
        first, _ = await scheduler.submit(IntentKind.LEAVE, {"server": "h2", "clean": False})
        second, _ = await scheduler.submit(IntentKind.REBALANCE, {})
        await scheduler.book.cancel(first.intent_id)
        finished = await scheduler.run_until_finished(second.intent_id)
        first_after = await scheduler.book.get(first.intent_id)
        assert first_after.state is IntentState.CANCELLED and finished.state is IntentState.DONE
        assert ran == ["rebalance"]
        with pytest.raises(Exception, match="no intent 12345"):
            await scheduler.book.cancel(12345)

    run(scenario())


def test_arguments_are_checked_before_anything_is_recorded() -> None:
    from shardnode.config import ConfigError
    from shardnode.placement.shape_change import check_arguments

    config = cluster()
    check_arguments(config, {"server": "127.0.0.2:50051"})
    check_arguments(config, {"group": 0, "host": "h3"})
    for bad in ({"server": "127.0.0.9:1"}, {"host": "h9", "group": 0}, {"hosts": ["h1", "nope"]},
                {"group": 99}):
        with pytest.raises(ConfigError):
            check_arguments(config, bad)
