"""YCSB-style load generator behind `shardnode bench`.

Workloads (Cooper et al., "Benchmarking Cloud Serving Systems with YCSB"):

| workload | operations |
|---|---|
| `load` | inserts keys 0 .. keys-1 once each, until every key is in (a failed insert is retried) |
| `a`    | 50% read, 50% update |
| `b`    | 95% read, 5% update |
| `c`    | 100% read |

Run `load` first so that the reads of a/b/c find their keys (reads of absent
keys still count as operations; they are reported as `read_misses`).

`load` is not cut short by a default duration: it runs until every key is
in. A failed insert is retried (up to `LOAD_ATTEMPTS` times per key); a key
that never went in, a duration given explicitly, or Ctrl-C leave the load
incomplete, and the result says so (`loaded` < `keys`; the CLI then exits
non-zero with a line saying how many keys were loaded).

Keys are `KEY_PREFIX + "%012d" % n`, chosen uniformly or by YCSB's scrambled
Zipfian distribution (theta 0.99: a few hot keys, spread over the key space
by a hash, hence over the shards). Each of `clients` callers runs
operations back to back (closed loop). Engines:

- `async` (the default): the callers are asyncio tasks of one event loop
  (uvloop) sharing one `AsyncClient`, whose concurrent operations are
  coalesced on one stream per router (many to a message, as TiKV's batch
  commands): what an application written for throughput does, and what the
  system can do. 256 callers by default.
- `threads`: the callers are threads sharing one blocking `Client` (or one
  Client each with `client_per_thread`): what a threaded application of
  blocking calls gets; on CPython the callers' own GIL contention bounds it
  well below the system (5-14x below on the 2-core test machine with 32
  threads, issue 23).

The result says which engine ran, how many callers, and how many
connections (router streams) carried them.

Honesty rules: only successful operations count as operations and in the
latency percentiles; failures are counted separately per operation and per
error class; the throughput is successful operations divided by the wall
time from the start until every thread stopped.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# rich and the client are imported where they are used: `shardnode --help`
# builds this command's parser from the names below without them.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .client import AsyncClient, Client
from .errors import RoutersUnreachable

__all__ = [
    "DISTRIBUTIONS",
    "ENGINES",
    "WORKLOADS",
    "BenchConfig",
    "BenchResult",
    "OperationStats",
    "ScrambledZipfian",
    "render_summary",
    "run_bench",
]

#: Operation mix of each workload: (operation, share).
WORKLOADS: dict[str, tuple[tuple[str, float], ...]] = {
    "load": (("insert", 1.0),),
    "a": (("read", 0.5), ("update", 0.5)),
    "b": (("read", 0.95), ("update", 0.05)),
    "c": (("read", 1.0),),
}
DISTRIBUTIONS = ("zipfian", "uniform")
PERCENTILES = (50.0, 95.0, 99.0, 99.9)
DEFAULT_DURATION = 10.0       # a, b and c; `load` runs until every key is in
ENGINES = ("async", "threads")
DEFAULT_CALLERS = {"async": 256, "threads": 16}
LOAD_ATTEMPTS = 5             # tries per key before `load` gives it up
ZIPFIAN_THETA = 0.99          # YCSB's default skew


@dataclass(slots=True, frozen=True)
class BenchConfig:
    workload: str = "a"
    clients: int = 16
    keys: int = 10_000
    value_size: int = 100
    duration: float | None = None       # None: DEFAULT_DURATION, or no limit for `load`
    distribution: str = "zipfian"
    key_prefix: str = "ycsb/"
    seed: int | None = None
    client_per_thread: bool = False
    engine: str = "threads"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)} (got {self.engine!r})")
        if self.client_per_thread and self.engine != "threads":
            raise ValueError("--client-per-thread needs the threads engine (--engine threads)")
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)} (got {self.workload!r})")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}")
        if self.clients < 1 or self.keys < 1 or self.value_size < 0:
            raise ValueError("clients and keys must be at least 1, value size at least 0")
        if self.duration is not None and not (self.duration > 0 and math.isfinite(self.duration)):
            raise ValueError("duration must be a positive number of seconds")

    @property
    def time_limit(self) -> float | None:
        """How long the run may last (None: until `load` has every key in)."""
        if self.duration is not None:
            return self.duration
        return None if self.workload == "load" else DEFAULT_DURATION

    def key(self, index: int) -> bytes:
        return f"{self.key_prefix}{index:012d}".encode()


class ScrambledZipfian:
    """Zipfian item numbers in [0, items), hot items scattered by a hash
    (YCSB's ScrambledZipfianGenerator; Gray et al., SIGMOD 1994)."""

    def __init__(self, items: int, rng: random.Random, theta: float = ZIPFIAN_THETA,
                 zetan: float | None = None) -> None:
        self.items = items
        self.rng = rng
        self.theta = theta
        self.zetan = zeta(items, theta) if zetan is None else zetan
        zeta2 = 1.0 + 0.5 ** theta
        self.alpha = 1.0 / (1.0 - theta)
        self.eta = (1.0 - (2.0 / items) ** (1.0 - theta)) / (1.0 - zeta2 / self.zetan) if items > 2 else 0.0
        self.half_pow_theta = 0.5 ** theta

    def rank(self) -> int:
        """The next item's popularity rank (0 is the most popular)."""
        u = self.rng.random()
        uz = u * self.zetan
        if uz < 1.0 or self.items == 1:
            return 0
        if uz < 1.0 + self.half_pow_theta or self.items == 2:
            return 1
        return min(self.items - 1, int(self.items * (self.eta * u - self.eta + 1.0) ** self.alpha))

    def next(self) -> int:
        return _fnv1a64(self.rank()) % self.items


def zeta(items: int, theta: float) -> float:
    """sum(1 / i**theta for i in 1..items): exact up to a million terms, the
    integral of the tail beyond (relative error far below 1e-6)."""
    exact = min(items, 1_000_000)
    total = math.fsum(i ** -theta for i in range(1, exact + 1))
    if items > exact:
        total += ((items + 0.5) ** (1 - theta) - (exact + 0.5) ** (1 - theta)) / (1 - theta)
    return total


def _fnv1a64(number: int) -> int:
    value = 0xCBF29CE484222325
    for byte in number.to_bytes(8, "little"):
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


@dataclass(slots=True)
class OperationStats:
    """Successful operations' latencies (seconds) and failures of one kind of operation."""

    name: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def ops(self) -> int:
        return len(self.latencies)

    def merge(self, other: "OperationStats") -> None:
        self.latencies.extend(other.latencies)
        self.errors += other.errors

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the sorted latencies (call `finish` first)."""
        if not self.latencies:
            return math.nan
        rank = max(1, math.ceil(p / 100.0 * len(self.latencies)))
        return self.latencies[rank - 1]


@dataclass(slots=True)
class BenchResult:
    config: BenchConfig
    elapsed: float
    operations: dict[str, OperationStats]
    errors_by_type: Counter[str]
    read_misses: int
    interrupted: bool = False
    loaded: int = 0             # `load`: distinct keys inserted
    stopped_by: str | None = None   # the error that ended the run early (no router listening)
    connections: int = 0        # router streams (connections) the callers' operations went through

    @property
    def complete(self) -> bool:
        """False for a `load` that left keys out."""
        return self.config.workload != "load" or self.loaded >= self.config.keys

    @property
    def ops(self) -> int:
        return sum(s.ops for s in self.operations.values())

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.operations.values())

    def throughput(self, ops: int) -> float:
        return ops / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable summary; latencies in milliseconds."""
        def latency(stats: OperationStats) -> dict[str, float | None]:
            if not stats.latencies:
                return {"mean": None, "max": None, **{_pname(p): None for p in PERCENTILES}}
            return {
                "mean": round(1000 * math.fsum(stats.latencies) / stats.ops, 3),
                **{_pname(p): round(1000 * stats.percentile(p), 3) for p in PERCENTILES},
                "max": round(1000 * stats.latencies[-1], 3),
            }

        return {
            "workload": self.config.workload,
            "distribution": self.config.distribution,
            "engine": self.config.engine,
            "clients": self.config.clients,
            "callers": self.config.clients,
            "connections": self.connections,
            "client_per_thread": self.config.client_per_thread,
            "keys": self.config.keys,
            "value_size": self.config.value_size,
            "duration_s": round(self.elapsed, 3),
            "interrupted": self.interrupted,
            "total": {"ops": self.ops, "errors": self.errors, "ops_per_s": round(self.throughput(self.ops), 1)},
            "operations": {
                name: {"ops": s.ops, "errors": s.errors, "ops_per_s": round(self.throughput(s.ops), 1),
                       "latency_ms": latency(s)}
                for name, s in self.operations.items()
            },
            "read_misses": self.read_misses,
            "errors_by_type": dict(self.errors_by_type),
            **({"loaded": self.loaded, "complete": self.complete} if self.config.workload == "load" else {}),
            **({"stopped_by": self.stopped_by} if self.stopped_by else {}),
        }


def _pname(p: float) -> str:
    return f"p{p:g}"


class _Caller:
    """One closed-loop caller's choices and counts; a thread or an asyncio
    task runs it (`run_blocking` / `run_async`), and owns its stats until it
    is done."""

    def __init__(self, number: int, config: BenchConfig, stop: threading.Event,
                 inserts: "_Inserts", zetan: float | None, seed: int) -> None:
        self.config = config
        self.stop = stop
        self.inserts = inserts
        self.rng = random.Random(seed * 1_000_003 + number)
        self.value = self.rng.randbytes(config.value_size)
        self.stats = {name: OperationStats(name) for name, _ in WORKLOADS[config.workload]}
        self.errors_by_type: Counter[str] = Counter()
        self.read_misses = 0
        self.stopped_by: str | None = None
        self.done = 0                        # operations attempted, for the progress display
        self.finished = False
        self.zipf = (ScrambledZipfian(config.keys, self.rng, zetan=zetan)
                     if config.distribution == "zipfian" else None)
        mix = WORKLOADS[config.workload]
        self.names = [name for name, _ in mix]
        self.cumulative = list(itertools.accumulate(share for _, share in mix))

    def _key_index(self) -> int:
        return self.zipf.next() if self.zipf is not None else self.rng.randrange(self.config.keys)

    def _choose(self) -> str:
        if len(self.names) == 1:
            return self.names[0]
        u = self.rng.random()
        for name, edge in zip(self.names, self.cumulative):
            if u < edge:
                return name
        return self.names[-1]

    def next(self) -> tuple[str, int] | None:
        """The next operation and key number; None when the caller is done."""
        if self.stop.is_set():
            return None
        op = self._choose()
        if op != "insert":
            return op, self._key_index()
        index = self.inserts.next()
        return None if index is None else (op, index)

    def succeeded(self, op: str, index: int, seconds: float, found: bool) -> None:
        self.stats[op].latencies.append(seconds)
        if op == "read" and not found:
            self.read_misses += 1
        if op == "insert":
            self.inserts.done(index)
        self.done += 1

    def failed(self, op: str, index: int, exc: Exception) -> None:
        # Counted, never fatal: the bench reports errors.
        self.stats[op].errors += 1
        self.errors_by_type[type(exc).__name__] += 1
        if isinstance(exc, RoutersUnreachable):
            # Nothing listens on any router: every further operation would fail at once.
            self.stopped_by = str(exc)
            self.stop.set()
        if op == "insert":
            self.inserts.failed(index)
        self.done += 1

    def run_blocking(self, client: Client) -> None:
        try:
            while (chosen := self.next()) is not None:
                op, index = chosen
                key = self.config.key(index)
                start = time.perf_counter()
                try:
                    if op == "read":
                        found = client.get(key) is not None
                    else:
                        client.put(key, self.value)
                        found = True
                except Exception as exc:
                    self.failed(op, index, exc)
                else:
                    self.succeeded(op, index, time.perf_counter() - start, found)
        finally:
            self.finished = True

    async def run_async(self, client: AsyncClient) -> None:
        try:
            while (chosen := self.next()) is not None:
                op, index = chosen
                key = self.config.key(index)
                start = time.perf_counter()
                try:
                    if op == "read":
                        found = await client.get(key) is not None
                    else:
                        await client.put(key, self.value)
                        found = True
                except Exception as exc:
                    self.failed(op, index, exc)
                else:
                    self.succeeded(op, index, time.perf_counter() - start, found)
        finally:
            self.finished = True


class _Inserts:
    """The keys `load` still has to insert: each once, failed ones again
    (up to LOAD_ATTEMPTS tries), shared by every thread."""

    def __init__(self, keys: int) -> None:
        self.keys = keys
        self._next = 0
        self._retry: list[int] = []
        self._attempts: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.loaded = 0

    def next(self) -> int | None:
        with self._lock:
            if self._retry:
                return self._retry.pop()
            if self._next >= self.keys:
                return None
            self._next += 1
            return self._next - 1

    def failed(self, index: int) -> None:
        with self._lock:
            self._attempts[index] += 1
            if self._attempts[index] < LOAD_ATTEMPTS:
                self._retry.append(index)

    def done(self, index: int) -> None:
        with self._lock:
            self.loaded += 1


def run_bench(make_client: Callable[[], Client] | None, config: BenchConfig, *,
              progress: bool = False, console: Console | None = None,
              make_async_client: Callable[[], AsyncClient] | None = None) -> BenchResult:
    """Run one workload for its time limit (`load`: until every key is in,
    unless a duration was given). Ctrl-C stops it early; the result says so.
    The `async` engine calls `make_async_client` (on its event loop's
    thread), the `threads` engine `make_client`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    seed = config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "big")
    zetan = zeta(config.keys, ZIPFIAN_THETA) if config.distribution == "zipfian" else None
    stop = threading.Event()
    inserts = _Inserts(config.keys)
    limit = config.time_limit
    callers = [_Caller(n, config, stop, inserts, zetan, seed) for n in range(config.clients)]
    if config.engine == "async":
        if make_async_client is None:
            raise ValueError("the async engine needs make_async_client")
        engine = _AsyncEngine(make_async_client, callers)
    else:
        if make_client is None:
            raise ValueError("the threads engine needs make_client")
        engine = _ThreadEngine(make_client, callers, config.client_per_thread)
    interrupted = False
    display = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[ops]} ops  {task.fields[rate]} ops/s  {task.fields[errors]} errors"),
        console=console, transient=True, disable=not progress,
    )
    start = time.monotonic()
    try:
        with display:
            # The bar: keys inserted for `load`, time elapsed otherwise.
            task = display.add_task(f"workload {config.workload}",
                                    total=config.keys if config.workload == "load" else limit,
                                    ops=0, rate="0", errors=0)
            engine.start()
            try:
                while True:
                    elapsed = time.monotonic() - start
                    if (limit is not None and elapsed >= limit) or all(c.finished for c in callers) \
                            or engine.failed is not None:
                        break
                    time.sleep(0.1 if limit is None else min(0.1, limit - elapsed))
                    done = sum(c.done for c in callers)
                    errors = sum(s.errors for c in callers for s in c.stats.values())
                    completed = inserts.loaded if config.workload == "load" else min(elapsed, limit or elapsed)
                    display.update(task, completed=completed, ops=done - errors,
                                   rate=f"{(done - errors) / max(elapsed, 1e-9):,.0f}", errors=errors)
            except KeyboardInterrupt:
                interrupted = True
            stop.set()
            # Each caller finishes the operation it is in (bounded by the client's deadline).
            engine.join()
    finally:
        stop.set()
        elapsed = time.monotonic() - start
        engine.close()
    if engine.failed is not None:
        raise engine.failed

    operations = {name: OperationStats(name) for name, _ in WORKLOADS[config.workload]}
    errors_by_type: Counter[str] = Counter()
    read_misses = 0
    stopped_by = next((c.stopped_by for c in callers if c.stopped_by), None)
    for caller in callers:
        for name, stats in caller.stats.items():
            operations[name].merge(stats)
        errors_by_type.update(caller.errors_by_type)
        read_misses += caller.read_misses
    for stats in operations.values():
        stats.latencies.sort()
    return BenchResult(config, elapsed, operations, errors_by_type, read_misses, interrupted, inserts.loaded,
                       stopped_by, engine.connections)


class _ThreadEngine:
    """Every caller a thread; one shared blocking Client (or one each)."""

    def __init__(self, make_client: Callable[[], Client], callers: list[_Caller], client_per_thread: bool) -> None:
        self.clients = [make_client() for _ in range(len(callers) if client_per_thread else 1)]
        self.threads = [threading.Thread(target=c.run_blocking, args=(self.clients[n % len(self.clients)],),
                                         name=f"bench-{n}", daemon=True) for n, c in enumerate(callers)]
        self.connections = 0
        self.failed: BaseException | None = None

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def close(self) -> None:
        self.connections = sum(len(c.engine.pipes) for c in self.clients)
        for client in self.clients:
            client.close()


class _AsyncEngine:
    """Every caller an asyncio task of one event loop (its own thread, uvloop
    when installed), sharing one AsyncClient."""

    def __init__(self, make_client: Callable[[], AsyncClient], callers: list[_Caller]) -> None:
        self.make_client = make_client
        self.callers = callers
        self.connections = 0
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-loop", daemon=True)

    def _run(self) -> None:
        import asyncio      # here: `shardnode --help` builds the bench's parser without it

        async def main() -> None:
            client = self.make_client()
            try:
                await asyncio.gather(*(c.run_async(client) for c in self.callers))
            finally:
                self.connections = len(client.pipes)
                await client.aclose()

        try:
            try:
                import uvloop

                uvloop.run(main())
            except ImportError:  # pragma: no cover - uvloop is a pinned dependency
                asyncio.run(main())
        except BaseException as exc:        # reported by run_bench, not lost in this thread
            self.failed = exc
            for caller in self.callers:
                caller.finished = True

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join()

    def close(self) -> None:
        self.thread.join()


def render_summary(result: BenchResult) -> Table:
    """The summary table: per operation, throughput and latency percentiles."""
    from rich.table import Table

    config = result.config
    keys = "in order" if config.workload == "load" else config.distribution
    callers = (f"{config.clients} callers (asyncio tasks, one AsyncClient)" if config.engine == "async" else
               f"{config.clients} callers (threads, {'a Client each' if config.client_per_thread else 'one Client'})")
    connections = f"{result.connections} connection{'s' if result.connections != 1 else ''}"
    title = (f"workload {config.workload}: {callers} over {connections}, {config.keys:,} keys ({keys}), "
             f"{config.value_size} B values, {result.elapsed:.1f} s"
             + (" (interrupted)" if result.interrupted else "") + "; latencies in ms")
    table = Table(title=title)
    table.add_column("operation", no_wrap=True)
    for column in ("ops", "errors", "ops/s", *(_pname(p) for p in PERCENTILES), "max"):
        table.add_column(column, justify="right", no_wrap=True)

    def row(name: str, stats: OperationStats, style: str | None = None) -> None:
        cells = [f"{stats.ops:,}", f"{stats.errors:,}", f"{result.throughput(stats.ops):,.0f}"]
        cells += [_ms(stats.percentile(p)) for p in PERCENTILES]
        cells.append(_ms(stats.latencies[-1] if stats.latencies else math.nan))
        table.add_row(name, *cells, style=style)

    for name, stats in result.operations.items():
        row(name, stats)
    if len(result.operations) > 1:
        total = OperationStats("total")
        for stats in result.operations.values():
            total.merge(stats)
        total.latencies.sort()
        row("total", total, style="bold")
    notes = []
    if config.workload == "load":
        notes.append(f"loaded {result.loaded:,} of {config.keys:,} keys")
    if result.read_misses:
        notes.append(f"{result.read_misses:,} reads found no value (run the load workload first)")
    if result.errors_by_type:
        notes.append("errors: " + ", ".join(f"{name} {count:,}" for name, count in result.errors_by_type.most_common()))
    if notes:
        table.caption = "; ".join(notes)
    return table


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{1000 * seconds:.2f}"
