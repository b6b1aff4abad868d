"""The client loads a chaos run puts on a cluster while faults are injected,
and records for the checkers (checkers.py; docs/testing.md, "Workloads and
checkers").

- `RegisterWorkload`: clients put and get a few hot keys in every group (and
  put fresh keys), every write with a value of its own; the history goes to
  the linearizability checker and the exactly-once check.
- `SetWorkload` (Jepsen's set): clients insert new elements, one key each;
  once the cluster has healed, every element ever attempted is read back:
  every acknowledged insert must be there, nothing else may be.

Both run `clients` threads, each with its own `Client` (its own sessions and
connections, as separate programs would have), log every operation in an
`OperationLog` for availability, and use a short client timeout (3 s by
default) so that an operation caught in a partition gives up and the next
one starts, instead of the whole load hanging for the fault's length.

    load = RegisterWorkload("etc/cluster.toml", clients=4, seed=7)
    load.start(); ...; load.stop(); load.read_back()
    result = check_registers(load.history())
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from ..client import Client
from ..config import ClusterConfig
from ..errors import InvalidArgument, RoutersUnreachable, ShardnodeError
from ..placement.shard_map import ShardMap
from ..testing.linearizability import HistoryRecorder, OpKind, Operation
from .operations import Action, OperationLog, Outcome
from .set_elements import SetAttempt, SetReadback

__all__ = ["ClusterTarget", "RegisterWorkload", "SetWorkload", "WorkloadCrashed", "write_outcome"]

#: A cluster.toml (str or Path), or the routers' addresses (a list or tuple of
#: "host:port"; a single router too must be given as a list).
ClusterTarget = str | Path | Sequence[str]

DEFAULT_CLIENT_TIMEOUT = 3.0
#: Client ids: the register workload's clients are 1…, its read-back 0; the
#: set workload's clients are 1001…, its read-back 1000. Distinct, so that one
#: OperationLog can hold both workloads.
_REGISTER_FIRST_CLIENT = 1
_SET_FIRST_CLIENT = 1001
#: Keys per get_many of a read-back.
_READ_BACK_BATCH = 64
#: The deadline of each read-back call: longer than the load's, since the
#: cluster has healed and an answer is what we want.
_READ_BACK_CALL_TIMEOUT = 5.0


class WorkloadCrashed(RuntimeError):
    """A workload's client thread died of an unexpected exception (a bug in
    the workload or the client, not a fault of the cluster)."""


def write_outcome(error: ShardnodeError) -> Outcome:
    """What a write's error says about it (shardnode/errors.py).

    InvalidArgument is refused before anything is sent, and
    RoutersUnreachable means every router refused the connection, so nothing
    was sent: the write was not applied. After any other error (deadline, no
    quorum, no leader, a stale session, a closed client) it may have been.
    """
    if isinstance(error, (InvalidArgument, RoutersUnreachable)):
        return Outcome.FAILED
    return Outcome.UNKNOWN


def _run_token() -> str:
    # Not from the seeded RNG: two runs with the same seed on one cluster
    # must still not see each other's keys.
    return os.urandom(4).hex()


class _Workload(ABC):
    """The client threads, pacing and life cycle both workloads share."""

    _first_client: int = 1

    def __init__(self, cluster: ClusterTarget, *, clients: int, rate: float | None, timeout: float, seed: int,
                 run_id: str | None, log: OperationLog | None) -> None:
        if clients < 1:
            raise ValueError("a workload needs at least one client")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (operations per second), or None for as fast as possible")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.cluster_config: ClusterConfig | None = None
        if isinstance(cluster, (str, Path)):
            self._config_path: Path | None = Path(cluster)
            self._routers: tuple[str, ...] = ()
            self.cluster_config = ClusterConfig.load(self._config_path)
        else:
            self._config_path = None
            self._routers = tuple(cluster)
            if not self._routers:
                raise ValueError("a workload needs a cluster.toml or at least one router address")
        self.clients = clients
        self.rate = rate
        self.timeout = timeout
        self.seed = seed
        self.run_id = run_id if run_id is not None else _run_token()
        self.log = log if log is not None else OperationLog()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._crashes: list[BaseException] = []
        self._crash_lock = threading.Lock()
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    # --- Life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the client threads; returns at once."""
        if self._threads:
            raise RuntimeError("a workload starts once")
        self.started_at = self.log.clock()
        self._threads = [
            threading.Thread(target=self._client_thread, args=(self._first_client + index,),
                             name=f"{type(self).__name__}-{index}", daemon=True)
            for index in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Ask every client to stop after its current operation and wait for
        them (at most one client timeout, plus the client's own grace).
        Raises WorkloadCrashed if a client thread died of a bug."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 10.0)
        self.stopped_at = self.log.clock()
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise WorkloadCrashed(f"client threads did not stop: {', '.join(stuck)}")
        if self._crashes:
            raise WorkloadCrashed(f"a client thread died: {self._crashes[0]!r}") from self._crashes[0]

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stopping.is_set()

    def connect(self, timeout: float | None = None) -> Client:
        """A new client of the cluster (each thread has its own)."""
        budget = self.timeout if timeout is None else timeout
        if self._config_path is not None:
            return Client.from_config(self._config_path, timeout=budget)
        return Client(list(self._routers), timeout=budget)

    # --- One client thread ------------------------------------------------------------

    def _client_thread(self, client_id: int) -> None:
        # Every client's RNG follows from the seed and its id alone, whatever
        # the threads' interleaving.
        rng = random.Random(f"{self.seed}/{type(self).__name__}/{client_id}")
        interval = self.clients / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        try:
            with self.connect() as client:
                for sequence in itertools.count(1):
                    if self._stopping.is_set():
                        return
                    if interval:
                        next_at += interval
                        if self._stopping.wait(max(0.0, next_at - time.monotonic())):
                            return
                    self._one_operation(client, client_id, sequence, rng)
        except BaseException as exc:
            with self._crash_lock:
                self._crashes.append(exc)
            raise

    @abstractmethod
    def _one_operation(self, client: Client, client_id: int, sequence: int, rng: random.Random) -> None:
        """One operation of the workload, recorded in its history."""

    def _require_stopped(self, what: str) -> None:
        if self._threads and not self._stopping.is_set():
            raise RuntimeError(f"{what} needs the workload stopped first")


# --- Registers --------------------------------------------------------------------------


class RegisterWorkload(_Workload):
    """Puts and linearizable gets on hot keys spread over every group, and
    puts of fresh keys, every write with a value no other write uses.

    Hot keys: `hot_keys_per_group` for each group of `shard_map` (by default
    the initial map of the cluster.toml; with router addresses and no map,
    `hot_keys_per_group * 8` keys hashed at random). A key-space move later
    in the run does not matter: the keys stay what they are, and the check
    does not depend on which group serves them.

    Each operation is a get with probability `read_fraction`, else a put,
    to a fresh key with probability `fresh_fraction` (it must find the key
    absent), else to a hot key.
    """

    _first_client = _REGISTER_FIRST_CLIENT

    def __init__(self, cluster: ClusterTarget, *, clients: int = 4, rate: float | None = None,
                 timeout: float = DEFAULT_CLIENT_TIMEOUT, seed: int = 0, run_id: str | None = None,
                 log: OperationLog | None = None, hot_keys_per_group: int = 2, read_fraction: float = 0.4,
                 fresh_fraction: float = 0.2, shard_map: ShardMap | None = None) -> None:
        super().__init__(cluster, clients=clients, rate=rate, timeout=timeout, seed=seed, run_id=run_id, log=log)
        if hot_keys_per_group < 1:
            raise ValueError("hot_keys_per_group must be at least 1")
        if not (0.0 <= read_fraction <= 1.0 and 0.0 <= fresh_fraction <= 1.0):
            raise ValueError("read_fraction and fresh_fraction are probabilities")
        self.read_fraction = read_fraction
        self.fresh_fraction = fresh_fraction
        if shard_map is None and self.cluster_config is not None:
            shard_map = ShardMap.build(self.cluster_config.groups, self.cluster_config.virtual_nodes)
        self.hot_keys: tuple[bytes, ...] = _hot_keys(f"reg/{self.run_id}/", hot_keys_per_group, shard_map)
        self.recorder = HistoryRecorder(clock=self.log.clock)
        self._fresh_lock = threading.Lock()
        self._fresh_acknowledged: list[bytes] = []

    def history(self) -> list[Operation]:
        """Every put and get so far, for `checkers.check_registers` (failed
        gets are left out: they observed nothing)."""
        return self.recorder.operations()

    def read_back(self, timeout: float = 60.0) -> int:
        """After `stop()`, once the cluster has healed: read every hot key
        and every acknowledged fresh key again (linearizable gets, retried
        until answered or `timeout` runs out), into the history, so that a
        lost write shows as a read the checker cannot linearize. Returns how
        many keys were read."""
        self._require_stopped("read_back")
        with self._fresh_lock:
            keys = list(self.hot_keys) + self._fresh_acknowledged
        values = _read_all(self, _REGISTER_FIRST_CLIENT - 1, keys, timeout, Action.GET, self.recorder)
        return len(values)

    def _one_operation(self, client: Client, client_id: int, sequence: int, rng: random.Random) -> None:
        if rng.random() < self.read_fraction:
            self._get(client, client_id, rng.choice(self.hot_keys))
            return
        fresh = rng.random() < self.fresh_fraction
        key = f"reg/{self.run_id}/fresh/{client_id}-{sequence}".encode() if fresh else rng.choice(self.hot_keys)
        # Unique per write across the run: the exactly-once check relies on it.
        value = f"{self.run_id}/{client_id}/{sequence}".encode()
        if self._put(client, client_id, key, value) and fresh:
            with self._fresh_lock:
                self._fresh_acknowledged.append(key)

    def _get(self, client: Client, client_id: int, key: bytes) -> None:
        handle = self.recorder.invoke(client_id, OpKind.GET, key)
        logged = self.log.begin(client_id, Action.GET, key)
        try:
            value = client.get(key)
        except ShardnodeError:
            # A read that got no answer changed nothing: leave it out.
            self.recorder.failed(handle)
            self.log.finish(logged, Outcome.FAILED)
            return
        self.recorder.ok(handle, value)
        self.log.finish(logged, Outcome.OK)

    def _put(self, client: Client, client_id: int, key: bytes, value: bytes) -> bool:
        handle = self.recorder.invoke(client_id, OpKind.PUT, key, value)
        logged = self.log.begin(client_id, Action.PUT, key)
        try:
            previous = client.put(key, value)
        except ShardnodeError as exc:
            outcome = write_outcome(exc)
            if outcome is Outcome.FAILED:
                self.recorder.failed(handle)
            else:
                self.recorder.unknown(handle)
            self.log.finish(logged, outcome)
            return False
        self.recorder.ok(handle, previous)
        self.log.finish(logged, Outcome.OK)
        return True


def _hot_keys(prefix: str, per_group: int, shard_map: ShardMap | None) -> tuple[bytes, ...]:
    """`per_group` keys in each group of the map (the first names that hash
    there), or `per_group * 8` names when no map is known."""
    if shard_map is None:
        return tuple(f"{prefix}hot-{i}".encode() for i in range(per_group * 8))
    wanted = {group: per_group for group in shard_map.groups if shard_map.owned_by(group)}
    keys: list[bytes] = []
    for i in itertools.count():
        if not wanted:
            return tuple(keys)
        key = f"{prefix}hot-{i}".encode()
        group = shard_map.group_for(key)
        if wanted.get(group, 0) > 0:
            keys.append(key)
            wanted[group] -= 1
            if not wanted[group]:
                del wanted[group]
    raise AssertionError("unreachable")


# --- Set --------------------------------------------------------------------------------


class SetWorkload(_Workload):
    """Jepsen's set: every operation inserts a new element, a key
    `set/<run-id>/<n>` (n counts up across the clients) with a value of its
    own. Keys hash all over the key space, so within a few hundred inserts
    every group, and every range a shape change moves, holds elements.

    After `stop()` and once the cluster has healed, `read_back()` reads
    every element ever attempted, and `probes` numbers after the last one
    (never attempted: they must be absent), for `checkers.check_set`.
    """

    _first_client = _SET_FIRST_CLIENT

    def __init__(self, cluster: ClusterTarget, *, clients: int = 4, rate: float | None = None,
                 timeout: float = DEFAULT_CLIENT_TIMEOUT, seed: int = 0, run_id: str | None = None,
                 log: OperationLog | None = None) -> None:
        super().__init__(cluster, clients=clients, rate=rate, timeout=timeout, seed=seed, run_id=run_id, log=log)
        self._element_lock = threading.Lock()
        self._next_element = 0
        self._attempts: list[SetAttempt] = []
        # Inserts sent and not answered yet, by element number: every number
        # handed out is an attempt, so the read-back never takes one for a
        # never-attempted probe.
        self._in_flight: dict[int, SetAttempt] = {}

    def element_key(self, number: int) -> bytes:
        return f"set/{self.run_id}/{number}".encode()

    def attempts(self) -> tuple[SetAttempt, ...]:
        """Every insert so far, with its outcome; one still in flight (a
        client stuck past `stop()`) counts as unknown, with no end."""
        with self._element_lock:
            return tuple(self._attempts) + tuple(self._in_flight.values())

    def read_back(self, timeout: float = 60.0, probes: int = 16) -> SetReadback:
        """After `stop()`, once the cluster has healed: read every element
        ever attempted and `probes` never attempted, each retried until
        answered or `timeout` runs out."""
        self._require_stopped("read_back")
        with self._element_lock:
            keys = [self.element_key(n) for n in range(self._next_element + probes)]
        values = _read_all(self, _SET_FIRST_CLIENT - 1, keys, timeout, Action.READ, None)
        return SetReadback(values=values, unreadable=frozenset(k for k in keys if k not in values))

    def _one_operation(self, client: Client, client_id: int, sequence: int, rng: random.Random) -> None:
        start = self.log.clock()
        with self._element_lock:
            number = self._next_element
            self._next_element += 1
            key = self.element_key(number)
            value = f"{self.run_id}/element/{number}".encode()
            self._in_flight[number] = SetAttempt(client_id, key, value, Outcome.UNKNOWN, None, start, None)
        logged = self.log.begin(client_id, Action.INSERT, key)
        previous: bytes | None = None
        try:
            previous = client.put(key, value)
            outcome = Outcome.OK
        except ShardnodeError as exc:
            outcome = write_outcome(exc)
        self.log.finish(logged, outcome)
        end = self.log.clock()
        with self._element_lock:
            del self._in_flight[number]
            self._attempts.append(SetAttempt(client_id, key, value, outcome, previous, start, end))


# --- Reading back -----------------------------------------------------------------------


def _read_all(workload: _Workload, client_id: int, keys: list[bytes], timeout: float, action: Action,
              recorder: HistoryRecorder | None) -> dict[bytes, bytes | None]:
    """Read every key (linearizable gets in batches), retrying those whose
    read failed until all are read or `timeout` runs out. Every read is in
    the operation log, and in `recorder` when given (a failed one dropped).
    Returns key → value (None: absent) for the keys read."""
    deadline = time.monotonic() + timeout
    values: dict[bytes, bytes | None] = {}
    pending = list(dict.fromkeys(keys))
    pause = 0.2
    with workload.connect(_READ_BACK_CALL_TIMEOUT) as client:
        while pending:
            for start in range(0, len(pending), _READ_BACK_BATCH):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                batch = pending[start:start + _READ_BACK_BATCH]
                handles = [recorder.invoke(client_id, OpKind.GET, key) if recorder else -1 for key in batch]
                logged = [workload.log.begin(client_id, action, key) for key in batch]
                try:
                    read = client.get_many(batch, timeout=min(remaining, _READ_BACK_CALL_TIMEOUT))
                except ShardnodeError:
                    # get_many raises the first failure once all are over: some
                    # may have been answered, but which is not said; ask again.
                    for handle, entry in zip(handles, logged):
                        if recorder:
                            recorder.failed(handle)
                        workload.log.finish(entry, Outcome.FAILED)
                    continue
                for key, value, handle, entry in zip(batch, read, handles, logged):
                    if recorder:
                        recorder.ok(handle, value)
                    workload.log.finish(entry, Outcome.OK)
                    values[key] = value
            pending = [key for key in pending if key not in values]
            if not pending or time.monotonic() + pause >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
    return values
