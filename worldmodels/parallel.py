"""Map a function over work items on one process, local worker processes, or a Ray cluster.

Results come back as they finish (not in order), so callers can show progress. Worker
processes are started with the *spawn* method: TensorFlow and pygame do not survive
``fork`` of a process that has already initialised them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BACKENDS = ("serial", "process", "ray")


def available_cores() -> int:
    """CPU cores this process may use (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """``0`` means one worker per available core."""
    return workers if workers > 0 else available_cores()


def parallel_map(fn: Callable[[T], R], items: Iterable[T], backend: str = "process", workers: int = 0,
                 ray_address: str = "") -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in completion order.

    ``fn`` must be a module-level function (it is pickled by reference for processes and Ray).
    """
    items = list(items)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    workers = min(resolve_workers(workers), max(len(items), 1))
    if backend == "serial" or (backend == "process" and workers == 1):
        yield from map(fn, items)
    elif backend == "process":
        with mp.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap_unordered(fn, items, chunksize=1)
    else:
        yield from _ray_map(fn, items, ray_address)


RAY_MISSING = "backend 'ray' needs Ray, which is not installed: pip install 'ray[default]' (or use backend 'process')"


def init_ray(address: str, missing: type[Exception] = RuntimeError):
    """The ``ray`` module, connected to the cluster at ``address`` ('' = a local one) once per process.

    Every Ray user of this package (``parallel_map`` here, ``envpool.CarRacingPool``) starts Ray
    through this function, so the options are set in one place. Raises ``missing(RAY_MISSING)``
    when Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise missing(RAY_MISSING) from None
    if not ray.is_initialized():
        ray.init(address=address or None, ignore_reinit_error=True, log_to_driver=False)
    return ray


def _ray_map(fn, items, address):
    ray = init_ray(address)
    remote = ray.remote(fn)
    pending = [remote.remote(item) for item in items]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
