"""One rollout loop for the controller, shared by the real environment and the dream.

A *world* is anything with this interface (B = agents in a batch, at most ``capacity``;
Z = ``z_size``, H = ``hidden_size``):

* ``reset(seeds (B,) int) -> (z (B, Z), h (B, H))``: start B episodes; h is M's zero state;
* ``step(env_actions (B, 3), active (B,) bool) -> ((z, h), reward (B,), terminated (B,),
  truncated (B,))``: advance the active agents by one step with actions in CarRacing's
  action space. The returned h is M's state after seeing (z_t, a_t): the h that the
  controller uses together with z_{t+1}. Rows of inactive agents are ignored.
* attributes ``capacity``, ``z_size``, ``hidden_size``.

:func:`run_episodes` evaluates a population of controllers: P parameter vectors times K
tracks, P * K episodes at once (or in waves of at most ``max_concurrent``), with one
batched controller call per step. :class:`RealWorld` is the world of the real
CarRacing-v3: a :class:`~worldmodels.envpool.CarRacingPool` plus one batched V encode and one
batched M step per time step. The dream implements the same interface, so the loop itself
knows nothing about environments.

The order of one time step follows the paper: z_t = V(frame_t), a_t = C([z_t, h_t]) with
h_t the LSTM state *before* it has seen (z_t, a_t), then h_{t+1} = M(h_t, [z_t, a_t]) and
the environment applies a_t. What z_t is, is
``controller.z_input`` (:data:`Z_INPUTS`): ``sample`` (the paper's code and the default) draws
z_t = mu + exp(logvar / 2) * eps from V's posterior, as M was trained on and as C sees in the
dream, where every z is one of M's samples; ``mean`` feeds the posterior mean mu (what this
project did before, and what controllers saved without ``controller.z_input`` used).

The end of the module holds what the controller scripts share: the held-out track seeds,
:func:`evaluate`, and loading V and M with clear errors. TensorFlow is imported only when
a :class:`RealWorld` is built or models are loaded, so importing this module is cheap (and
spawned environment workers, which re-import the script that started them, stay small).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.controller import ACTION_SIZE, controller_actions, num_parameters
from worldmodels.env import episode_seed, to_env_action
from worldmodels.metrics import score_summary

# Base seeds of the held-out track streams. Training tracks are drawn from Evolution's rng;
# the periodic evaluation (used to pick the best mean) and the final, reported evaluation use
# two further streams, so the reported score is never measured on tracks used for selection.
EVAL_SEED_OFFSET = 10**6
FINAL_EVAL_SEED_OFFSET = 2 * 10**6
# CarRacing's reward per frame without a new tile: what an early-stopped training episode is
# booked for each step it does not drive (see run_episodes' ``patience``).
STEP_PENALTY = -0.1
# What C and M see of V's posterior in the real environment (controller.z_input).
Z_INPUTS = ("sample", "mean")
# Mixed into an episode's track seed to seed its z noise, so the noise stream is not the track's own.
Z_NOISE_KEY = 0x7A5EED


class Rollouts(NamedTuple):
    """Results of :func:`run_episodes` for P controllers x K tracks."""

    returns: np.ndarray  # (P, K) float64: sum of the rewards of each episode (+ the booked steps if stopped early)
    lengths: np.ndarray  # (P, K) int64: steps of each episode actually driven (real environment steps)
    actions: list | None  # P lists of K float32 (T, 3) env-space actions, if recorded
    stopped: np.ndarray | None = None  # (P, K) bool: ended by ``patience``, if it was given


# --------------------------------------------------------------------------- the loop


def _wave_controller(params, k, start, stop):
    """Parameters for the episodes ``start..stop-1`` of the flat (P * K) order, shaped for one call.

    Returns ``(wave_params (p, N), group)``: the wave's agents form a (p, group) grid, and
    ``controller_actions(wave_params, z.reshape(p, group, Z), ...)`` is one einsum. A wave of
    whole members needs no copy of the parameters; any other wave gathers one row per agent.
    """
    if start % k == 0 and (stop - start) % k == 0:
        return params[start // k: stop // k], k
    return params[np.arange(start, stop) // k], 1


def _check_run(world, params, seeds, max_steps, max_concurrent, patience):
    """:func:`run_episodes`' arguments checked: ``(params (P, N) float64, seeds (P, K), capacity)``."""
    params = np.asarray(params, dtype=np.float64)
    seeds = np.asarray(seeds)
    n = num_parameters(world.z_size, world.hidden_size, ACTION_SIZE)
    if params.ndim != 2 or params.shape[1] != n:
        raise ValueError(f"params must have shape (P, {n}) for z_size={world.z_size}, "
                         f"hidden={world.hidden_size}, got {params.shape}")
    if seeds.ndim != 2 or seeds.shape[0] != params.shape[0] or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seeds must be an integer array of shape (P, K) with P = {params.shape[0]}, "
                         f"got {seeds.dtype} {seeds.shape}")
    if int(max_steps) != max_steps or max_steps < 1:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}")
    capacity = int(world.capacity)
    if max_concurrent is not None:
        if int(max_concurrent) != max_concurrent or max_concurrent < 1:
            raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
        capacity = min(capacity, int(max_concurrent))
    if patience is not None and (int(patience) != patience or patience < 1):
        raise ValueError(f"patience must be a positive integer or None, got {patience!r}")
    return params, seeds, capacity


def _out_of_patience(idle, reward, running, lengths, patience: int, max_steps: int):
    """``(idle, give_up)`` after a step of a wave of B episodes: ``idle`` (B,) counts the steps since
    each episode's last positive reward; ``give_up`` (B,) marks the ``running`` episodes (not
    ended by the world in this very step, which keep their own ending and return) that have now
    gone ``patience`` steps without one and still have steps left before ``max_steps``."""
    idle = np.where(np.asarray(reward) > 0, 0, idle + 1)
    return idle, running & (idle >= int(patience)) & (lengths < int(max_steps))


def run_episodes(world, params, seeds, max_steps: int, max_concurrent: int | None = None,
                 record_actions: bool = False, progress: str | None = None, patience: int | None = None,
                 checkpoint=None) -> Rollouts:
    """Run P controllers on K tracks each in ``world`` and return every episode's return.

    Args:
        world: a world (module docstring), e.g. :class:`RealWorld`.
        params: (P, N) controller parameters, N = num_parameters(world.z_size, world.hidden_size).
        seeds: (P, K) track seeds; episode (p, k) runs controller p on track seeds[p, k].
        max_steps: at most this many steps per episode (the world may end episodes sooner).
        max_concurrent: at most this many episodes at once (default and upper bound: the
            world's capacity). Episodes run in waves in (p, k) order.
        record_actions: also return the env-space actions of every episode.
        progress: if given, show a progress bar with this title over the P * K * max_steps
            agent steps (a 100-track evaluation in the real environment takes minutes on a
            CPU); an episode that ends early adds its unused steps, so the bar ends at 100%.
        patience: training only (None for every evaluation). If given, an episode that has gone
            ``patience`` steps without a positive reward (in CarRacing: a new tile) stops, and each
            of its ``max_steps - length`` remaining steps is booked at ``STEP_PENALTY`` (-0.1, what
            a step without a tile earns): the return of driving on without a tile (or a crash).
        checkpoint: if given, a JSON file (:class:`WaveLog`) that keeps every finished wave (of at most
            :data:`CHECKPOINT_WAVE` episodes), so that a killed run resumes at its first unfinished wave with
            the same result (an episode depends only on its controller and track, and the waves are the
            same). Not with ``record_actions``.
            The caller deletes the file once it has kept the result.

    Returns:
        :class:`Rollouts` with returns (P, K), lengths (P, K), the actions if asked for and
        ``stopped`` (P, K) if ``patience`` was given. Every episode ends on its own
        (terminated or truncated by the world, after ``max_steps``, or by ``patience``); its
        return is the sum of the rewards of its own steps plus the booked ones.
    """
    params, seeds, capacity = _check_run(world, params, seeds, max_steps, max_concurrent, patience)
    if checkpoint is not None and record_actions:
        raise ValueError("run_episodes keeps no actions in its checkpoint: pass checkpoint or record_actions, not both")
    log = None
    if checkpoint is not None:
        capacity = min(capacity, CHECKPOINT_WAVE)
        log = WaveLog(checkpoint, params, seeds, max_steps, capacity, patience)
    p_count, k = seeds.shape
    total = p_count * k
    tally = _Tally(np.zeros(total, np.float64), np.zeros(total, np.int64), np.zeros(total, bool),
                   [[] for _ in range(total)] if record_actions else None)
    if progress:
        from tqdm import tqdm

        tally.bar = tqdm(total=total * int(max_steps), desc=progress, unit="step", unit_scale=True, leave=False,
                         dynamic_ncols=True)
    for start in range(0, total, capacity):
        stop = min(start + capacity, total)
        if log is not None and log.restore(start, stop, tally.returns, tally.lengths, tally.stopped):
            tally.advance((stop - start) * int(max_steps))
            continue
        wave_params, group = _wave_controller(params, k, start, stop)
        _drive_wave(world, wave_params, group, seeds.reshape(-1), start, stop, int(max_steps), patience, tally)
        if log is not None:
            log.save(start, stop, tally.returns, tally.lengths, tally.stopped)
    if tally.bar is not None:
        tally.bar.close()
    actions = None
    if record_actions:
        actions = [[np.asarray(tally.actions[p * k + j], np.float32).reshape(-1, ACTION_SIZE) for j in range(k)]
                   for p in range(p_count)]
    return Rollouts(tally.returns.reshape(p_count, k), tally.lengths.reshape(p_count, k), actions,
                    tally.stopped.reshape(p_count, k) if patience is not None else None)


@dataclasses.dataclass
class _Tally:
    """What :func:`run_episodes` keeps of its T episodes, in the flat (P * K) order, and its progress bar."""

    returns: np.ndarray  # (T,) float64
    lengths: np.ndarray  # (T,) int64
    stopped: np.ndarray  # (T,) bool: ended by patience
    actions: list | None  # T lists of env-space actions (3,), if recorded
    bar: object = None

    def advance(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)


def _drive_wave(world, wave_params, group: int, flat_seeds, start: int, stop: int, max_steps: int, patience,
                tally: _Tally) -> None:
    """Episodes ``start..stop-1`` of the flat order as one batch in ``world``, each until it ends; adds to ``tally``.

    ``wave_params``, ``group``: :func:`_wave_controller`'s; ``flat_seeds`` (P * K,) the track seeds."""
    batch = stop - start
    z, h = world.reset(flat_seeds[start:stop])
    active = np.ones(batch, bool)
    idle = np.zeros(batch, np.int64)  # steps since the last positive reward, for ``patience``
    for _ in range(max_steps):
        a = controller_actions(wave_params, z.reshape(-1, group, z.shape[-1]),
                               h.reshape(-1, group, h.shape[-1])).reshape(batch, ACTION_SIZE)
        env_actions = to_env_action(a)
        (z, h), reward, terminated, truncated = world.step(env_actions, active)
        index = start + np.flatnonzero(active)
        tally.returns[index] += reward[active]
        tally.lengths[index] += 1
        if tally.actions is not None:
            for i, row in zip(index, env_actions[active]):
                tally.actions[i].append(row)
        ended = np.asarray(terminated, bool) | np.asarray(truncated, bool)
        if patience is not None:
            idle, give_up = _out_of_patience(idle, reward, active & ~ended, tally.lengths[start:stop], patience,
                                             max_steps)
            index_up = start + np.flatnonzero(give_up)
            tally.returns[index_up] += STEP_PENALTY * (max_steps - tally.lengths[index_up])
            tally.stopped[index_up] = True
            ended = ended | give_up
        # This step, plus the steps that episodes ending now will not take.
        tally.advance(int(active.sum()) + int((max_steps - tally.lengths[index[ended[active]]]).sum()))
        active &= ~ended
        if not active.any():
            break


# A resumable evaluation (a checkpoint) runs in waves of at most this many episodes, so that a kill loses at most
# one wave (a quarter of the 100 final tracks) instead of the whole single wave the pool could hold. V and M give
# the same numbers for a frame whatever the batch (checked on this project's CPUs), so the scores do not change.
CHECKPOINT_WAVE = 25


def checkpoint_for(result) -> Path:
    """Where an evaluation that becomes the file ``result`` keeps its finished waves: ``.<name>.partial`` beside
    it (:class:`WaveLog`); hidden, so that nothing looking for results (``carry``'s scores) takes it for one."""
    result = Path(result)
    return result.with_name(f".{result.name}.partial")


class WaveLog:
    """The finished waves of one :func:`run_episodes` call, in a JSON file written after each wave.

    The file names what it belongs to (a hash of the parameters, the seeds, max_steps, the wave size and
    patience); a file of another run is ignored and overwritten, so a stale one can never leak into a
    score. Returns and lengths survive JSON exactly (floats are written as their shortest round-trip form).
    """

    def __init__(self, path, params: np.ndarray, seeds: np.ndarray, max_steps: int, capacity: int,
                 patience: int | None):
        import hashlib

        from worldmodels import storage

        self.path = Path(path)
        self.key = {
            "params_sha256": hashlib.sha256(np.ascontiguousarray(params, np.float64).tobytes()).hexdigest(),
            "params_shape": list(params.shape), "seeds": np.asarray(seeds).reshape(-1).tolist(),
            "max_steps": int(max_steps), "wave": int(capacity), "patience": patience,
        }
        self.waves: dict[str, dict] = {}
        try:
            saved = storage.read_json(self.path)
        except (storage.MissingDataError, storage.CorruptFileError):  # none yet, or not readable: start over
            saved = None
        if isinstance(saved, dict) and saved.get("key") == self.key and isinstance(saved.get("waves"), dict):
            self.waves = saved["waves"]
            done = sum(len(w["returns"]) for w in self.waves.values())
            print(f"resuming from {self.path}: {done} of {len(self.key['seeds'])} episodes already run")

    def restore(self, start: int, stop: int, returns, lengths, stopped) -> bool:
        """Fill rows ``start..stop-1`` of the flat arrays from a finished wave; False if it is not finished."""
        wave = self.waves.get(str(start))
        if wave is None or len(wave["returns"]) != stop - start:
            return False
        returns[start:stop] = wave["returns"]
        lengths[start:stop] = wave["lengths"]
        stopped[start:stop] = wave["stopped"]
        return True

    def save(self, start: int, stop: int, returns, lengths, stopped) -> None:
        from worldmodels import storage

        self.waves[str(start)] = {"returns": returns[start:stop].tolist(), "lengths": lengths[start:stop].tolist(),
                                  "stopped": stopped[start:stop].tolist()}
        storage.atomic_write_json(self.path, {"key": self.key, "waves": self.waves})


# --------------------------------------------------------------------------- the real world


class RealWorld:
    """CarRacing-v3 seen through V and M: the world of :func:`run_episodes` in the real environment.

    ``pool``: a :class:`~worldmodels.envpool.CarRacingPool` (its ``num_envs`` is the capacity);
    ``vae``: a ``ConvVAE`` (or its ``encoder``: float (B, 64, 64, 3) in [0, 1] -> (mu, logvar));
    ``rnn``: an ``MDNRNN`` with ``step`` and ``hidden_units``;
    ``z_input``: ``'mean'`` feeds V's posterior mean, ``'sample'`` one draw
    z = mu + exp(logvar / 2) * eps, with eps from a generator seeded by the episode's track
    seed (and :data:`Z_NOISE_KEY`), so an episode is reproducible from its seed alone, whatever
    batch or wave it runs in, and every member driving a track sees the same noise.

    Per step: the pool steps the envs while M updates h with (z_t, a_t) in the same moment,
    then V encodes all new frames in one call. Only the active agents' rows go through V
    and M; the rest keep their last values. ``prediction`` holds M's mixture for the next z of the
    rows of the last step (``(rows (n,), log_pi, mu, log_sigma (n, Z, K))``, None before the first).
    """

    def __init__(self, pool, vae, rnn, z_input: str = "mean"):
        import tensorflow as tf  # here, so that environment workers importing this module stay light

        if z_input not in Z_INPUTS:
            raise ValueError(f"z_input must be one of {', '.join(Z_INPUTS)}, got {z_input!r}")

        encoder = getattr(vae, "encoder", vae)
        self.pool = pool
        self.rnn = rnn
        self.z_size = int(encoder.outputs[0].shape[-1])
        self.hidden_size = int(rnn.hidden_units)
        if rnn.z_size != self.z_size:
            raise ValueError(f"V produces z of size {self.z_size} but M expects z_size={rnn.z_size}")
        if rnn.action_size != ACTION_SIZE:
            raise ValueError(f"M expects actions of size {rnn.action_size}, CarRacing has {ACTION_SIZE}")

        # One trace for every batch size: frames arrive as uint8 and are scaled inside the graph.
        @tf.function(input_signature=[tf.TensorSpec((None, 64, 64, 3), tf.uint8)])
        def encode(frames):
            mu, logvar = encoder(tf.cast(frames, tf.float32) / 255.0, training=False)
            return mu, tf.exp(0.5 * logvar)

        self._encode = encode
        self.z_input = z_input
        self._z = self._h = self._c = None
        self._noise: list[np.random.Generator] = []  # one per agent of the batch, for z_input='sample'
        # M's last prediction of the next z: (rows (n,), log_pi, mu, log_sigma (n, Z, K)), for worldmodels.curiosity.
        self.prediction = None

    @property
    def capacity(self) -> int:
        return self.pool.num_envs

    def encode(self, frames: np.ndarray, agents=None) -> np.ndarray:
        """What C sees of uint8 frames (B, 64, 64, 3) -> float32 (B, Z), one V call.

        The posterior mean, or with ``z_input='sample'`` one draw per frame from the noise of
        ``agents`` (B,) (indices into the batch of the last reset; default all of them).
        """
        if len(frames) == 0:
            return np.zeros((0, self.z_size), np.float32)
        mu, scale = self._encode(frames)
        if self.z_input == "mean":
            return mu.numpy()
        agents = range(len(frames)) if agents is None else agents
        eps = np.stack([self._noise[i].standard_normal(self.z_size, dtype=np.float32) for i in agents])
        return mu.numpy() + scale.numpy() * eps

    def reset(self, seeds):
        frames = self.pool.reset(seeds)
        self._noise = [np.random.default_rng([int(seed), Z_NOISE_KEY]) for seed in np.asarray(seeds)]
        self._z = self.encode(frames)
        self._h = np.zeros((len(frames), self.hidden_size), np.float32)
        self._c = np.zeros_like(self._h)
        self.prediction = None
        return self._z.copy(), self._h.copy()

    def step(self, env_actions, active):
        active = np.asarray(active, bool)
        index = np.flatnonzero(active)
        self.pool.step_async(env_actions, active)
        # M's update needs only (z_t, a_t), so it runs while the workers step the envs.
        if len(index):
            actions = np.asarray(env_actions, np.float32)
            everyone = len(index) == len(active)
            pick = slice(None) if everyone else index
            out = self.rnn.step(self._z[pick], actions[pick], (self._h[pick], self._c[pick]))
            self.prediction = (index, out["log_pi"], out["mu"], out["log_sigma"])
            h, c = out["state"]
            self._h[pick] = h.numpy()
            self._c[pick] = c.numpy()
        frames, reward, terminated, truncated = self.pool.step_wait()
        if len(index):
            self._z[index] = self.encode(frames[index], index)
        return (self._z.copy(), self._h.copy()), reward, terminated, truncated

    def close(self) -> None:
        self.pool.close()


# --------------------------------------------------------------------------- evaluation


def heldout_seeds(seed: int, count: int, offset: int = EVAL_SEED_OFFSET) -> np.ndarray:
    """Fixed held-out track seeds (count,): episode_seed(offset + seed, i) for i < count."""
    return np.array([episode_seed(offset + int(seed), i) for i in range(int(count))], dtype=np.int64)


def evaluate(world, params, seeds, max_steps: int, max_concurrent: int | None = None,
             record_actions: bool = False, progress: str | None = None, checkpoint=None) -> dict:
    """Run one controller ``params`` (N,) on every track of ``seeds`` (E,) (resumable with ``checkpoint``,
    see :func:`run_episodes`).

    Returns ``{"mean", "std", "min", "max", "scores" (E,), "lengths" (E,), "seeds" (E,),
    "steps", "seconds"}`` (plus ``"actions"``, a list of (T, 3) arrays, if recorded).
    """
    params = np.asarray(params, dtype=np.float64)
    seeds = np.asarray(seeds, dtype=np.int64)
    if params.ndim != 1:
        raise ValueError(f"params must be one controller of shape (N,), got {params.shape}")
    if seeds.ndim != 1 or len(seeds) == 0:
        raise ValueError(f"seeds must have shape (E,) with E >= 1, got {seeds.shape}")
    start = time.perf_counter()
    result = run_episodes(world, params[None], seeds[None], max_steps, max_concurrent, record_actions, progress,
                          checkpoint=checkpoint)
    scores = result.returns[0]
    out = {
        **score_summary(scores),
        "scores": scores.tolist(), "lengths": result.lengths[0].tolist(), "seeds": seeds.tolist(),
        "steps": int(result.lengths.sum()), "seconds": time.perf_counter() - start,
    }
    if record_actions:
        out["actions"] = result.actions[0]
    return out


def final_evaluation(world, params, cfg, episodes: int | None = None, max_concurrent: int | None = None,
                     record_actions: bool = False, progress: str | None = None, checkpoint=None) -> dict:
    """The reported score: ``params`` (N,) on ``episodes`` (default controller.final_eval_episodes,
    the paper's 100) held-out tracks of the final-evaluation stream, never used for training
    or for picking the controller. Returns :func:`evaluate`'s dict plus the settings used. With ``checkpoint``
    (a file path) a killed evaluation resumes at its first unfinished wave (:func:`run_episodes`)."""
    episodes = cfg.controller.final_eval_episodes if episodes is None else int(episodes)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    seeds = heldout_seeds(cfg.controller.seed, episodes, FINAL_EVAL_SEED_OFFSET)
    metrics = evaluate(world, params, seeds, cfg.controller.max_steps, max_concurrent, record_actions, progress,
                       checkpoint)
    metrics.update(episodes=episodes, max_steps=cfg.controller.max_steps,
                   seed_stream=f"episode_seed({FINAL_EVAL_SEED_OFFSET} + controller.seed, i)")
    return metrics


# --------------------------------------------------------------------------- loading V and M


def load_world_models(data_dir, cfg, *, vision_dir=None, models_dir=None):
    """(V, M) from ``data_dir`` (or V from ``vision_dir``, M from ``models_dir``) via :mod:`worldmodels.artifacts`
    (missing: MissingDataError naming the command that makes it; incompatible config: ConfigError), with a
    damaged ``.keras`` file reported as :class:`~worldmodels.storage.CorruptFileError` naming the file."""
    from worldmodels import artifacts
    from worldmodels.cli import USER_ERRORS
    from worldmodels.storage import CorruptFileError

    def guarded(load, path):
        try:
            return load(path)
        except USER_ERRORS:
            raise
        except Exception as exc:  # Keras raises many different types for a damaged archive
            raise CorruptFileError(f"{path} cannot be loaded, it is truncated or corrupt "
                                   f"({type(exc).__name__}: {exc}); remake it") from exc

    vision_dir = data_dir if vision_dir is None else vision_dir
    models_dir = data_dir if models_dir is None else models_dir
    vae = guarded(lambda _: artifacts.load_vision(vision_dir, cfg), artifacts.vision_path(vision_dir, cfg))
    rnn = guarded(lambda _: artifacts.load_rnn(models_dir, cfg), artifacts.rnn_path(models_dir))
    if not hasattr(rnn, "step") or not hasattr(vae, "encoder"):
        raise CorruptFileError(f"{artifacts.vision_path(vision_dir, cfg)} or {artifacts.rnn_path(models_dir)} "
                               "does not hold the expected model (V with an encoder, M with step)")
    return vae, rnn
