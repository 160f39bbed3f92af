"""Cost of one CMA-ES generation in the real CarRacing-v3 with the cheaper training episodes, in one run.

    python benchmarks/bench_search.py                                   # ~7 minutes on 2 busy cores
    python benchmarks/bench_search.py --population 32 --tracks 4 --max-steps 1000 --patience 200
    python benchmarks/bench_search.py --data-dir /mnt/cpu_run           # members around a trained controller

Scores the same members on the same tracks (all members share a generation's tracks, as in
stage 5) four ways, on one pool of environment workers, and prints per generation the real
environment steps and the wall time, each as a ratio to today's loop (every member drives
every track to the end):

* ``full``: today's loop;
* ``patience``: ``controller.patience`` - a training episode stops after ``--patience`` steps
  without a new tile, the remaining steps booked at -0.1 each;
* ``racing``: ``controller.racing`` - every member drives the first track, the better half
  the others;
* ``both``: the two together (the ``cpu`` preset).

Without ``--data-dir``, V and M are untrained and the members are drawn around C = 0 with the
search's initial sigma: such controllers rarely find tiles, so the early stop saves far more
than it will for a controller that drives (then most episodes run to the end). With
``--data-dir`` the members are drawn around that run's selected controller with its V and M:
the saving of a search that has learnt to drive. Held-out evaluations always run full
episodes and are not part of this measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from models.controller import num_parameters
from worldmodels.controller_training import generation_fitness
from worldmodels.env import episode_seed
from worldmodels.envpool import CarRacingPool

# TensorFlow and the models are imported in main(): the pool's spawned workers re-import this script.

MODES = {"full": (False, False), "patience": (True, False), "racing": (False, True), "both": (True, True)}


def load_models(data_dir: Path | None, hidden: int):
    """(V, M, centre of the members (N,)): a trained run's, or untrained ones around C = 0."""
    if data_dir is None:
        from models.mdn_rnn import MDNRNN
        from models.vae import ConvVAE

        return ConvVAE(z_size=32, seed=1), MDNRNN(z_size=32, hidden_units=hidden, seed=2), \
            np.zeros(num_parameters(32, hidden))
    import config
    from worldmodels import rollout

    cfg = config.load_config(data_dir / "controller" / "config.json")
    vae, rnn = rollout.load_world_models(data_dir, cfg)
    with np.load(data_dir / "controller" / "controller.npz") as data:
        return vae, rnn, np.array(data["params"], np.float64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--population", type=int, default=8, help="members per generation")
    parser.add_argument("--tracks", type=int, default=4, help="tracks per member (>= 2 for racing)")
    parser.add_argument("--max-steps", type=int, default=300, help="time limit of an episode")
    parser.add_argument("--patience", type=int, default=50, help="steps without a new tile before a stop")
    parser.add_argument("--generations", type=int, default=1, help="generations measured per mode")
    parser.add_argument("--sigma", type=float, default=0.1, help="spread of the members around the centre")
    parser.add_argument("--workers", type=int, default=2, help="environment worker processes")
    parser.add_argument("--data-dir", type=Path, help="a run with controller/ (default: untrained V, M and C = 0)")
    parser.add_argument("--z-input", choices=("sample", "mean"), default="sample")
    args = parser.parse_args(argv)
    if args.tracks < 2:
        parser.error("--tracks must be >= 2 (racing halves the population after the first track)")

    from worldmodels.rollout import RealWorld, run_episodes

    vae, rnn, centre = load_models(args.data_dir, 256)
    rng = np.random.default_rng(0)
    generations = [(centre + args.sigma * rng.standard_normal((args.population, len(centre))),
                    np.array([episode_seed(7, g * args.tracks + i) for i in range(args.tracks)]))
                   for g in range(args.generations)]
    print(f"{args.generations} generation(s) of {args.population} members x {args.tracks} tracks of <= "
          f"{args.max_steps} steps, patience {args.patience}, {args.workers} workers, "
          f"{'trained run ' + str(args.data_dir) if args.data_dir else 'untrained V and M, members around C = 0'}")
    results = {}
    with CarRacingPool(args.population * args.tracks, args.max_steps, "process", args.workers) as pool:
        world = RealWorld(pool, vae, rnn, args.z_input)
        run_episodes(world, generations[0][0][:1], generations[0][1][None, :1], 5)  # trace V and M outside the timing
        for mode, (early_stop, racing) in MODES.items():
            patience = args.patience if early_stop else None
            steps, start, best = 0, time.perf_counter(), []
            for params, tracks in generations:
                def run(p, seeds):
                    return run_episodes(world, p, seeds, args.max_steps, patience=patience)

                fitness, used = generation_fitness(run, params, tracks, racing)
                steps += used
                best.append(int(np.argmax(fitness)))
            seconds = (time.perf_counter() - start) / args.generations
            results[mode] = (steps / args.generations, seconds, best)
    base_steps, base_seconds, base_best = results["full"]
    print(f"{'mode':<10} {'env steps/gen':>14} {'seconds/gen':>12} {'steps ratio':>12} {'time ratio':>11}  "
          "same best member as full")
    for mode, (steps, seconds, best) in results.items():
        print(f"{mode:<10} {steps:>14.0f} {seconds:>12.1f} {steps / base_steps:>12.3f} {seconds / base_seconds:>11.3f}  "
              f"{sum(a == b for a, b in zip(best, base_best))}/{len(best)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
