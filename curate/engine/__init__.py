"""Where work runs: one seam, chosen once from options, that steps never branch on.

A step that does independent pieces of work (a pool file, an output shard, a stale feature
file) describes each piece as a tuple of arguments to a module-level function and hands the
list to :func:`map_tasks`; the :class:`Engine` it was given decides where they run:

* ``Engine()`` (local, ``workers`` 1): in this process, one after another;
* ``Engine(workers=N)``: a pool of ``N`` local processes (``start`` = ``"fork"`` or ``"spawn"``,
  the step's choice: spawn for work that must not inherit DuckDB/model state);
* ``Engine(kind="ray", address=...)``: Ray tasks (:mod:`curate.engine.ray`), retried when a
  worker dies, a :class:`~curate.errors.CurateError` re-raised on the driver as itself.

Local worker processes die with the process that started them: on Linux each asks the kernel
for SIGKILL when its parent exits (``prctl(PR_SET_PDEATHSIG)``), and everywhere a watchdog
thread exits the worker once its parent is gone, so a ``kill -9`` of a command leaves no worker
computing (and holding memory) for nobody.

Results come back in task order whatever the engine, and tasks write their outputs atomically,
so a retried or re-run task gives the same bytes: a killed run resumes by skipping finished
outputs (the step's own check, e.g. "this pool file's parquet exists and is current").

The command line builds the engine once (:func:`curate.cli.options.engine_options`); library
callers pass ``Engine(...)`` or nothing. Steps that run one global query instead of tasks (the
local filter runner) ask :attr:`Engine.distributed` once, in one place.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from curate import nopandas
from curate.engine import ray as ray_engine
from curate.engine.ray import EngineError
from curate.progress import Progress

KINDS = ("local", "ray")


@dataclass(frozen=True)
class Engine:
    """Where a step's tasks run. ``workers`` is the number of local processes (None: the
    step's default); ``address``/``num_cpus``/``max_in_flight`` are Ray's."""

    kind: str = "local"
    workers: int | None = None
    address: str | None = None
    num_cpus: int | None = None
    max_in_flight: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise EngineError(f"--engine {self.kind}: unknown engine (one of {', '.join(KINDS)})")
        if self.address and self.kind != "ray":
            raise EngineError("--ray-address needs --engine ray")
        if self.workers is not None and self.workers < 1:
            raise EngineError(f"--workers {self.workers}: must be at least 1")

    @property
    def distributed(self) -> bool:
        """True when tasks run on a cluster (outputs must be on storage every worker sees)."""
        return self.kind == "ray"

    def with_workers(self, workers: int | None) -> "Engine":
        """This engine with a default worker count filled in (an explicit one is kept)."""
        if self.workers is not None or workers is None:
            return self
        return Engine(self.kind, workers, self.address, self.num_cpus, self.max_in_flight)

    def start(self) -> None:
        """Connect to the cluster now (a bad address fails before any work); no-op locally."""
        if self.kind == "ray":
            ray_engine.connect_ray(self.address, self.num_cpus)


LOCAL = Engine()


def as_engine(engine: Engine | str | None, *, workers: int | None = None, address: str | None = None) -> Engine:
    """An :class:`Engine` from what a caller passed: an Engine, a kind name, or None (local)."""
    if isinstance(engine, Engine):
        return engine.with_workers(workers)
    return Engine(engine or "local", workers=workers, address=address)


# set in each local worker process: where it sends unit progress (see map_tasks(units=True))
_UNITS = None


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch_parent(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(1)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux only; also
    usable as a ``subprocess`` ``preexec_fn``: it survives exec). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # no libc prctl
        return False


def die_with_parent(parent: int, interval: float = 1.0) -> None:
    """Make this process exit when process ``parent`` (its parent) does, however it ends.

    Linux: the kernel sends SIGKILL when the parent exits (``PR_SET_PDEATHSIG``); on any system a
    daemon thread polls ``os.getppid()``. A parent already gone (before this call) exits at once.
    """
    set_parent_death_signal(signal.SIGKILL)  # where unsupported, the watchdog still works
    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent, interval), daemon=True,
                     name="curate-parent-watchdog").start()


def _init_worker(q, parent: int | None = None, warm: Callable | None = None, warm_args: tuple = ()) -> None:
    global _UNITS
    _UNITS = q
    if parent is not None:
        die_with_parent(parent)
    nopandas.in_worker()
    if warm is not None:
        try:
            warm(*warm_args)
        except Exception:  # noqa: BLE001 - the task that needs it loads it again and fails with its own message
            pass


def _ready() -> None:
    """A task that only makes the pool start a worker process."""


class WarmPool:
    """Local worker processes started before their tasks are known, each running ``warm(*args)``
    (e.g. loading a model) as it starts, so that the interpreter start-up and the loading overlap
    what the caller does meanwhile. While open (a context manager), :func:`map_tasks` runs local
    process work of at most ``workers`` workers with the same start method on these processes
    (in the thread that opened it)."""

    def __init__(self, workers: int, warm: Callable | None = None, warm_args: tuple = (), start: str = "spawn"):
        start = _start_method(start)
        self.workers, self.start, self.used = workers, start, False
        ctx = mp.get_context(start)
        self.queue = ctx.Queue()
        self.executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(self.queue, os.getpid(), warm, warm_args))
        # a spawned pool starts one process per task waiting for one; the processes ignore Ctrl-C
        # (no traceback from each while the command stops): they end with this process (see
        # die_with_parent), or when the pool is closed
        with _sigint_ignored():
            self.started = [self.executor.submit(_ready) for _ in range(workers)]

    def __enter__(self) -> "WarmPool":
        self._previous, _OPEN.pool = _warm(), self
        return self

    def __exit__(self, exc_type, *exc) -> None:
        _OPEN.pool = self._previous
        if not self.used or exc_type is not None:
            # nothing needed them after all, or the caller failed (or was interrupted): do not wait
            # for their start-up or their tasks (a task writes its output under a temporary name)
            for p in list((getattr(self.executor, "_processes", None) or {}).values()):
                p.terminate()
        self.executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _sigint_ignored():
    """Processes started inside inherit SIGINT ignored (from the main thread; elsewhere as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


_OPEN = threading.local()  # .pool: the WarmPool open in this thread (another thread's is not used here)


def _warm() -> WarmPool | None:
    return getattr(_OPEN, "pool", None)


_TAGS = itertools.count(1)


def warm_workers() -> int | None:
    """The worker count of the open :class:`WarmPool` (None: none open)."""
    return _warm().workers if _warm() is not None else None


def _call_with_units(fn, args, tag=None):
    q = _UNITS  # messages are (tag, units): a warm pool's queue serves one map_tasks call after another
    return fn(*args, progress=(lambda k: q.put((tag, k))) if q is not None else None)


def _call(fn, args):
    return fn(*args)


def _drain(q, bar, tag=None) -> None:
    while True:
        try:
            t, k = q.get_nowait()
        except queue.Empty:
            return
        if t == tag:  # late units of an earlier call on a warm pool are not this bar's
            bar.update(k)


def map_tasks(fn: Callable, tasks: Iterable[Sequence], engine: Engine | None = None, *, desc: str = "tasks",
              progress: bool = False, unit: str = "task", total: int | None = None,
              sizes: Sequence[int] | None = None, units: bool = False, start: str = "spawn") -> Iterator:
    """Yield ``fn(*task)`` for every task, in task order, run where ``engine`` says.

    ``fn`` must be a module-level function (it may be pickled to another process or node).
    Progress: one bar named ``desc``; it counts tasks, or ``sizes[i]`` per finished task (with
    ``unit``/``total``), or, with ``units=True``, what ``fn`` reports through the ``progress``
    callable it is given as a keyword (rows, captions; locally only, Ray counts ``sizes``).
    ``start`` is the local process start method ("spawn" or "fork"), or "thread": threads of this
    process, for work that releases the GIL (Arrow kernels, parquet I/O).
    """
    engine = engine or LOCAL
    items = [tuple(t) for t in tasks]
    weights = list(sizes) if sizes is not None else [1] * len(items)
    if total is None:
        total = sum(weights)
    bar = Progress(total=total, desc=desc, unit=unit, disable=not progress, smoothing=0.05)
    try:
        if not items:
            return
        if engine.kind == "ray":
            yield from _ray(fn, items, engine, bar, weights, desc)
        elif (engine.workers or 1) > 1 and len(items) > 1 and start == "thread":
            yield from _threads(fn, items, min(engine.workers, len(items)), bar, weights, units)
        elif (engine.workers or 1) > 1 and len(items) > 1:
            yield from _processes(fn, items, min(engine.workers, len(items)), bar, weights, units, start)
        else:
            for w, args in zip(weights, items):
                if units:
                    r = fn(*args, progress=bar.update)
                else:
                    r = fn(*args)
                    bar.update(w)
                yield r
    finally:
        bar.close()


def _ray(fn, items, engine: Engine, bar, weights, desc) -> Iterator:
    engine.start()
    for w, r in zip(weights, ray_engine.ray_imap(fn, items, desc=desc, max_in_flight=engine.max_in_flight)):
        bar.update(w)
        yield r


def _threads(fn, items, workers: int, bar, weights, units: bool) -> Iterator:
    lock = threading.Lock()

    def update(k):
        with lock:
            bar.update(k)

    with ThreadPoolExecutor(workers) as ex:
        futures = [ex.submit(fn, *args, progress=update) if units else ex.submit(fn, *args) for args in items]
        try:
            for w, fut in zip(weights, futures):
                r = fut.result()
                if not units:
                    update(w)
                yield r
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _start_method(start: str) -> str:
    """``start``, or "spawn" where this system cannot fork."""
    return "spawn" if start == "fork" and "fork" not in mp.get_all_start_methods() else start


def _processes(fn, items, workers: int, bar, weights, units: bool, start: str) -> Iterator:
    start = _start_method(start)
    warm = _warm()
    if warm is not None and (warm.workers < workers or warm.start != start):
        warm = None  # (a larger one is fine: ``workers`` is already at most the number of tasks)
    if warm is not None:
        warm.used = True
        q, pool = warm.queue, contextlib.nullcontext(warm.executor)  # the pool outlives this call
    else:
        ctx = mp.get_context(start)
        q = ctx.Queue() if units else None
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q, os.getpid()))
    tag = next(_TAGS)  # this call's progress messages
    call = functools.partial(_call_with_units, tag=tag) if units else _call
    with pool as ex:
        futures = [None] * len(items)
        nxt = 0
        limit = workers * 2  # bounded look-ahead: results are yielded in order
        try:
            for i in range(len(items)):
                while nxt < len(items) and nxt - i < limit:
                    futures[nxt] = ex.submit(call, fn, items[nxt])
                    nxt += 1
                fut = futures[i]
                while units and not fut.done():
                    wait([fut], timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(q, bar, tag)
                r = fut.result()  # re-raises a worker's CurateError here
                futures[i] = None
                if units:
                    _drain(q, bar, tag)
                else:
                    bar.update(weights[i])
                yield r
        except BaseException:
            for f in futures:
                if f is not None:
                    f.cancel()
            raise
