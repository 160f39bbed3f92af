"""Stage 5: evolve C, the linear controller, with CMA-ES in the real CarRacing-v3 or in M's dream.

    python 05_train_controller.py --preset small                              # -> <data-dir>/controller/
    python 05_train_controller.py --env dream --set dream.temperature=1.15    # -> <data-dir>/controller_dream_t1.15/
    python 05_train_controller.py --set controller.workers=16 --max-concurrent 1024
    python 05_train_controller.py --set controller.backend=ray --set controller.ray_address=auto
    python 05_train_controller.py --preset cpu --data-dir /mnt/cpu_run       # hours on 2 cores; resumable
    python 05_train_controller.py --set controller.patience=200 --set controller.racing=true

Every generation CMA-ES proposes ``controller.population`` controllers, and each drives
``controller.rollouts_per_member`` episodes; its fitness is the mean return, in the real
environment (a pool of CarRacing workers with one batched V, M and C call per step) or, with
``--env dream``, in M's dream (``dream.batch_size`` agents per compiled M step, starting from
real frames of ``<data-dir>/series/``). Every ``controller.eval_every`` generations (and after
the last) the CMA mean is scored on ``controller.eval_episodes`` held-out tracks of the *real*
environment (and, in the dream, on as many held-out dream episodes), and the best-scoring mean
is kept as the controller. At the end it is scored on ``controller.final_eval_episodes``
further held-out real tracks (the reported score, ``metrics.json``).

Cheaper training episodes, never cheaper evaluations: ``controller.patience=N`` stops a
training episode after N steps without a new tile (the remaining steps booked at -0.1 each);
``controller.racing=true`` lets every member drive the first track and only the better half
the rest. ``controller.z_input`` (``sample``, the paper's, or ``mean``) is what C and M see of
V's posterior.

Resumable: the search is checkpointed after every generation; after Ctrl-C or SIGKILL rerun
the same command, and it continues to the same result as an uninterrupted run. A finished run
reruns as a no-op; a larger ``controller.generations`` continues it.

Writes ``controller/`` (real) or ``controller_dream_t<tau>/`` (dream): ``config.json``,
``evolution.pkl``, ``history.csv`` (per generation: best, mean, std, worst fitness, sigma,
elapsed seconds, env_steps), ``eval.csv`` (generation, mean, std on the real held-out tracks,
env_steps, seconds; dream_mean, dream_std in the dream), ``controller.npz`` (``params``: the selected CMA mean; ``mean``: the current CMA mean;
``best_member``), ``learning_curve.png``, ``logs/`` (TensorBoard) and ``metrics.json`` (final
evaluation; skipped with ``--no-final-eval``). The details are in
``worldmodels/controller_training.py``.
"""

from __future__ import annotations

import shlex
import sys

import config
from worldmodels import cli
from worldmodels.controller_training import DEFAULT_MAX_CONCURRENT, train_controller

# TensorFlow is imported inside train_controller, after the checks: a missing model or a corrupt
# checkpoint is reported at once, and the spawned environment workers (which re-import this
# script) stay small.


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.add_argument("--env", choices=["real", "dream"], help="where to score controllers (overrides controller.env)")
    parser.add_argument("--no-final-eval", action="store_true", help="skip the final evaluation (metrics.json)")
    parser.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                        help="at most N real environments at once (memory: ~4 MB each; "
                             f"default {DEFAULT_MAX_CONCURRENT})")
    cfg, args = config.parse_args(__doc__, argv, parser)
    if args.env:
        cfg = config.apply_overrides(cfg, {"controller.env": args.env})
    if args.max_concurrent < 1:
        parser.error(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    command = shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    train_controller(cfg, args.data_dir, max_concurrent=args.max_concurrent, final_eval=not args.no_final_eval,
                     command=command)
    return 0


if __name__ == "__main__":
    cli.run(main)
