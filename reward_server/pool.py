"""Scoring in worker processes, with a per-item timeout that the server enforces itself.

Why not ``concurrent.futures.ProcessPoolExecutor``, ``loky`` or ``pebble``: the first two cannot stop one
stuck task (a timed-out future keeps its worker busy, and a killed worker breaks the whole executor);
``pebble`` can, but brings its own threads and gives no handle on restarts for the metrics. What we
need fits in this module: each worker process is driven by one asyncio task over its own pipe, so

* a worker scores one item at a time;
* an item that runs past ``fast_lane_s`` has its worker killed with SIGKILL (which works whatever it is
  stuck in: a C loop in sympy, a huge integer power) and replaced. A fast item (the built-in reward
  functions', which answer in milliseconds unless the answer is hostile) then gets ``status: timeout``;
  any other is moved aside to the slow lane, where it runs again with up to ``item_timeout_s``, past
  which it gets ``status: timeout``;
* the slow lane may hold at most half the workers (one at least), and slow items together with those
  of suspect requests (one of whose items ran past the fast lane) all workers but one, so ordinary items
  keep a worker and never wait behind slow ones for more than ``fast_lane_s``;
* the fast lane serves requests in order of arrival, each pushed back by the worker time it has used
  so far: a request full of slow items falls behind the ordinary ones that came after it (rather than
  the other way round), and still none waits for ever;
* an item whose request is cancelled (its client went away) stops at once, running or not;
* an item whose worker dies (a segfault, ``os._exit``, the kernel's OOM killer) gets ``status: error``
  saying so, and the worker is replaced;
* the other workers go on with the other items meanwhile.

math-verify's own timeouts use ``signal.alarm``, which works only on a process's main thread and has
silently turned scores to zero in threaded servers; here they are switched off and the isolation is ours.

Workers start with the ``forkserver`` method, never ``fork`` (the server has threads): a clean server
process with math-verify and sympy already imported and warmed up (``reward_server.warm``) forks each
worker, so a replacement is ready, its caches hot, in milliseconds. Each worker caps its address space
(``worker_memory_mb``), ignores Ctrl-C (the server stops it), and dies with the fork server, which dies
with the server. Work goes to a worker as a pickle
(from the server, which it trusts); results come back as JSON, so the server never unpickles what a
worker wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import os
import pickle
import signal
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from reward_server.metrics import RewardMetrics
from reward_server.plugins import load_registry
from reward_server.registry import Task, evaluate

log = logging.getLogger("cppo.reward.pool")

Status = Literal["ok", "timeout", "error"]
Ending = Literal["kept", "timeout", "cancelled", "crash", "undelivered"]
"""How a worker finished with an item: kept for the next one, or stopped (and why)."""

_PRELOAD = ["reward_server.warm", "reward_server.plugins", "reward_server.pool"]
_INLINE_BYTES = 64 * 1024
"""Payloads above this are written to a worker's pipe from a thread, not the event loop."""
_DETAIL_CHARS = 2000
PUSH_BACK = 10.0
"""Seconds a request's turn moves back per second of worker time it has used. Ordinary items take
milliseconds, so ordinary requests keep about the order they came in; one whose items each hold a worker
for the fast lane's half second falls seconds behind, and its client, waiting, sends less."""


@dataclass(frozen=True)
class Outcome:
    """What became of one item."""

    status: Status
    components: dict[str, float] = field(default_factory=dict)
    detail: str | None = None


class PoolBusy(Exception):
    """More items are queued than the pool accepts."""


class WorkerStartError(RuntimeError):
    """A worker process could not be started (a plugin that fails to load in it, say)."""


class _Worker:
    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    def exit_description(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "is gone"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


@dataclass(eq=False)
class _Request:
    """One ``score`` call's items still waiting for the fast lane, and the worker time it has used."""

    arrival: float
    """When it came, on the event loop's clock."""
    waiting: deque[_Job] = field(default_factory=deque)
    seconds: float = 0.0
    suspect: bool = False
    """One of its items ran past the fast lane: its others may be as slow."""

    def turn(self) -> float:
        """Its place in the fast lane: its arrival, pushed back by :data:`PUSH_BACK` times the worker
        time it has used. Served by least time used alone, a request would starve behind every newcomer;
        by arrival alone, ordinary requests would queue behind a hostile one's every item."""
        return self.arrival + PUSH_BACK * self.seconds


@dataclass(eq=False)
class _Job:
    task: Task
    future: asyncio.Future[Outcome]
    request: _Request
    moved_aside: bool = False
    slots: tuple[str, ...] = ()
    """The capped kinds of work it holds a worker for while it runs ("slow", "wary")."""


class _Lanes:
    """Which item a free worker takes next.

    The slow lane (items moved aside) comes first while fewer than ``slow_capacity`` workers run slow
    items, so that it always moves; otherwise the fast lane, from the request whose turn
    (:meth:`_Request.turn`) comes first. Items of suspect requests (one of whose items ran past the fast
    lane) and slow items together hold at most ``wary_capacity`` workers, so that with two workers or
    more one is always there for an ordinary item. A capped item never takes a worker past its capacity,
    even an idle one: that worker is kept for the next ordinary item.
    """

    def __init__(self, slow_capacity: int, wary_capacity: int) -> None:
        self.capacity = {"slow": slow_capacity, "wary": wary_capacity}
        self.running = {"slow": 0, "wary": 0}
        self._slow: deque[_Job] = deque()
        self._requests: list[_Request] = []
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._slow) + sum(len(request.waiting) for request in self._requests)

    async def add(self, tasks: Sequence[Task], futures: Sequence[asyncio.Future[Outcome]]) -> None:
        request = _Request(asyncio.get_running_loop().time())
        jobs = zip(tasks, futures, strict=True)
        request.waiting.extend(_Job(task, future, request) for task, future in jobs)
        async with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    async def move_aside(self, job: _Job) -> None:
        job.moved_aside = True
        async with self._changed:
            self._slow.append(job)
            self._changed.notify_all()

    async def take(self) -> _Job:
        """The next item to score (waiting until there is one a worker may take); its future not done."""
        async with self._changed:
            while (job := self._next()) is None:
                await self._changed.wait()
            job.slots = self._slots(job)
            for slot in job.slots:
                self.running[slot] += 1
            return job

    async def done(self, job: _Job, seconds: float) -> None:
        """A worker is finished with ``job`` (scored, moved aside, or failed) after ``seconds`` of its
        time; said once or twice, it frees its slots once."""
        job.request.seconds += seconds
        if job.slots:
            async with self._changed:
                for slot in job.slots:
                    self.running[slot] -= 1
                job.slots = ()
                self._changed.notify_all()

    def _slots(self, job: _Job) -> tuple[str, ...]:
        if job.moved_aside:
            return ("slow", "wary")
        return ("wary",) if job.request.suspect else ()

    def _fits(self, job: _Job) -> bool:
        return all(self.running[slot] < self.capacity[slot] for slot in self._slots(job))

    def prune(self) -> None:
        """Forget the items whose request was cancelled (a free worker would skip them; an idle pool
        would count them as queued for ever)."""
        self._slow = deque(job for job in self._slow if not job.future.done())
        for request in self._requests:
            request.waiting = deque(job for job in request.waiting if not job.future.done())
        self._requests = [request for request in self._requests if request.waiting]

    def drain(self) -> list[_Job]:
        """Every waiting item, taken out of the lanes."""
        jobs = list(self._slow)
        self._slow.clear()
        for request in self._requests:
            jobs.extend(request.waiting)
        self._requests.clear()
        return jobs

    def _next(self) -> _Job | None:
        while self._slow and self._slow[0].future.done():
            self._slow.popleft()
        if self._slow and self._fits(self._slow[0]):
            return self._slow.popleft()
        for request in self._requests:
            while request.waiting and request.waiting[0].future.done():
                request.waiting.popleft()
        self._requests = [request for request in self._requests if request.waiting]
        for request in sorted(self._requests, key=_Request.turn):
            if self._fits(request.waiting[0]):
                return request.waiting.popleft()
        return None


class WorkerPool:
    """``size`` worker processes scoring :class:`~reward_server.registry.Task` s, one at a time each."""

    def __init__(
        self,
        size: int,
        plugins: Sequence[str] = (),
        item_timeout_s: float = 10.0,
        fast_lane_s: float = 0.5,
        memory_mb: int = 0,
        max_queued: int = 100_000,
        metrics: RewardMetrics | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.size = size
        self.plugins = list(plugins)
        self.item_timeout_s = item_timeout_s
        self.fast_lane_s = min(fast_lane_s, item_timeout_s)
        self.memory_mb = memory_mb
        self.max_queued = max_queued
        self.metrics = metrics
        self.start_timeout_s = start_timeout_s
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._lanes: _Lanes | None = None
        self._runners: list[asyncio.Task[None]] = []
        self._workers: set[_Worker] = set()
        self._running: set[asyncio.Future[Outcome]] = set()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raise :class:`WorkerStartError` (and stop the others) if one fails."""
        self._lanes = _Lanes(slow_capacity=max(1, self.size // 2), wary_capacity=max(1, self.size - 1))
        started = await asyncio.gather(*(self._spawn() for _ in range(self.size)), return_exceptions=True)
        failures = [result for result in started if isinstance(result, BaseException)]
        if failures:
            for result in started:
                if isinstance(result, _Worker):
                    await self._stop(result)
            raise failures[0]
        self._runners = [asyncio.create_task(self._run(worker)) for worker in started]  # type: ignore[arg-type]

    async def close(self) -> None:
        """Stop the workers; items still queued or running get ``status: error``."""
        self._closed = True
        pending = list(self._running)  # before the runners, cancelled, let go of them
        for runner in self._runners:
            runner.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        for worker in list(self._workers):
            await self._stop(worker)
        if self._lanes is not None:
            pending.extend(job.future for job in self._lanes.drain())
        for future in pending:
            if not future.done():
                future.set_result(Outcome("error", detail="the server is shutting down"))

    @property
    def alive(self) -> int:
        """Worker processes running now."""
        return len(self._workers)

    @property
    def queued(self) -> int:
        """Items waiting for a worker, in either lane."""
        return len(self._lanes) if self._lanes is not None else 0

    # --- scoring ---------------------------------------------------------------------------------

    async def score(self, tasks: Sequence[Task]) -> list[Outcome]:
        """Score every task; outcomes in the same order. Cancelling this stops its items, the running
        ones included (their workers are replaced)."""
        if self._lanes is None or self._closed:
            raise RuntimeError("the pool is not running")
        if self.queued + len(tasks) > self.max_queued:
            if self.metrics is not None:
                self.metrics.shed.inc()
            raise PoolBusy(
                f"{self.queued} items are queued and this request adds {len(tasks)}, more than the "
                f"server's limit of {self.max_queued}; retry later"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = [loop.create_future() for _ in tasks]
        await self._lanes.add(tasks, futures)
        self._observe_queue()
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            self._lanes.prune()
            self._observe_queue()
            if self.metrics is not None:  # gather cancelled every item that had no outcome yet
                self.metrics.items.labels("cancelled").inc(sum(future.cancelled() for future in futures))
            raise

    async def _run(self, worker: _Worker | None) -> None:
        """One worker's loop: take the next item, score it, replace the worker if it had to be stopped."""
        assert self._lanes is not None
        while True:
            job = await self._lanes.take()
            self._observe_queue()
            self._running.add(job.future)
            try:
                worker = await self._handle(worker, job)
            except Exception:  # a bug here must not shrink the pool: fail the item, start afresh
                log.exception("scoring an item failed unexpectedly")
                await self._lanes.done(job, 0.0)
                if not job.future.done():
                    job.future.set_result(Outcome("error", detail="the server failed to score this item"))
                if worker is not None:
                    await self._reap(self._retire(worker, "crash"))
                worker = None
            finally:
                self._running.discard(job.future)

    async def _handle(self, worker: _Worker | None, job: _Job) -> _Worker | None:
        """Score one item (on a new worker if ``worker`` died while idle), or move it aside; return the
        worker to go on with."""
        assert self._lanes is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        limit_s = self.item_timeout_s if job.moved_aside else self.fast_lane_s
        outcome, ending = Outcome("error", detail="no worker process could be started"), "kept"
        for attempt in range(2):
            if worker is None or not worker.process.is_alive():
                if worker is not None:  # died while idle
                    await self._reap(self._retire(worker, "crash"))
                worker = await self._replacement()
                if worker is None:
                    break
            outcome, ending = await self._score_on(worker, job, limit_s)
            if ending != "undelivered" or attempt:
                break
            # The worker was already dead when the item reached it: that is no fault of the item's.
            await self._reap(self._retire(worker, "crash"))
            worker = None
        seconds = loop.time() - start
        await self._lanes.done(job, seconds)
        if ending == "timeout":
            job.request.suspect = True
        move_aside = ending == "timeout" and limit_s < self.item_timeout_s and not job.task.fast
        # A stopped worker is counted before the item's result is out, so that whoever reads the result
        # and then the metrics sees both.
        retired = None
        if ending != "kept" and worker is not None:
            reason = {"timeout": "moved_aside" if move_aside else "timeout", "cancelled": "cancelled"}
            retired = self._retire(worker, reason.get(ending, "crash"))
            worker = None
        if move_aside:
            if self.metrics is not None:
                self.metrics.moved_aside.inc()
            await self._lanes.move_aside(job)
        elif not job.future.done():
            job.future.set_result(outcome)
            self._observe_item(outcome, seconds)
        if retired is not None:
            await self._reap(retired)
            worker = await self._replacement()
        return worker

    async def _score_on(self, worker: _Worker, job: _Job, limit_s: float) -> tuple[Outcome, Ending]:
        """The item's outcome, and how its worker ended it."""
        loop = asyncio.get_running_loop()
        payload = pickle.dumps(job.task, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            if len(payload) > _INLINE_BYTES:
                await asyncio.to_thread(worker.conn.send_bytes, payload)
            else:
                worker.conn.send_bytes(payload)
        except OSError:
            return Outcome("error", detail="the worker process died before scoring this item"), "undelivered"
        readable: asyncio.Future[None] = loop.create_future()
        fd = worker.conn.fileno()
        loop.add_reader(fd, _set_once, readable)
        try:
            await asyncio.wait({readable, job.future}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(fd)
        if not readable.done():
            if job.future.done():
                return Outcome("error", detail="the request was cancelled"), "cancelled"
            limit = "item timeout" if limit_s >= self.item_timeout_s else "fast lane's limit"
            detail = f"scoring took longer than the {limit_s:g} s {limit}; its worker process was replaced"
            return Outcome("timeout", detail=detail), "timeout"
        try:
            reply = json.loads(worker.conn.recv_bytes())
        except (EOFError, OSError, ValueError):
            await asyncio.to_thread(worker.process.join, 5)
            detail = (
                f"the worker process {worker.exit_description()} while scoring this item; it was replaced"
            )
            return Outcome("error", detail=detail), "crash"
        if isinstance(reply, dict) and isinstance(reply.get("ok"), dict):
            components = {str(name): value for name, value in reply["ok"].items()}
            if all(isinstance(value, int | float) and math.isfinite(value) for value in components.values()):
                return Outcome("ok", {name: float(value) for name, value in components.items()}), "kept"
        if isinstance(reply, dict) and "error" in reply:
            return Outcome("error", detail=str(reply["error"])[:_DETAIL_CHARS]), "kept"
        detail = "the worker process replied with something other than scores; it was replaced"
        return Outcome("error", detail=detail), "crash"

    # --- workers ---------------------------------------------------------------------------------

    async def _spawn(self) -> _Worker:
        worker = await asyncio.to_thread(self._start_process)
        self._workers.add(worker)
        self._observe_workers()
        return worker

    async def _replacement(self) -> _Worker | None:
        if self._closed:
            return None
        try:
            return await self._spawn()
        except Exception:
            log.exception("a replacement worker process could not be started")
            return None

    def _start_process(self) -> _Worker:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main,
            args=(child, self.plugins, self.memory_mb),
            name="cppo-reward-worker",
            daemon=True,
        )
        process.start()
        child.close()
        worker = _Worker(process, parent)
        try:
            if not parent.poll(self.start_timeout_s):
                raise WorkerStartError(f"a worker process did not start within {self.start_timeout_s:g} s")
            hello = json.loads(parent.recv_bytes())
        except (EOFError, OSError, ValueError):
            process.join(5)
            raise WorkerStartError(f"a worker process {worker.exit_description()} while starting") from None
        except WorkerStartError:
            process.kill()
            process.join()
            raise
        if "ready" not in hello:
            process.join(5)
            raise WorkerStartError(f"a worker process failed to start: {hello.get('failed')}")
        return worker

    def _retire(self, worker: _Worker, reason: str | None = None) -> _Worker:
        """Take a worker out of the pool and kill it (SIGKILL: whatever it is doing, it stops)."""
        self._workers.discard(worker)
        if worker.process.is_alive():
            worker.process.kill()
        if reason is not None and self.metrics is not None:
            self.metrics.worker_restarts.labels(reason).inc()
        self._observe_workers()
        return worker

    async def _reap(self, worker: _Worker) -> None:
        """Wait for a killed worker to be gone, and close its pipe."""
        await asyncio.to_thread(worker.process.join, 10)
        worker.conn.close()

    async def _stop(self, worker: _Worker) -> None:
        await self._reap(self._retire(worker))

    # --- metrics ---------------------------------------------------------------------------------

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queued)

    def _observe_workers(self) -> None:
        if self.metrics is not None:
            self.metrics.workers.set(len(self._workers))

    def _observe_item(self, outcome: Outcome, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.items.labels(outcome.status).inc()
            self.metrics.item_seconds.observe(seconds)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --- the worker process --------------------------------------------------------------------------


def worker_main(conn: Connection, plugins: list[str], memory_mb: int) -> None:
    """A worker process: load the registry, say so, then score tasks until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _limit_memory(memory_mb)
    try:
        registry = load_registry(plugins)
    except BaseException as error:
        _reply(conn, {"failed": f"{type(error).__name__}: {error}"[:_DETAIL_CHARS]})
        return
    _reply(conn, {"ready": os.getpid()})
    while True:
        try:
            task: Task = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            reply: dict[str, Any] = {"ok": evaluate(registry, task)}
        except Exception as error:
            reply = {"error": str(error)[:_DETAIL_CHARS] or type(error).__name__}
        try:
            _reply(conn, reply)
        except OSError:
            return


def _reply(conn: Connection, message: dict[str, Any]) -> None:
    conn.send_bytes(json.dumps(message).encode())


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the fork server) exits; best effort elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(0)


def _limit_memory(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    try:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        log.warning("could not limit worker memory to %d MiB", memory_mb)
