"""CarRacing-v3's step rate: as gymnasium ships it, ``make_env`` (culled drawing), the fast
observation, and physics only, side by side in one run.

    python benchmarks/bench_env.py                 # ~1 minute on one core
    python benchmarks/bench_env.py --episodes 4 --steps 1000

Four environments are driven side by side, step for step, with the same seeds and the same
temporally correlated random actions (``BrownianPolicy``: the car drives along the track and
off it, as in stage 1), and each step is timed on its own, so load from other jobs falls on all
alike:

* gymnasium's CarRacing-v3 as shipped, plus the agent's preprocessing (96x96 -> 64x64);
* ``make_env()``: gymnasium's own drawing minus the ~90% of polygons that lie off screen
  (``worldmodels.drawing.render_road_culled``), plus the same preprocessing; its observations
  are checked to be identical to the stock ones;
* ``make_env(observation="fast")``: the 64x64 observation drawn directly at small size
  (``worldmodels.fast_render``); its mean |difference| from the stock frame is printed;
* physics only: the same env with its drawing replaced by a constant frame, the limit.

Every reward and termination is compared (only drawing differs). Prints agent steps/s (an
agent step = env step + the 64x64 frame the agent sees) and the ratio to the stock env. Then
stage 1's episode recorder (``worldmodels.collect.record_episode``) runs ``--record``
episodes with ``make_env()``'s and with the fast observation, alternating, and prints frames/s.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from worldmodels.collect import record_episode
from worldmodels.env import ENV_ID, BrownianPolicy, episode_seed, make_env, preprocess

ROWS = {
    "stock": "gymnasium CarRacing-v3 as shipped",
    "culled": "make_env() (culled drawing)",
    "fast": 'make_env(observation="fast")',
    "physics": "physics only (constant frame)",
}


def physics_only(max_steps: int):
    """A ``make_env`` env whose drawing is a constant black 64x64 frame: Box2D and rewards only."""
    env = make_env(max_steps, observation="fast")  # the fast observation's 64x64 observation space
    env.unwrapped._render = lambda mode: np.zeros((64, 64, 3), np.uint8)
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=3, help="episodes per environment (default 3)")
    parser.add_argument("--steps", type=int, default=500, help="steps per episode (default 500)")
    parser.add_argument("--record", type=int, default=2, help="stage-1 episodes recorded each way (default 2; 0 skips)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.steps < 1 or args.record < 0:
        parser.error("--episodes and --steps must be >= 1, --record >= 0")

    import gymnasium as gym

    envs = {
        "stock": gym.make(ENV_ID, continuous=True, max_episode_steps=args.steps),
        "culled": make_env(args.steps),
        "fast": make_env(args.steps, observation="fast"),
        "physics": physics_only(args.steps),
    }
    seconds = dict.fromkeys(envs, 0.0)
    differences = []
    steps = 0
    for episode in range(args.episodes):
        seed = episode_seed(0, episode)
        frames = {key: preprocess(env.reset(seed=seed)[0]) for key, env in envs.items()}
        if not np.array_equal(frames["stock"], frames["culled"]):
            raise SystemExit(f"first frames differ on seed {seed}: the culled drawing is not exact")
        policy = BrownianPolicy(np.random.default_rng(seed))
        for t in range(args.steps):
            action = policy()
            outcomes = {}
            for key, env in envs.items():
                start = time.perf_counter()
                obs, reward, terminated, truncated, _ = env.step(action)
                frames[key] = preprocess(obs)
                seconds[key] += time.perf_counter() - start
                outcomes[key] = (reward, terminated, truncated)
            steps += 1
            if not np.array_equal(frames["stock"], frames["culled"]):
                raise SystemExit(f"seed {seed}, step {t}: the culled drawing's observation differs")
            if len(set(outcomes.values())) != 1:
                raise SystemExit(f"seed {seed}, step {t}: rewards or terminations differ: {outcomes}")
            differences.append(np.abs(frames["fast"].astype(np.int16) - frames["stock"]).mean())
            if outcomes["stock"][1] or outcomes["stock"][2]:
                break
    for env in envs.values():
        env.close()

    rate = {key: steps / value for key, value in seconds.items()}
    print(f"{steps} agent steps of CarRacing-v3 in {args.episodes} episodes; rewards identical in all four, "
          f"culled frames identical to stock, fast frames {np.mean(differences):.3f} levels from stock on average")
    print(f"{'environment':<42} {'steps/s':>8} {'ratio':>6}")
    for key, title in ROWS.items():
        print(f"{title:<42} {rate[key]:>8.0f} {rate[key] / rate['stock']:>6.2f}")
    if args.record:
        record_rates(args.record, args.steps)
    return 0


def record_rates(episodes: int, steps: int) -> None:
    """Stage 1's recorder with make_env()'s and with the fast observation, alternating episodes."""
    seconds, frames = {"stock": 0.0, "fast": 0.0}, {"stock": 0, "fast": 0}
    for episode in range(episodes):
        for observation in seconds:
            start = time.perf_counter()
            recorded = record_episode(steps, "brownian", episode_seed(1, episode), observation=observation)
            seconds[observation] += time.perf_counter() - start
            frames[observation] += len(recorded["action"])
    rate = {key: frames[key] / seconds[key] for key in seconds}
    print(f"stage 1 record_episode, {episodes} episode(s) each: make_env() {rate['stock']:.0f} frames/s, "
          f"fast {rate['fast']:.0f} frames/s ({rate['fast'] / rate['stock']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
