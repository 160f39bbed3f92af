"""Speed of the dream, measured side by side with the real environment in one run.

    python benchmarks/bench_dream.py                   # ~1-2 minutes on 2 cores
    python benchmarks/bench_dream.py --steps 200 --real-envs 32

Prints, on the same cores:

(a) dream agent steps/s at batch 1 (one agent, one compiled step per time step), and at
    batch 1024: a CMA-ES generation of the paper's size, 64 members x 16 rollouts x
    ``--steps`` steps, through :func:`worldmodels.rollout.run_episodes` with
    :class:`~worldmodels.dream.DreamWorld` (target: batch 1024 / batch 1 >= 50x). The 64
    members share the generation's 16 dream seeds, so the per-(seed, t) noise is drawn for
    16 rows and gathered; a batch of 1024 *distinct* seeds (a held-out evaluation) is
    measured too, for the cost of drawing noise for every row;
(b) the wall time of that generation with 1000 steps (target <= 30 s on 2 cores);
(c) real agent steps/s: the full V + M + C loop (``RealWorld`` on a ``CarRacingPool`` with
    one worker per core) for a short run, and the dream / real ratio.

M is the paper's size with random weights and ``done="off"``, so every dream episode runs
the full ``--steps`` steps (an untrained done head would end them after a step or two;
speed does not depend on the weights otherwise).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from models.controller import num_parameters  # noqa: E402
from worldmodels.envpool import CarRacingPool  # noqa: E402
from worldmodels.parallel import resolve_workers  # noqa: E402

# TensorFlow, the models and the dream are imported in main(): the pool's spawned workers re-import this script.


def agent_steps_per_second(world, params, seeds, steps: int) -> tuple[float, float]:
    """(agent steps/s, seconds) of run_episodes for P controllers x K seeds and ``steps`` steps."""
    from worldmodels.rollout import run_episodes

    start = time.perf_counter()
    result = run_episodes(world, params, seeds, max_steps=steps)
    seconds = time.perf_counter() - start
    return int(result.lengths.sum()) / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="steps of the paper-size dream generation")
    parser.add_argument("--single-steps", type=int, default=1000, help="steps of the batch-1 dream")
    parser.add_argument("--distinct-steps", type=int, default=200, help="steps of the 1024 distinct-seed dream")
    parser.add_argument("--real-envs", type=int, default=32, help="real environments stepped together")
    parser.add_argument("--real-steps", type=int, default=40, help="steps of the real measurement")
    parser.add_argument("--workers", type=int, default=0, help="real environment workers (0 = one per core)")
    args = parser.parse_args()

    import tensorflow as tf

    from models.mdn_rnn import MDNRNN
    from models.vae import ConvVAE
    from worldmodels.dream import DreamWorld, StartStates
    from worldmodels.rollout import RealWorld

    rng = np.random.default_rng(0)
    rnn, vae = MDNRNN(seed=0), ConvVAE(seed=0)
    starts = StartStates(rng.normal(size=(100, rnn.z_size)).astype(np.float32),
                         np.full((100, rnn.z_size), -2.0, np.float32), tuple(f"e{i}" for i in range(100)),
                         np.zeros(100, np.int64))
    members, rollouts = 64, 16
    params = rng.normal(0.0, 0.1, size=(members, num_parameters()))
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}; "
          f"M of the paper's size ({rnn.count_params():,} parameters), random weights, done head off", flush=True)

    single = DreamWorld(rnn, starts, 1.15, max_steps=10**6, capacity=1, done="off")
    batched = DreamWorld(rnn, starts, 1.15, max_steps=10**6, capacity=members * rollouts, done="off")
    agent_steps_per_second(single, params[:1], np.array([[1]]), 5)  # trace the compiled steps outside the timings
    agent_steps_per_second(batched, params, np.tile(np.arange(rollouts), (members, 1)), 2)

    one, _ = agent_steps_per_second(single, params[:1], np.array([[7]]), args.single_steps)
    tracks = rng.integers(0, 2**31, size=rollouts)
    generation, generation_seconds = agent_steps_per_second(batched, params, np.tile(tracks, (members, 1)), args.steps)
    distinct, _ = agent_steps_per_second(batched, params, rng.integers(0, 2**31, size=(members, rollouts)),
                                         args.distinct_steps)

    workers = min(resolve_workers(args.workers), args.real_envs)
    with CarRacingPool(args.real_envs, args.real_steps + 1, "process", workers) as pool:
        world = RealWorld(pool, vae, rnn)
        agent_steps_per_second(world, params[:2], np.array([[1], [2]]), 2)  # trace V's encode once
        real, _ = agent_steps_per_second(world, params[:args.real_envs], np.arange(args.real_envs)[:, None] + 1000,
                                         args.real_steps)

    rows = [
        ("(a) dream, batch 1", one, ""),
        (f"(a) dream, batch 1024 = {members} x {rollouts} (shared seeds), {args.steps} steps", generation, ""),
        (f"(a) dream, batch 1024 distinct seeds, {args.distinct_steps} steps", distinct, ""),
        (f"(c) real V + M + C loop, {args.real_envs} envs, {workers} workers, {args.real_steps} steps", real, ""),
    ]
    print(f"{'measurement':<72} {'agent steps/s':>14}")
    for name, value, _ in rows:
        print(f"{name:<72} {value:14.1f}")
    print(f"{'batch 1024 (shared seeds) / batch 1':<72} {generation / one:13.1f}x  target >= 50")
    print(f"{'batch 1024 (distinct seeds) / batch 1':<72} {distinct / one:13.1f}x")
    print(f"{'dream batch 1024 (shared seeds) / real loop':<72} {generation / real:13.1f}x")
    scaled = generation_seconds * 1000 / args.steps
    print(f"{'(b) one CMA-ES generation, 64 x 16 x 1000 steps in the dream (s)':<72} {scaled:14.1f}   target <= 30"
          + ("" if args.steps == 1000 else f" (scaled from {args.steps} steps)"))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine lowers every number)")


if __name__ == "__main__":
    main()
