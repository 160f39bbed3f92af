"""Recording real episodes driven by a controller through V and M, plus temporally correlated action noise.

Two callers drive this way: stage 1's ``controller`` policy (``01_generate_data.py``,
:func:`record_controller_share`) and the collection of ``06_iterate.py`` (``worldmodels.iterate``).
C reads V's z and M's h exactly as in stage 5 (:class:`~worldmodels.rollout.RealWorld`), its
actions get Ornstein-Uhlenbeck noise (:class:`NoisyWorld`), and every episode is saved in stage 1's
rollout layout (:class:`RecordingPool`, ``storage.save_episode``), tagged with the policy
"controller" (the ``policy`` array, which encoding passes on to the series).

Episodes run in waves of at most :data:`WAVE` (:func:`drive_and_record`): the k-th wave holds
the k-th :data:`WAVE` episodes of the list it is given, whichever of them are already saved.
V's and M's float results depend on the batch size in the last bit, so an episode is reproduced
bit for bit by rerunning its wave; a wave whose episodes are all saved is skipped, and a wave with
a missing episode is driven whole, saving only the missing ones. Resuming after SIGKILL therefore
gives the files of an uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import config
from worldmodels import artifacts, envpool, rollout, storage
from worldmodels.env import ACTION_HIGH, ACTION_LOW, BrownianPolicy, episode_seed
from worldmodels.policies import CONTROLLER_POLICY, episode_policy

# Episodes driven at once: each holds its frames in memory until it ends (12 KB a frame, 1000 frames
# an episode), so 32 at once need ~400 MB; the waves are the same in every run, so resuming stays exact.
WAVE = 32
# Mixed into an episode's track seed to seed its action noise, a stream apart from the z noise.
ACTION_NOISE_KEY = 0xAC7109
# Mixed into an episode's track seed to seed its steering lapses, a stream apart from the action noise.
STEER_LAPSE_KEY = 0x1A95E5


class NoisyWorld:
    """A world (``worldmodels.rollout``) whose agents' actions get temporally correlated noise.

    Per agent, n_{t+1} = (1 - theta) n_t + s sqrt(1 - (1 - theta)^2) eps_t, eps_t ~ N(0, I_3), an
    Ornstein-Uhlenbeck process with stationary std ``scale`` and the correlation time of
    :class:`~worldmodels.env.BrownianPolicy` (theta = 0.1, ~10 steps). ``step`` applies
    clip(a_t + n_t) (B, 3) to CarRacing's action box, so M reads the actions actually taken. The
    noise of an episode comes from a generator seeded by its track seed, drawn once per step:
    an episode is reproducible from its seed alone, whatever wave it runs in.

    Steering lapses (``lapses`` > 0, off by default): with that chance per step an agent not already in one
    starts a lapse of a geometric number of steps (mean ``lapse_steps``) in which its steering is one uniform
    draw in [-1, 1], held, whatever C and the noise say (gas and brake stay C's). C's steering is a linear
    function of what it sees, so without them M's data shows steering only where the frames call for it; a
    lapse shows what steering does apart from that. Their draws come from a stream of their own (seeded by the
    track seed and :data:`STEER_LAPSE_KEY`), so the action noise is the same with and without them.
    """

    def __init__(self, world, scale: float, lapses: float = 0.0, lapse_steps: float = 10.0):
        if not scale >= 0:
            raise ValueError(f"action noise must be >= 0, got {scale!r}")
        if not 0.0 <= lapses < 1.0 or not lapse_steps >= 1.0:
            raise ValueError(f"steering lapses need a chance per step in [0, 1) and a mean length >= 1, got "
                             f"{lapses!r} and {lapse_steps!r}")
        self.world, self.scale = world, float(scale)
        self.lapses, self.lapse_steps = float(lapses), float(lapse_steps)
        self.capacity, self.z_size, self.hidden_size = world.capacity, world.z_size, world.hidden_size
        self._rngs: list[np.random.Generator] = []
        self._lapse_rngs: list[np.random.Generator] = []
        self._noise = np.zeros((0, 3))
        self.lapse_left = np.zeros(0, np.int64)  # (B,) steps left in each agent's lapse (0: C steers)
        self._held = np.zeros(0, np.float32)

    def reset(self, seeds):
        seeds = np.asarray(seeds)
        self._rngs = [np.random.default_rng([int(seed), ACTION_NOISE_KEY]) for seed in seeds]
        self._lapse_rngs = [np.random.default_rng([int(seed), STEER_LAPSE_KEY]) for seed in seeds]
        self._noise = np.zeros((len(self._rngs), 3))
        self.lapse_left = np.zeros(len(seeds), np.int64)
        self._held = np.zeros(len(seeds), np.float32)
        return self.world.reset(seeds)

    def step(self, env_actions, active):
        keep = 1.0 - BrownianPolicy.theta
        eps = np.stack([rng.standard_normal(3) for rng in self._rngs])
        self._noise = keep * self._noise + self.scale * math.sqrt(1.0 - keep * keep) * eps
        noisy = np.clip(np.asarray(env_actions) + self._noise, ACTION_LOW, ACTION_HIGH).astype(np.float32)
        if self.lapses > 0:
            self._lapse(noisy)
        return self.world.step(noisy, active)

    def _lapse(self, actions: np.ndarray) -> None:
        """Start, hold and count down the steering lapses of every agent; overwrites their steering in ``actions``."""
        for i, rng in enumerate(self._lapse_rngs):
            start, held = rng.random() < self.lapses, rng.uniform(-1.0, 1.0)  # two draws every step: reproducible
            if self.lapse_left[i] == 0 and start:
                self.lapse_left[i] = rng.geometric(1.0 / self.lapse_steps)
                self._held[i] = held
            if self.lapse_left[i] > 0:
                actions[i, 0] = self._held[i]
                self.lapse_left[i] -= 1


class RecordingPool:
    """A :class:`~worldmodels.envpool.CarRacingPool` that records its episodes in stage 1's rollout layout.

    ``obs[t]`` (64, 64, 3) uint8 is the frame before ``action[t]`` (3,), as ``collect.record_episode``
    records it; when an episode ends, ``save(arrays)`` gets its arrays (``storage.ROLLOUT_SCHEMA``).
    """

    def __init__(self, pool, save):
        self.pool, self.save = pool, save
        self.num_envs = pool.num_envs
        self._episodes: list[dict] = []
        self._step: tuple | None = None

    def reset(self, seeds):
        frames = self.pool.reset(seeds)
        self._episodes = [{"obs": [frame], "action": [], "reward": [], "terminated": [], "truncated": [],
                           "seed": int(seed)} for frame, seed in zip(frames, np.asarray(seeds))]
        return frames

    def step_async(self, actions, active=None):
        active = np.ones(len(self._episodes), bool) if active is None else np.asarray(active, bool)
        self._step = (np.asarray(actions, np.float32).copy(), active.copy())
        self.pool.step_async(actions, active)

    def step_wait(self):
        frames, reward, terminated, truncated = self.pool.step_wait()
        actions, active = self._step
        for i in np.flatnonzero(active):
            episode = self._episodes[i]
            for key, value in (("action", actions[i]), ("reward", reward[i]), ("terminated", terminated[i]),
                               ("truncated", truncated[i])):
                episode[key].append(value)
            if terminated[i] or truncated[i]:
                self.save(rollout_arrays(episode))
            else:
                episode["obs"].append(frames[i])
        return frames, reward, terminated, truncated

    def close(self) -> None:
        self.pool.close()


def rollout_arrays(episode: dict) -> dict[str, np.ndarray]:
    """The lists of :class:`RecordingPool` as the arrays of a rollout file (T frames, T steps)."""
    return {"obs": np.stack(episode["obs"]), "action": np.asarray(episode["action"], np.float32),
            "reward": np.asarray(episode["reward"], np.float32),
            "terminated": np.asarray(episode["terminated"], bool), "truncated": np.asarray(episode["truncated"], bool),
            "seed": np.int64(episode["seed"]), "policy": np.str_(CONTROLLER_POLICY)}


@dataclass(frozen=True)
class Driving:
    """How :func:`drive_and_record` drives: episode length, action noise std, what C sees of V
    (``controller.z_input``), how frames are drawn (``env.observation``), the pool's parallelism
    (``envpool.CarRacingPool``'s backend, workers and Ray address) and the files' zlib level."""

    max_steps: int
    noise: float
    z_input: str = "sample"
    observation: str = "stock"
    backend: str = "process"
    workers: int = 0
    ray_address: str = ""
    compresslevel: int = 1
    steer_lapses: float = 0.0  # NoisyWorld's steering lapses: chance per step and mean length
    steer_lapse_steps: float = 10.0

    @classmethod
    def of_config(cls, cfg: config.Config, max_steps: int, noise: float) -> "Driving":
        """Driving as a config drives C in the real environment: ``max_steps`` a episode, action noise ``noise``,
        the controller's z input and parallelism, ``env.observation``, ``data.compresslevel``."""
        c = cfg.controller
        return cls(max_steps, noise, c.z_input, cfg.env.observation, c.backend, c.workers, c.ray_address,
                   cfg.data.compresslevel)

    def pool(self, num_envs: int, max_steps: int | None = None) -> envpool.CarRacingPool:
        """``num_envs`` real environments with this parallelism, drawing frames as this driving does, episodes of
        ``max_steps`` (default :attr:`max_steps`)."""
        return envpool.CarRacingPool(num_envs, self.max_steps if max_steps is None else max_steps, self.backend,
                                     self.workers, self.ray_address, observation=self.observation)


def drive_and_record(folder, indices, seeds, pending, params: np.ndarray, vae, rnn, driving: Driving,
                     progress: str = "collecting") -> int:
    """Drive episodes ``indices`` (E,) on tracks ``seeds`` (E,) with controller ``params`` (N,) plus noise,
    in waves of :data:`WAVE` consecutive ones, and save those in ``pending`` to ``folder``; returns how many.

    A wave without a pending episode is skipped; any other is driven whole (module docstring).
    """
    folder, indices, seeds, pending = Path(folder), list(indices), [int(s) for s in seeds], set(pending)
    index_of = dict(zip(seeds, indices))
    if len(index_of) != len(indices):
        raise ValueError("two episodes drew the same track seed; change the seed")
    waves = [slice(start, start + WAVE) for start in range(0, len(indices), WAVE)
             if pending & set(indices[start:start + WAVE])]
    if not waves:
        return 0

    def save(arrays):
        index = index_of[int(arrays["seed"])]
        if index in pending:
            storage.save_episode(folder / storage.episode_name(index), arrays, "rollout", driving.compresslevel)

    with driving.pool(min(len(indices), WAVE)) as pool:
        world = NoisyWorld(rollout.RealWorld(RecordingPool(pool, save), vae, rnn, driving.z_input), driving.noise,
                           driving.steer_lapses, driving.steer_lapse_steps)
        for wave in waves:
            rollout.run_episodes(world, np.asarray(params)[None], np.array(seeds[wave], np.int64)[None],
                                 driving.max_steps, progress=progress)
    return len(pending & set(indices))


# --------------------------------------------------------------------------- stage 1's controller policy


def controller_source(cfg: config.Config, data_dir) -> tuple[Path, Path, Path]:
    """``(controller.npz, folder of V, folder of M)`` of stage 1's ``controller`` policy.

    ``data.controller`` names a controller folder (or its ``controller.npz``), ``''`` meaning
    ``<data-dir>/controller``; V and M: :func:`~worldmodels.artifacts.controller_models` (M beside the
    controller's folder, V the nearest one up). A missing controller, V or M is a MissingDataError.
    """
    given = (Path(cfg.data.controller) if cfg.data.controller else Path(data_dir) / artifacts.CONTROLLER).absolute()
    path = given if given.suffix == ".npz" else given / artifacts.CONTROLLER_FILE
    if not path.is_file():
        raise storage.MissingDataError(
            f"data.policy={cfg.data.policy!r} drives with the controller at {path}, which does not exist; train one "
            f"with python {artifacts.MAKERS[artifacts.CONTROLLER]} or name another with data.controller=<folder>")
    vision, models = artifacts.controller_models(path, cfg)
    return path, vision, models


def rollout_keys(cfg: config.Config) -> tuple[str, ...]:
    """What defines stage 1's rollout folder: ``artifacts.ROLLOUT_KEYS``, plus ``CONTROLLER_ROLLOUT_KEYS`` when
    ``data.policy`` has the ``controller`` policy (a folder without it keeps accepting any of those)."""
    mix = dict(config.parse_policy_mix(cfg.data.policy))
    return artifacts.ROLLOUT_KEYS + (artifacts.CONTROLLER_ROLLOUT_KEYS if CONTROLLER_POLICY in mix else ())


def controller_episodes(cfg: config.Config) -> list[int]:
    """The episodes 0..``data.episodes`` - 1 that ``data.policy`` gives to the ``controller`` policy."""
    return [i for i in range(cfg.data.episodes)
            if episode_policy(cfg.data.policy, cfg.data.seed, i) == CONTROLLER_POLICY]


def record_controller_share(cfg: config.Config, data_dir, folder, pending, ray_address: str = "",
                            log=print) -> int:
    """Record the ``controller`` episodes among ``pending`` into stage 1's ``folder``; returns how many.

    Episode i runs on track ``episode_seed(data.seed, i)`` (the track any policy would drive), with the
    controller of :func:`controller_source`, action noise of std ``data.controller_noise``, and what C sees
    of V and how frames are drawn from ``controller.z_input`` and ``env.observation``; the pool has
    ``data.workers`` workers on ``data.backend``. The waves are the controller's episodes in index order.
    """
    indices = controller_episodes(cfg)
    if not set(pending) & set(indices):
        return 0
    path, vision, models = controller_source(cfg, data_dir)
    params, _ = artifacts.load_controller(path, "params", cfg.vae.z_size, cfg.rnn.hidden_units)
    vae, rnn = artifacts.load_vision(vision, cfg), artifacts.load_rnn(models, cfg)
    d = cfg.data
    lapses = (f" and steering lapses (chance {d.controller_steer_lapses:g} a step, {d.controller_steer_lapse_steps:g} "
              f"steps on average)" if d.controller_steer_lapses else "")
    log(f"[01] driving {len(set(pending) & set(indices))} episode(s) with the controller {path} "
        f"(V of {vision}, M of {models}) plus action noise of std {d.controller_noise}{lapses}")
    driving = Driving(d.max_steps, d.controller_noise, cfg.controller.z_input, cfg.env.observation, d.backend,
                      d.workers, ray_address, d.compresslevel, d.controller_steer_lapses, d.controller_steer_lapse_steps)
    seeds = [episode_seed(d.seed, i) for i in indices]
    return drive_and_record(folder, indices, seeds, pending, params, vae, rnn, driving, progress="controller")
