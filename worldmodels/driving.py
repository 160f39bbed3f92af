"""How a car drove, read from the physics: replay an episode's actions on its track and measure the car.

CarRacing-v3 is deterministic given the track seed and the actions, so a recorded or evaluated episode
can be replayed exactly and its car read at every step, which the observation alone does not show:
speed, whether any wheel touches the road, the lap. :func:`profile_episode` does this for one episode
(``evaluate_controller.py --profile`` for each evaluated track); :func:`profile_rollouts` for the recorded
episodes of stage 1 or of an iteration, grouped by the policy that drove them
(``python -m worldmodels.metrics driving``): what kind of driving M's data holds, e.g. how often a fast
car leaves the road, which is what a dream-trained controller exploits when M never saw it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from worldmodels import storage

PROFILE_FIELDS = ("tiles", "track_tiles", "finished_step", "mean_speed", "off_road", "off_road_fast", "excursions",
                  "left_playfield", "mean_gas", "mean_brake")
# "Fast" for off_road_fast, in world units per second: about two thirds of the cpu search's driver's mean speed
# (47 units/s at generation 90) and far above the random policy's crawl.
FAST_SPEED = 30.0


def profile_episode(seed: int, actions: np.ndarray, max_steps: int) -> dict:
    """How an episode drove: replay ``actions`` (T, 3) on track ``seed`` and read the car.

    The replay is the episode (episodes are deterministic given the seed and actions); it draws the
    fast observation, which leaves physics and rewards untouched. Returns ``tiles`` visited of
    ``track_tiles``, ``finished_step`` (the step that completed the lap, or None), ``mean_speed``
    (world units per second, the norm of the hull's velocity; a tile is 3.5 units long),
    ``off_road`` (share of steps with no wheel touching a road tile), ``off_road_fast`` (share of
    steps off the road at a speed of at least :data:`FAST_SPEED`), ``excursions`` (times the car went
    from the road onto the grass), ``left_playfield`` (the episode ended off the playfield),
    ``mean_gas`` and ``mean_brake`` (of the actions as applied, in [0, 1]) and ``return`` (for a check).
    """
    from worldmodels.env import make_env

    env = make_env(max_steps, observation="fast")
    speeds, off, total, finished, left = [], [], 0.0, None, False
    try:
        env.reset(seed=int(seed))
        car_racing = env.unwrapped
        for step, action in enumerate(actions, start=1):
            _, reward, terminated, truncated, info = env.step(action)
            total += reward
            speeds.append(float(np.hypot(*car_racing.car.hull.linearVelocity)))
            off.append(not any(wheel.tiles for wheel in car_racing.car.wheels))
            if info.get("lap_finished"):
                finished = step
            if terminated or truncated:
                left = bool(terminated and finished is None)
                break
        applied = np.clip(np.asarray(actions[:len(speeds)], dtype=np.float64), -1.0, 1.0)
        off_road = np.asarray(off, bool)
        steps = max(len(speeds), 1)
        return {"tiles": int(car_racing.tile_visited_count), "track_tiles": len(car_racing.track),
                "finished_step": finished, "mean_speed": float(np.mean(speeds)) if speeds else 0.0,
                "off_road": float(off_road.sum()) / steps,
                "off_road_fast": float((off_road & (np.asarray(speeds) >= FAST_SPEED)).sum()) / steps,
                "excursions": int((off_road[1:] & ~off_road[:-1]).sum() + (off_road[0] if len(off_road) else 0)),
                "left_playfield": left,
                "mean_gas": float(np.clip(applied[:, 1], 0, 1).mean()),
                "mean_brake": float(np.clip(applied[:, 2], 0, 1).mean()), "return": total}
    finally:
        env.close()


def profile_summary(profiles: list[dict]) -> dict:
    """Means over tracks of :func:`profile_episode`'s numbers, the share of tiles visited, the laps finished and
    the episodes that left the playfield (profiles of older files without a key leave its mean out)."""
    share = [p["tiles"] / p["track_tiles"] for p in profiles]
    finished = [p["finished_step"] for p in profiles if p["finished_step"] is not None]
    keys = ("mean_speed", "off_road", "off_road_fast", "excursions", "mean_gas", "mean_brake")
    return {"tracks": len(profiles), "laps_finished": len(finished),
            "left_playfield": sum(bool(p.get("left_playfield")) for p in profiles),
            "mean_finished_step": float(np.mean(finished)) if finished else None,
            "mean_tile_share": float(np.mean(share)),
            **{f"mean_{key}": float(np.mean([p[key] for p in profiles])) for key in keys
               if all(key in p for p in profiles)}}


def profile_rollouts(folders: Sequence[Path], per_policy: int = 40, max_steps: int = 1000, progress=None) -> dict:
    """:func:`profile_summary` of the recorded episodes in ``folders`` (rollout files), per policy tag.

    Of each tag (the episode's ``policy``; ``"brownian"`` for files written before tags existed) the first
    ``per_policy`` episodes in sorted order are replayed on their track (``seed``) with their recorded
    ``action`` (T, 3). Returns ``{tag: {"episodes", "steps", "return_mean", "return_std",
    "replays_mismatched", **summary}}`` with tags sorted; ``replays_mismatched`` counts episodes whose
    replayed return differs from the recorded rewards' sum by more than 1e-3 (then the numbers are not
    about those episodes). ``progress``: an optional callable wrapping the list of episodes (e.g. tqdm).
    """
    chosen = storage.episodes_by_policy(folders, per_policy)
    jobs = [(tag, path) for tag in sorted(chosen) for path in chosen[tag]]
    profiles: dict[str, list[dict]] = {tag: [] for tag in sorted(chosen)}
    recorded: dict[str, list[float]] = {tag: [] for tag in sorted(chosen)}
    mismatched, steps = dict.fromkeys(profiles, 0), dict.fromkeys(profiles, 0)
    for tag, path in (progress(jobs) if progress else jobs):
        episode = storage.load_episode(path, keys=("action", "reward", "seed"))
        profile = profile_episode(int(episode["seed"]), episode["action"], max_steps)
        real = float(np.sum(episode["reward"], dtype=np.float64))
        mismatched[tag] += abs(profile.pop("return") - real) > 1e-3
        profiles[tag].append(profile)
        recorded[tag].append(real)
        steps[tag] += len(episode["action"])
    return {tag: {"episodes": len(profiles[tag]), "files": [str(p) for p in chosen[tag]],
                  "steps": steps[tag],
                  "return_mean": float(np.mean(recorded[tag])), "return_std": float(np.std(recorded[tag])),
                  "replays_mismatched": int(mismatched[tag]), **profile_summary(profiles[tag])}
            for tag in profiles}
