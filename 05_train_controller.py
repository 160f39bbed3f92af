"""Stage 5: evolve C, the linear controller, with CMA-ES in the real CarRacing-v3 or in M's dream.

    python 05_train_controller.py --preset small                              # -> <data-dir>/controller/
    python 05_train_controller.py --env dream --set dream.temperature=1.15    # -> <data-dir>/controller_dream_t1.15/
    python 05_train_controller.py --set controller.init_from=controller_dream_t1.15  # -> <data-dir>/controller_hybrid/
    python 05_train_controller.py --set controller.workers=16 --max-concurrent 1024
    python 05_train_controller.py --set controller.backend=ray --set controller.ray_address=auto

Resumable: the search is checkpointed after every generation; after Ctrl-C or SIGKILL rerun
the same command, and it continues to the same result as an uninterrupted run. A finished run
reruns as a no-op; a larger ``controller.generations`` continues it. How C is evolved, selected
and scored, and what the output folder holds, is described in ``worldmodels/controller_training.py``.
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
