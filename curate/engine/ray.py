"""Ray as curate's distributed engine: connect to a cluster and map work over it.

Ray schedules, retries and moves data; curate only says what one task does. Every distributed
step (a filter partition, a threshold histogram, a bucket sort, a producer's per-file work)
goes through :func:`ray_map`, which:

* submits at most ``max_in_flight`` tasks at a time (bounded driver memory, and the knob the
  scaling bench turns);
* lets Ray retry a task whose worker process died (``max_retries``) — tasks are pure functions
  of their arguments that write their output atomically, so a retry gives the same bytes;
* does not retry a :class:`curate.errors.CurateError` (bad input stays bad) and re-raises it
  on the driver as the same one-line error;
* shows progress (:class:`curate.progress.Progress`) as tasks complete.

Without ``address`` a local Ray instance is started (``num_cpus`` defaults to the machine's);
``address="auto"`` or ``"ray://host:10001"`` joins an existing cluster.
"""

from __future__ import annotations

import logging
import os
import sys

from curate.errors import CurateError
from curate.progress import Progress


class EngineError(CurateError):
    """Engine options that do not go together, Ray missing, or a cluster that cannot be reached."""


def _ray():
    try:
        import ray  # lazy: optional extra [ray]
    except ImportError:
        raise EngineError("the ray engine needs Ray: pip install 'curate[ray]'") from None
    return ray


def connect_ray(address: str | None = None, num_cpus: int | None = None):
    """Join ``address`` (or start a local instance); reuse the connection if one is open."""
    if not address and "ray" not in sys.modules:
        # A Ray started here stays on loopback (127.0.0.1) instead of the machine's network
        # address: Ray only does that when this flag, read at import, says "no cluster".
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = _ray()
    if ray.is_initialized():
        return ray
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    # workers must import the same `curate`; locally they share this interpreter's environment
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise EngineError(f"cannot connect to the Ray cluster at {address} ({e})") from None
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    return ray


def cluster_cpus() -> int:
    ray = _ray()
    return int(ray.cluster_resources().get("CPU", 1))


_REMOTE = {}


def _remote_call(ray, max_retries: int, num_cpus: float):
    key = (max_retries, num_cpus)
    if key not in _REMOTE:
        def call(fn, *args):
            return fn(*args)

        _REMOTE[key] = ray.remote(max_retries=max_retries, retry_exceptions=False, num_cpus=num_cpus)(call)
    return _REMOTE[key]


def ray_map(fn, arg_tuples, *, desc: str = "tasks", progress: bool = False, max_in_flight: int | None = None,
            num_cpus: float = 1, max_retries: int = 3) -> list:
    """``[fn(*args) for args in arg_tuples]`` as Ray tasks; results in input order.

    ``fn`` must be importable on the workers (a module-level function of ``curate``). An
    argument that is a reference from :func:`put` arrives as the object it refers to, so a large
    shared argument is shipped once, not once per task.
    """
    ray = _ray()

    remote = _remote_call(ray, max_retries, num_cpus)
    items = list(arg_tuples)
    limit = max_in_flight or max(1, int(cluster_cpus() / num_cpus)) * 2
    results: list = [None] * len(items)
    pending: dict = {}
    nxt = 0
    bar = Progress(total=len(items), desc=desc, unit="task", disable=not progress)
    try:
        while nxt < len(items) or pending:
            while nxt < len(items) and len(pending) < limit:
                pending[remote.remote(fn, *items[nxt])] = nxt
                nxt += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                results[i] = _get(ray, ref)
                bar.update(1)
    finally:
        # no ray.cancel() of the remaining tasks: with Ray 2.60, cancelling a task that is just
        # completing aborts the driver ("Tried to complete task that was not pending"). They end
        # on their own (outputs are atomic and ignored) or with this driver.
        bar.close()
    return results


def ray_imap(fn, arg_tuples, **kw):
    """Like ``multiprocessing.Pool.imap`` over Ray: yields ``fn(*args)`` in input order.

    A drop-in for the per-item pools of other steps (``curate reshard``'s shard writers,
    producers' per-file work): ``for r in ray_imap(_write_task, [(t,) for t in tasks]): ...``.
    """
    ray = _ray()

    items = list(arg_tuples)
    num_cpus, max_retries = kw.get("num_cpus", 1), kw.get("max_retries", 3)
    remote = _remote_call(ray, max_retries, num_cpus)
    limit = kw.get("max_in_flight") or max(1, int(cluster_cpus() / num_cpus)) * 2
    refs: list = []
    bar = Progress(total=len(items), desc=kw.get("desc", "tasks"), unit="task", disable=not kw.get("progress"))
    try:
        for i in range(len(items)):
            while len(refs) - i < limit and len(refs) < len(items):
                refs.append(remote.remote(fn, *items[len(refs)]))
            yield _get(ray, refs[i])
            bar.update(1)
    finally:
        bar.close()  # remaining tasks are not cancelled: see ray_map


def put(obj):
    """Store ``obj`` once in the cluster; tasks given the reference receive the object."""
    return _ray().put(obj)


def _get(ray, ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, CurateError):
            raise cause from None
        raise
