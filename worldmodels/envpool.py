"""Many CarRacing-v3 environments stepped together, spread over a few worker processes.

:class:`CarRacingPool` holds ``num_envs`` environments dealt out to the workers like cards:
env i lives in worker ``i % workers``. Dealing, rather than contiguous slices, keeps every worker
busy when a batch uses only the first N envs (a 16-track evaluation in a pool sized for 32) and
when the episodes of one member end early. A worker steps its envs in a loop and preprocesses the
observations to 64x64 uint8 itself, so only actions go out and small uint8 frames come
back (12,288 bytes a frame instead of 27,648 for the raw 96x96 observation). Shapes
(N = number of envs in the current batch, at most ``num_envs``):

* ``reset(seeds (N,))`` -> frames uint8 (N, 64, 64, 3); envs N.. of the pool stay idle;
* ``step(actions (N, 3), active (N,) bool)`` -> frames uint8 (N, 64, 64, 3),
  reward float64 (N,), terminated bool (N,), truncated bool (N,). Only active envs are
  stepped; the rows of inactive envs are zeros / False.

Backends run the same :class:`EnvSlice` code: ``serial`` in this process, ``process`` in
worker processes started with the *spawn* method and talked to over pipes, ``ray`` in Ray
actors (Ray is imported only then). Every env is seeded by its own reset seed and is
independent of the others, so all backends and all worker counts give identical frames
and rewards. Returns are CarRacing's own: the sum of the env rewards until ``terminated``
or ``truncated`` (the time limit ``max_steps``).

This module never imports TensorFlow, so worker processes start fast and stay small. A
script whose workers are spawned is re-imported by them as ``__mp_main__``: such a script
should import TensorFlow inside ``main()``, not at the top.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import signal
import traceback

import numpy as np

from config import ConfigError
from worldmodels.env import FRAME_SIZE, check_observation, make_env, preprocess, set_observation
from worldmodels.parallel import BACKENDS, RAY_MISSING, init_ray, resolve_workers

FRAME_SHAPE = (FRAME_SIZE, FRAME_SIZE, 3)
MAX_SEED = 2**32  # gymnasium seeds are non-negative integers below this


class BackendUnavailableError(ConfigError):
    """The requested backend cannot run here (e.g. Ray is not installed): a configuration error,
    so the scripts report it in one line (exit status 2)."""


class EnvSlice:
    """The environments of one worker, stepped one after the other.

    Methods work on the slice's own envs (n of them) and return compact arrays: ``reset``
    the frames of the envs it resets, ``step`` the results of the active envs only.
    """

    def __init__(self, num_envs: int, max_steps: int):
        self.envs = [make_env(max_steps) for _ in range(num_envs)]

    def reset(self, seeds: np.ndarray) -> np.ndarray:
        """Reset envs 0..len(seeds)-1 with ``seeds``; frames uint8 (len(seeds), 64, 64, 3)."""
        frames = np.zeros((len(seeds),) + FRAME_SHAPE, np.uint8)
        for i, seed in enumerate(seeds):
            obs, _ = self.envs[i].reset(seed=int(seed))
            frames[i] = preprocess(obs)
        return frames

    def step(self, actions: np.ndarray, active: np.ndarray):
        """Step the envs where ``active`` (n,) is True with ``actions`` (n, 3).

        Returns frames (m, 64, 64, 3) uint8, reward (m,) float64, terminated (m,), truncated (m,)
        for the m active envs, in order.
        """
        index = np.flatnonzero(active)
        frames = np.empty((len(index),) + FRAME_SHAPE, np.uint8)
        reward = np.empty(len(index), np.float64)
        terminated = np.empty(len(index), bool)
        truncated = np.empty(len(index), bool)
        for j, i in enumerate(index):
            obs, reward[j], terminated[j], truncated[j], _ = self.envs[i].step(actions[i])
            frames[j] = preprocess(obs)
        return frames, reward, terminated, truncated

    def set_observation(self, observation: str) -> None:
        """Draw every env's frames as ``observation`` ("stock" or "fast") from now on."""
        for env in self.envs:
            set_observation(env, observation)

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


# --------------------------------------------------------------------------- runners
# A runner owns one slice and offers submit(method, *args) / fetch() -> result, so the pool
# can start every worker before waiting for any of them.


class _SerialRunner:
    def __init__(self, num_envs, max_steps):
        self.slice = EnvSlice(num_envs, max_steps)
        self._result = None

    def submit(self, method, *args):
        self._result = getattr(self.slice, method)(*args)

    def fetch(self):
        result, self._result = self._result, None
        return result

    def close(self):
        self.slice.close()


def _worker_main(conn, num_envs: int, max_steps: int) -> None:
    """Entry point of a worker process: serve EnvSlice calls over ``conn`` until told to stop."""
    # Ctrl-C reaches the whole process group; the parent decides what to do and closes us,
    # so a worker must not die on its own with a second traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        env_slice = EnvSlice(num_envs, max_steps)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                method, args = conn.recv()
            except EOFError:  # the parent is gone (even SIGKILL closes its end of the pipe)
                break
            if method == "close":
                break
            try:
                conn.send(("ok", getattr(env_slice, method)(*args)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        env_slice.close()


class _ProcessRunner:
    def __init__(self, num_envs, max_steps, context):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, num_envs, max_steps), daemon=True)
        self.process.start()
        child.close()

    def submit(self, method, *args):
        try:
            self.conn.send((method, args))
        except (BrokenPipeError, ConnectionResetError):
            self._died()

    def fetch(self):
        try:
            status, payload = self.conn.recv()
        except (EOFError, ConnectionResetError):
            self._died()
        if status == "error":
            raise RuntimeError(f"environment worker {self.process.pid} failed:\n{payload}")
        return payload

    def _died(self):
        self.process.join(timeout=5)
        raise RuntimeError(f"environment worker {self.process.pid} died (exit code {self.process.exitcode})") from None

    def close(self):
        try:
            self.conn.send(("close", ()))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()


class _RayRunner:
    def __init__(self, num_envs, max_steps, ray, actor_class):
        self.ray = ray
        self.actor = actor_class.remote(num_envs, max_steps)
        self._ref = None

    def submit(self, method, *args):
        self._ref = getattr(self.actor, method).remote(*args)

    def fetch(self):
        ref, self._ref = self._ref, None
        return self.ray.get(ref)

    def close(self):
        self.ray.kill(self.actor)


def check_backend(backend: str) -> None:
    """Raise BackendUnavailableError at once (before any slow work) if ``backend`` cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise BackendUnavailableError(RAY_MISSING)


# --------------------------------------------------------------------------- the pool


class CarRacingPool:
    """``num_envs`` CarRacing-v3 envs with a ``max_steps`` time limit over ``workers`` workers.

    ``workers=0`` means one per available core (never more than ``num_envs``). Use it as a
    context manager, or call :meth:`close`, so worker processes and actors are stopped. A
    worker that fails or dies closes the pool and raises ``RuntimeError`` with its traceback.
    With ``backend='ray'`` every node must be able to import this repository (for example
    ``ray.init(runtime_env={"working_dir": ...})`` before building the pool). ``observation``
    says how frames are drawn, "stock" or "fast" (see :meth:`set_observation`).
    """

    def __init__(self, num_envs: int, max_steps: int, backend: str = "process", workers: int = 0,
                 ray_address: str = "", observation: str = "stock"):
        if isinstance(num_envs, bool) or int(num_envs) != num_envs or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if int(workers) != workers or workers < 0:
            raise ValueError(f"workers must be an integer >= 0 (0 = one per core), got {workers!r}")
        check_observation(observation)
        self.num_envs = int(num_envs)
        self.max_steps = int(max_steps)
        self.backend = backend
        self.workers = 1 if backend == "serial" else min(resolve_workers(int(workers)), self.num_envs)
        # Dealt like cards: worker w owns envs w, w + W, w + 2W, ... (its local envs 0, 1, 2, ...),
        # so the first N envs of any batch are spread evenly over the workers.
        self._owned = [np.arange(w, self.num_envs, self.workers) for w in range(self.workers)]
        sizes = [len(owned) for owned in self._owned]
        self._runners: list = []
        self._batch = 0  # envs in the current batch (the length of the last reset)
        self._running = np.zeros(self.num_envs, bool)
        self._pending = None
        try:
            if backend == "serial":
                self._runners = [_SerialRunner(self.num_envs, self.max_steps)]
            elif backend == "process":
                context = mp.get_context("spawn")
                self._runners = [_ProcessRunner(n, self.max_steps, context) for n in sizes]
                for runner in self._runners:  # wait until every worker has built its envs
                    runner.fetch()
            else:
                ray = init_ray(ray_address, missing=BackendUnavailableError)
                actor_class = ray.remote(num_cpus=1)(EnvSlice)
                self._runners = [_RayRunner(n, self.max_steps, ray, actor_class) for n in sizes]
        except BaseException:
            self.close()
            raise
        self.observation = "stock"
        if observation != "stock":
            self.set_observation(observation)

    # ------------------------------------------------------------------ API

    def reset(self, seeds) -> np.ndarray:
        """Start new episodes in envs 0..N-1 on the tracks of ``seeds`` (N,), N <= num_envs.

        Returns the first frames, uint8 (N, 64, 64, 3). Envs N.. are idle until the next reset.
        """
        self._check_no_pending()
        seeds = np.asarray(seeds)
        if seeds.ndim != 1 or not 1 <= len(seeds) <= self.num_envs:
            raise ValueError(f"seeds must have shape (N,) with 1 <= N <= num_envs = {self.num_envs}, "
                             f"got {seeds.shape}")
        if not np.issubdtype(seeds.dtype, np.integer) or seeds.min() < 0 or seeds.max() >= MAX_SEED:
            raise ValueError(f"seeds must be integers in [0, 2**32), got dtype {seeds.dtype} "
                             f"and range [{seeds.min()}, {seeds.max()}]")
        n = len(seeds)
        try:
            frames = np.zeros((n,) + FRAME_SHAPE, np.uint8)
            for runner, index in self._slices(n):
                runner.submit("reset", seeds[index])
            for runner, index in self._slices(n):
                frames[index] = runner.fetch()
        except BaseException:
            # Some workers may still hold unread replies: the pool cannot continue in step.
            self.close()
            raise
        self._batch = n
        self._running[:] = False
        self._running[:n] = True
        return frames

    def step(self, actions, active=None):
        """Step the active envs of the current batch; see :meth:`step_async` and :meth:`step_wait`."""
        self.step_async(actions, active)
        return self.step_wait()

    def step_async(self, actions, active=None) -> None:
        """Send ``actions`` (N, 3) in CarRacing's action space to the envs where ``active`` (N,).

        ``active=None`` steps every env still in its episode. The workers start stepping at
        once; the caller may compute something else before :meth:`step_wait`.
        """
        self._check_no_pending()
        n = self._batch
        if n == 0:
            raise ValueError("call reset(seeds) before step()")
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (n, 3):
            raise ValueError(f"actions must have shape ({n}, 3) for the {n} envs of the last reset, "
                             f"got {actions.shape}")
        if not np.all(np.isfinite(actions)):
            raise ValueError("actions must be finite")
        if active is None:
            active = self._running[:n].copy()
        else:
            active = np.asarray(active)
            if active.shape != (n,) or active.dtype != bool:
                raise ValueError(f"active must be a bool array of shape ({n},), got {active.dtype} {active.shape}")
            finished = np.flatnonzero(active & ~self._running[:n])
            if len(finished):
                raise ValueError(f"envs {finished.tolist()} are not in an episode any more (it ended); "
                                 "mark them inactive or reset the pool")
        busy = []
        try:
            for runner, index in self._slices(n):
                if active[index].any():
                    runner.submit("step", actions[index], active[index])
                    busy.append((runner, index))
        except BaseException:
            self.close()
            raise
        self._pending = (active, busy)

    def step_wait(self):
        """Results of the last :meth:`step_async`: frames (N, 64, 64, 3) uint8, reward (N,)
        float64, terminated (N,) bool, truncated (N,) bool; zeros / False for inactive envs."""
        if self._pending is None:
            raise ValueError("step_wait() without a step_async() before it")
        active, busy = self._pending
        self._pending = None
        n = self._batch
        frames = np.zeros((n,) + FRAME_SHAPE, np.uint8)
        reward = np.zeros(n, np.float64)
        terminated = np.zeros(n, bool)
        truncated = np.zeros(n, bool)
        try:
            for runner, index in busy:
                stepped = index[active[index]]
                frames[stepped], reward[stepped], terminated[stepped], truncated[stepped] = runner.fetch()
        except BaseException:
            self.close()
            raise
        self._running[:n] &= ~(terminated | truncated)
        return frames, reward, terminated, truncated

    def set_observation(self, observation: str) -> None:
        """Draw frames as ``observation`` from now on (call it between batches): "stock" or "fast"
        (:func:`worldmodels.env.make_env`). Stage 5 trains on either and reports its final score on
        "stock"; physics and rewards do not depend on it."""
        self._check_no_pending()
        check_observation(observation)
        try:
            for runner in self._runners:
                runner.submit("set_observation", observation)
            for runner in self._runners:
                runner.fetch()
        except BaseException:
            self.close()
            raise
        self.observation = observation

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        runners, self._runners = getattr(self, "_runners", []), []
        for runner in runners:
            try:
                runner.close()
            except Exception:  # closing must not hide the error that made us close
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------ helpers

    def _slices(self, n):
        """(runner, index) for every worker owning some of envs 0..n-1: ``index`` holds the pool
        indices of its envs below n, in the order of its local envs 0, 1, 2, ..."""
        for runner, owned in zip(self._runners, self._owned):
            index = owned[owned < n]
            if len(index):
                yield runner, index

    def _check_no_pending(self):
        if not self._runners:
            raise ValueError("the pool is closed")
        if self._pending is not None:
            raise ValueError("a step_async() is still pending: call step_wait() first")
