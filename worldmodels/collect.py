"""Recording rollouts of an exploration policy for stage 1 (``01_generate_data.py``).

One function records one episode, seeded from ``(base_seed, index)`` alone, so that any
episode can be regenerated bit for bit, by any worker, in any order. It runs in worker
processes and never imports TensorFlow.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import config
from worldmodels import storage
from worldmodels.env import episode_seed, make_env, preprocess
from worldmodels.policies import CONTROLLER_POLICY, POLICIES, episode_policy


@dataclass(frozen=True)
class EpisodeJob:
    """Everything a worker needs to record one episode (picklable, so it crosses processes).

    ``policy`` is ``data.policy`` as configured (a name or a mix); the worker picks the
    episode's own policy from it with :func:`worldmodels.policies.episode_policy`.
    """

    index: int
    folder: str
    base_seed: int
    max_steps: int
    policy: str
    compresslevel: int = 1
    observation: str = "stock"
    expert_noise: float = 1.0


@dataclass(frozen=True)
class EpisodeResult:
    index: int
    frames: int
    seconds: float
    peak_rss_mb: float


def record_episode(max_steps: int, policy: str, seed: int, data: config.DataConfig | None = None,
                   observation: str = "stock") -> dict[str, np.ndarray]:
    """Run one episode of ``policy`` (one name) and return the arrays of a rollout file (see ``worldmodels.storage``).

    The env is reset with ``seed`` and the policy draws from ``default_rng(seed)``, so the
    recorded ``seed`` and ``policy`` alone reproduce the episode. ``data`` supplies the
    policies' own settings (the expert's noise); by default the config's defaults.
    ``observation`` is ``make_env``'s ("stock" or "fast"); the actions and rewards do not depend on it.
    """
    if policy == CONTROLLER_POLICY:
        raise ValueError("the 'controller' policy drives many episodes at once through V and M: "
                         "worldmodels.recording records its episodes, not record_episode")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    env = make_env(max_steps, observation=observation)
    obs_list, actions, rewards, terminated, truncated = [], [], [], [], []
    try:
        obs, _ = env.reset(seed=seed)
        # Built after the reset, because the expert reads the track the reset has just made.
        act = POLICIES[policy](np.random.default_rng(seed), env.unwrapped, data or config.DataConfig())
        while True:
            action = act()
            obs_list.append(preprocess(obs))
            obs, reward, term, trunc, _ = env.step(action)
            actions.append(action)
            rewards.append(reward)
            terminated.append(term)
            truncated.append(trunc)
            if term or trunc:
                break
    finally:
        env.close()
    return {
        "obs": np.stack(obs_list),
        "action": np.asarray(actions, dtype=np.float32),
        "reward": np.asarray(rewards, dtype=np.float32),
        "terminated": np.asarray(terminated, dtype=bool),
        "truncated": np.asarray(truncated, dtype=bool),
        "seed": np.int64(seed),
        "policy": np.str_(policy),
    }


def run_job(job: EpisodeJob) -> EpisodeResult:
    """Record episode ``job.index`` and save it atomically (worker entry point)."""
    start = time.perf_counter()
    seed = episode_seed(job.base_seed, job.index)
    policy = episode_policy(job.policy, job.base_seed, job.index)
    data = config.DataConfig(expert_noise=job.expert_noise)
    try:
        arrays = record_episode(job.max_steps, policy, seed, data, job.observation)
        storage.save_episode(Path(job.folder) / storage.episode_name(job.index), arrays, "rollout", job.compresslevel)
    except Exception as exc:
        # The note survives the trip back from a worker process and names the episode in cli's one-line error.
        exc.add_note(f"episode {job.index} (seed {seed}, policy {policy})")
        raise
    # ru_maxrss is in KiB on Linux: the benchmark checks it does not grow with the episode count.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return EpisodeResult(job.index, len(arrays["action"]), time.perf_counter() - start, peak)


def pending_indices(folder: str | Path, episodes: int, first: int = 0) -> tuple[list[int], list[str]]:
    """Which of episodes first..first+episodes-1 still have to be recorded, and notes on what was cleaned.

    ``first`` lets a folder number its episodes after another's (the iterations of ``worldmodels.iterate``),
    so that every episode file name is unique across folders, as the held-out split needs.

    Complete episodes (final name, readable, consistent) are kept. Temporary files of a killed
    run and unreadable episode files are deleted so they are recorded again.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    notes = []
    removed = storage.remove_stale_temporaries(folder)
    if removed:
        notes.append(f"removed {removed} partial file(s) left by an interrupted run")
    pending = []
    for index in range(first, first + episodes):
        path = folder / storage.episode_name(index)
        if path.exists() and not storage.check_episode(path, "rollout"):
            notes.append(f"{path.name} was unreadable; recording it again")
            path.unlink()
        if not path.exists():
            pending.append(index)
    return pending, notes
