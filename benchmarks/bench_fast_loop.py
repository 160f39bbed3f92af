"""The full V + M + C loop in the real CarRacing-v3 on stock vs fast frames: one pool, one run.

    python benchmarks/bench_fast_loop.py                 # ~1 minute on 2 cores
    python benchmarks/bench_fast_loop.py --envs 64 --steps 300 --repeats 2

Stage 5's rollout loop (``run_episodes`` with ``RealWorld``: one batched V encode, one batched
M step and one batched controller call per time step, envs in ``CarRacingPool`` worker
processes) runs the same controllers on the same tracks twice: with the pool's envs drawing
``make_env()``'s stock frames (culled drawing, gymnasium's pixels), then, after
``pool.set_observation("fast")``, the fast 64x64 frames. Same workers, same models (untrained:
speed does not depend on the weights), same cores; with ``--repeats`` > 1 the two alternate and
the fastest of each is kept. Prints agent steps/s and the ratio fast / stock. The ratio to
gymnasium as shipped is this ratio times ``bench_env.py``'s culled / shipped ratio.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from models.controller import num_parameters
from worldmodels.envpool import CarRacingPool
from worldmodels.parallel import resolve_workers

# TensorFlow and the models are imported in main(): the pool's spawned workers re-import this script.


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=16, help="environments (agents) stepped together (default 16)")
    parser.add_argument("--steps", type=int, default=200, help="steps per episode, the 50-step zoom-in included")
    parser.add_argument("--workers", type=int, default=0, help="environment worker processes (0 = one per core)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating measurements of each; the fastest is kept")
    args = parser.parse_args()
    if min(args.envs, args.steps, args.repeats) < 1 or args.workers < 0:
        parser.error("--envs, --steps and --repeats must be >= 1, --workers >= 0")

    from models.mdn_rnn import MDNRNN
    from models.vae import ConvVAE
    from worldmodels.rollout import RealWorld, run_episodes

    workers = min(resolve_workers(args.workers), args.envs)
    seeds = np.arange(args.envs) + 1000
    params = np.random.default_rng(0).normal(0.0, 0.1, size=(args.envs, num_parameters()))
    print(f"{args.envs} envs x {args.steps} steps, {workers} worker process(es), {os.cpu_count()} CPU(s), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rates = {"stock": [], "fast": []}
    with CarRacingPool(args.envs, args.steps, "process", workers) as pool:
        world = RealWorld(pool, ConvVAE(seed=0), MDNRNN(seed=0))
        run_episodes(world, params[:2], seeds[:2, None], max_steps=2)  # trace the tf.functions outside the timings
        for _ in range(args.repeats):
            for observation in rates:
                pool.set_observation(observation)
                start = time.perf_counter()
                result = run_episodes(world, params, seeds[:, None], max_steps=args.steps)
                rates[observation].append(int(result.lengths.sum()) / (time.perf_counter() - start))
    stock, fast = max(rates["stock"]), max(rates["fast"])
    print(f"{'full V + M + C loop, make_env() stock frames':<48} {stock:8.1f} agent steps/s  1.00")
    print(f"{'full V + M + C loop, fast frames':<48} {fast:8.1f} agent steps/s  {fast / stock:.2f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine lowers every number)")


if __name__ == "__main__":
    main()
