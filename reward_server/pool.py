"""Scoring in worker processes, with a per-item timeout that the server enforces itself.

Why not ``concurrent.futures.ProcessPoolExecutor``, ``loky`` or ``pebble``: the first two cannot stop one
stuck task (a timed-out future keeps its worker busy, and a killed worker breaks the whole executor);
``pebble`` can, but brings its own threads and gives no handle on restarts for the metrics. What we
need fits in this module: each worker process is driven by one asyncio task over its own pipe, so

* a worker scores one item at a time; the items of all requests share one FIFO queue;
* an item that runs past ``item_timeout_s`` gets ``status: timeout``, and its worker is killed with
  SIGKILL (which works whatever it is stuck in: a C loop in sympy, a huge integer power) and replaced;
* an item whose worker dies (a segfault, ``os._exit``, the kernel's OOM killer) gets ``status: error``
  saying so, and the worker is replaced;
* the other workers go on with the other items meanwhile.

math-verify's own timeouts use ``signal.alarm``, which works only on a process's main thread and has
silently turned scores to zero in threaded servers; here they are switched off and the isolation is ours.

Workers start with the ``forkserver`` method, never ``fork`` (the server has threads): a clean server
process with math-verify and sympy already imported forks each worker, so a replacement is ready in
milliseconds. Each worker caps its address space (``worker_memory_mb``), ignores Ctrl-C (the server
stops it), and dies with the fork server, which dies with the server. Work goes to a worker as a pickle
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from reward_server.metrics import RewardMetrics
from reward_server.plugins import load_registry
from reward_server.registry import Task, evaluate
from reward_server.rewards import warm_up

log = logging.getLogger("cppo.reward.pool")

Status = Literal["ok", "timeout", "error"]

_PRELOAD = ["reward_server.rewards", "reward_server.plugins", "math_verify", "latex2sympy2_extended"]
_INLINE_BYTES = 64 * 1024
"""Payloads above this are written to a worker's pipe from a thread, not the event loop."""
_DETAIL_CHARS = 2000


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


class WorkerPool:
    """``size`` worker processes scoring :class:`~reward_server.registry.Task` s, one at a time each."""

    def __init__(
        self,
        size: int,
        plugins: Sequence[str] = (),
        item_timeout_s: float = 10.0,
        memory_mb: int = 0,
        max_queued: int = 100_000,
        metrics: RewardMetrics | None = None,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.size = size
        self.plugins = list(plugins)
        self.item_timeout_s = item_timeout_s
        self.memory_mb = memory_mb
        self.max_queued = max_queued
        self.metrics = metrics
        self.start_timeout_s = start_timeout_s
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(_PRELOAD)
        self._jobs: asyncio.Queue[tuple[Task, asyncio.Future[Outcome]]] | None = None
        self._runners: list[asyncio.Task[None]] = []
        self._workers: set[_Worker] = set()
        self._running: set[asyncio.Future[Outcome]] = set()
        self._closed = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker; raise :class:`WorkerStartError` (and stop the others) if one fails."""
        self._jobs = asyncio.Queue()
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
        while self._jobs is not None and not self._jobs.empty():
            pending.append(self._jobs.get_nowait()[1])
        for future in pending:
            if not future.done():
                future.set_result(Outcome("error", detail="the server is shutting down"))

    @property
    def alive(self) -> int:
        """Worker processes running now."""
        return len(self._workers)

    @property
    def queued(self) -> int:
        """Items waiting for a worker."""
        return self._jobs.qsize() if self._jobs is not None else 0

    # --- scoring ---------------------------------------------------------------------------------

    async def score(self, tasks: Sequence[Task]) -> list[Outcome]:
        """Score every task; outcomes in the same order. Cancelling this cancels the items not yet
        started (started ones finish, and their results are dropped)."""
        if self._jobs is None or self._closed:
            raise RuntimeError("the pool is not running")
        if self.queued + len(tasks) > self.max_queued:
            if self.metrics is not None:
                self.metrics.shed.inc()
            raise PoolBusy(
                f"{self.queued} items are queued and this request adds {len(tasks)}, more than the "
                f"server's limit of {self.max_queued}; retry later"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = []
        for task in tasks:
            future = loop.create_future()
            futures.append(future)
            self._jobs.put_nowait((task, future))
        self._observe_queue()
        return list(await asyncio.gather(*futures))

    async def _run(self, worker: _Worker | None) -> None:
        """One worker's loop: take the next item, score it, replace the worker if it had to be stopped."""
        assert self._jobs is not None
        while True:
            task, future = await self._jobs.get()
            self._observe_queue()
            if future.done():  # its request was cancelled
                continue
            self._running.add(future)
            try:
                worker = await self._handle(worker, task, future)
            except Exception:  # a bug here must not shrink the pool: fail the item, start afresh
                log.exception("scoring an item failed unexpectedly")
                if not future.done():
                    future.set_result(Outcome("error", detail="the server failed to score this item"))
                if worker is not None:
                    await self._reap(self._retire(worker, "crash"))
                worker = None
            finally:
                self._running.discard(future)

    async def _handle(
        self, worker: _Worker | None, task: Task, future: asyncio.Future[Outcome]
    ) -> _Worker | None:
        """Score one item (on a new worker if ``worker`` died while idle); return the worker to go on with."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        outcome, healthy = Outcome("error", detail="no worker process could be started"), True
        for attempt in range(2):
            if worker is None or not worker.process.is_alive():
                if worker is not None:  # died while idle
                    await self._reap(self._retire(worker, "crash"))
                worker = await self._replacement()
                if worker is None:
                    break
            outcome, healthy, delivered = await self._score_on(worker, task)
            if delivered or attempt:
                break
            # The worker was already dead when the item reached it: that is no fault of the item's.
            await self._reap(self._retire(worker, "crash"))
            worker = None
        # A stopped worker is counted before the item's result is out, so that whoever reads the result
        # and then the metrics sees both.
        retired = None
        if not healthy and worker is not None:
            retired = self._retire(worker, "timeout" if outcome.status == "timeout" else "crash")
            worker = None
        if not future.done():
            future.set_result(outcome)
        self._observe_item(outcome, loop.time() - start)
        if retired is not None:
            await self._reap(retired)
            worker = await self._replacement()
        return worker

    async def _score_on(self, worker: _Worker, task: Task) -> tuple[Outcome, bool, bool]:
        """(outcome, whether the worker is still usable, whether the item reached the worker)."""
        loop = asyncio.get_running_loop()
        payload = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            if len(payload) > _INLINE_BYTES:
                await asyncio.to_thread(worker.conn.send_bytes, payload)
            else:
                worker.conn.send_bytes(payload)
        except OSError:
            return Outcome("error", detail="the worker process died before scoring this item"), False, False
        readable: asyncio.Future[None] = loop.create_future()
        fd = worker.conn.fileno()
        loop.add_reader(fd, _set_once, readable)
        try:
            await asyncio.wait_for(readable, self.item_timeout_s)
        except TimeoutError:
            detail = (
                f"scoring took longer than the {self.item_timeout_s:g} s item timeout; "
                "its worker process was stopped and replaced"
            )
            return Outcome("timeout", detail=detail), False, True
        finally:
            loop.remove_reader(fd)
        try:
            reply = json.loads(worker.conn.recv_bytes())
        except (EOFError, OSError, ValueError):
            await asyncio.to_thread(worker.process.join, 5)
            detail = (
                f"the worker process {worker.exit_description()} while scoring this item; it was replaced"
            )
            return Outcome("error", detail=detail), False, True
        if isinstance(reply, dict) and isinstance(reply.get("ok"), dict):
            components = {str(name): value for name, value in reply["ok"].items()}
            if all(isinstance(value, int | float) and math.isfinite(value) for value in components.values()):
                return Outcome("ok", {name: float(value) for name, value in components.items()}), True, True
        if isinstance(reply, dict) and "error" in reply:
            return Outcome("error", detail=str(reply["error"])[:_DETAIL_CHARS]), True, True
        detail = "the worker process replied with something other than scores; it was replaced"
        return Outcome("error", detail=detail), False, True

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
        warm_up()
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
