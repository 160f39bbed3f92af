"""Stage 3: turning rollouts into latent series with V (``03_generate_rnn_data.py``).

Reading and decompressing the next episodes happens in background threads (zlib and
numpy release the GIL) while V encodes the current one in large batches, so V is never
called once per frame and rarely waits for the disk.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from worldmodels import storage


def series_from_rollout(rollout: dict[str, np.ndarray], mu: np.ndarray, logvar: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a series file: V's posterior per frame plus what M predicts besides z.

    ``done`` is CarRacing's ``terminated`` (left the playfield or finished the lap), not the
    time-limit truncation: the dream has its own step limit and M should not learn a clock.
    The policy tag of the episode is passed on when the rollout has one.
    """
    series = {
        "mu": mu.astype(np.float32),
        "logvar": logvar.astype(np.float32),
        "action": rollout["action"],
        "reward": rollout["reward"],
        "done": rollout["terminated"],
        "seed": rollout["seed"],
    }
    if "policy" in rollout:
        series["policy"] = rollout["policy"]
    return series


def pending_episodes(rollout_paths: list[Path], series_dir: Path) -> list[Path]:
    """Rollouts whose series file is missing or unreadable (those are deleted to be redone)."""
    series_dir.mkdir(parents=True, exist_ok=True)
    storage.remove_stale_temporaries(series_dir)
    pending = []
    for path in rollout_paths:
        target = series_dir / path.name
        if target.exists() and not storage.check_episode(target, "series"):
            target.unlink()
        if not target.exists():
            pending.append(path)
    return pending


def _read(path: Path) -> dict[str, np.ndarray]:
    # Runs on a reader thread: storage.reading makes any failure name the file.
    with storage.reading(path):
        return storage.load_episode(path, "rollout", keys=["obs", "action", "reward", "terminated", "seed", "policy"])


def read_ahead(paths: list[Path], depth: int = 2) -> Iterator[tuple[Path, dict[str, np.ndarray]]]:
    """Yield ``(path, rollout)`` in order, with up to ``depth`` episodes being read in the background."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        futures = [pool.submit(_read, p) for p in paths[:depth]]
        for i, path in enumerate(paths):
            rollout = futures[i].result()
            if i + depth < len(paths):
                futures.append(pool.submit(_read, paths[i + depth]))
            futures[i] = None  # let the episode's memory go as soon as it is encoded
            yield path, rollout


def encode_rollouts(vision, rollout_paths: list[Path], series_dir: Path, batch_size: int) -> Iterator[int]:
    """Encode each rollout into ``series_dir/<same name>``; yields the frame count of each episode.

    Short episodes are grouped until they fill at least one batch, so that V always sees
    full batches: a 100-frame episode encoded alone would use a tenth of a 1000-frame call.
    """
    group: list[tuple[Path, dict[str, np.ndarray]]] = []
    frames = 0
    for path, rollout in read_ahead(rollout_paths):
        group.append((path, rollout))
        frames += len(rollout["obs"])
        if frames >= batch_size:
            yield from _encode_group(vision, group, series_dir, batch_size)
            group, frames = [], 0
    if group:
        yield from _encode_group(vision, group, series_dir, batch_size)


def _encode_group(vision, group, series_dir: Path, batch_size: int) -> Iterator[int]:
    obs = group[0][1]["obs"] if len(group) == 1 else np.concatenate([r["obs"] for _, r in group])
    mu, logvar = vision.encode(obs, chunk_size=batch_size)
    start = 0
    for path, rollout in group:
        end = start + len(rollout["obs"])
        storage.save_episode(series_dir / path.name, series_from_rollout(rollout, mu[start:end], logvar[start:end]),
                             "series")
        start = end
        yield len(rollout["obs"])
