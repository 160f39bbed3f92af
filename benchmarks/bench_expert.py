"""Is there driving in stage 1's data? The expert policy against the random one, on the same tracks.

    python benchmarks/bench_expert.py                  # 20 tracks, 3 policies: ~5 minutes on 2 cores
    python benchmarks/bench_expert.py --tracks 5 --workers 1

Records full episodes (1000 steps at most, as stage 1 does) with ``collect.record_episode`` on
tracks ``episode_seed(--seed, i)`` (a seed the expert was not tuned on) for three drivers:

* ``expert`` with ``data.expert_noise=0``: must finish the lap (CarRacing ends the episode when
  the lap is complete) on at least 90% of the tracks, or the script exits with status 1;
* ``expert`` at the default noise: what stage 1 records (new tiles per episode, laps finished,
  episodes that end by leaving the playfield);
* ``brownian``: today's random policy, the baseline the ratio of new tiles is measured against.

An episode finished the lap when it ends ``terminated`` with a last reward above CarRacing's
-100 for leaving the playfield.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import config
from worldmodels.collect import record_episode
from worldmodels.env import episode_seed

REQUIRED_LAP_RATE = 0.9


def drive(job: tuple[str, float, int]) -> dict[str, float]:
    """One episode of ``(policy, expert_noise, seed)``: new tiles, lap finished, left the playfield, steps."""
    policy, noise, seed = job
    ep = record_episode(1000, policy, seed, config.DataConfig(expert_noise=noise))
    left = bool(ep["terminated"][-1] and ep["reward"][-1] <= -100)
    return {"tiles": float((ep["reward"] > 0).sum()), "lap": float(ep["terminated"][-1] and not left),
            "left": float(left), "steps": float(len(ep["reward"])), "return": float(ep["reward"].sum())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracks", type=int, default=20, help="tracks per driver (default 20)")
    parser.add_argument("--seed", type=int, default=2026, help="base seed of the tracks (default 2026)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args(argv)
    if args.tracks < 1 or args.workers < 1:
        parser.error("--tracks and --workers must be >= 1")
    drivers = [("expert, noise 0", "expert", 0.0),
               (f"expert, noise {config.DataConfig().expert_noise:g} (default)", "expert", config.DataConfig().expert_noise),
               ("brownian (baseline)", "brownian", 0.0)]
    seeds = [episode_seed(args.seed, i) for i in range(args.tracks)]
    results = {}
    with ProcessPoolExecutor(args.workers) as pool:
        for label, policy, noise in drivers:
            start = time.perf_counter()
            rows = list(pool.map(drive, [(policy, noise, s) for s in seeds]))
            results[label] = {key: np.array([r[key] for r in rows]) for key in rows[0]}
            print(f"[{label}: {time.perf_counter() - start:.0f} s]", flush=True)

    print(f"\n{args.tracks} tracks (seeds episode_seed({args.seed}, i)), 1000 steps at most:")
    print(f"{'driver':34s} {'laps':>6s} {'left playfield':>15s} {'new tiles/ep':>13s} {'steps/ep':>9s} {'return':>15s}")
    for label, r in results.items():
        print(f"{label:34s} {r['lap'].mean():6.0%} {r['left'].mean():15.0%} {r['tiles'].mean():13.1f} "
              f"{r['steps'].mean():9.0f} {r['return'].mean():8.1f} +- {r['return'].std():5.1f}")
    baseline = results["brownian (baseline)"]["tiles"].mean()
    for label, r in list(results.items())[:2]:
        print(f"new tiles per episode, {label} / brownian: {r['tiles'].mean() / max(baseline, 1e-9):.1f}x")
    rate = results["expert, noise 0"]["lap"].mean()
    verdict = "ok" if rate >= REQUIRED_LAP_RATE else "FAILED"
    print(f"expert without noise finished {rate:.0%} of the laps (required >= {REQUIRED_LAP_RATE:.0%}): {verdict}")
    return 0 if rate >= REQUIRED_LAP_RATE else 1


if __name__ == "__main__":
    sys.exit(main())
