"""CarRacing-v3 as gymnasium ships it against ``worldmodels.env.make_env`` (culled drawing), one run.

    python benchmarks/bench_env.py                 # ~1 minute on one core
    python benchmarks/bench_env.py --episodes 4 --steps 1000

``make_env`` binds ``worldmodels.env._render_road_culled`` to each env: gymnasium's own drawing
code, minus the ~90% of polygons that lie off screen, dropped by one numpy test instead of one
Python call each. Both environments are driven side by side, step for step, with the same seeds
and the same temporally correlated random actions (``BrownianPolicy``: the car drives along the
track and off it, as in stage 1), and each step is timed on its own, so load from other jobs
falls on both alike. Every observation and reward is compared, so the benchmark also proves the
pixels identical on the episodes it ran.

Prints steps/s of each (physics + drawing + the 96x96 observation; no preprocessing) and the
ratio fast / stock.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from worldmodels.env import ENV_ID, BrownianPolicy, episode_seed, make_env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=3, help="episodes per environment (default 3)")
    parser.add_argument("--steps", type=int, default=500, help="steps per episode (default 500)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.steps < 1:
        parser.error("--episodes and --steps must be >= 1")

    import gymnasium as gym

    stock = gym.make(ENV_ID, continuous=True, max_episode_steps=args.steps)
    fast = make_env(args.steps)
    seconds = {"stock": 0.0, "fast": 0.0}
    steps = 0
    for episode in range(args.episodes):
        seed = episode_seed(0, episode)
        obs_s, _ = stock.reset(seed=seed)
        obs_f, _ = fast.reset(seed=seed)
        if not np.array_equal(obs_s, obs_f):
            raise SystemExit(f"first frames differ on seed {seed}: the culled drawing is not exact")
        policy = BrownianPolicy(np.random.default_rng(seed))
        for t in range(args.steps):
            action = policy()
            start = time.perf_counter()
            obs_s, r_s, term_s, trunc_s, _ = stock.step(action)
            middle = time.perf_counter()
            obs_f, r_f, term_f, trunc_f, _ = fast.step(action)
            seconds["stock"] += middle - start
            seconds["fast"] += time.perf_counter() - middle
            steps += 1
            if not np.array_equal(obs_s, obs_f) or (r_s, term_s, trunc_s) != (r_f, term_f, trunc_f):
                raise SystemExit(f"seed {seed}, step {t}: observations or rewards differ")
            if term_s or trunc_s:
                break
    stock.close()
    fast.close()

    rate = {key: steps / value for key, value in seconds.items()}
    print(f"{steps} steps of CarRacing-v3 in {args.episodes} episodes, observations and rewards identical")
    print(f"{'environment':<42} {'steps/s':>8} {'ratio':>6}")
    print(f"{'gymnasium CarRacing-v3 as shipped':<42} {rate['stock']:>8.0f} {1.0:>6.2f}")
    print(f"{'make_env (culled drawing)':<42} {rate['fast']:>8.0f} {rate['fast'] / rate['stock']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
