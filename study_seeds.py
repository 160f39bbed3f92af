"""The seed study: one stage-5 search per CMA-ES seed on this data dir's V and M, all scored on the same tracks.

    python study_seeds.py --preset small                                   # controller.seeds = 0, 1, 2
    python study_seeds.py --preset small --set controller.seeds=0,1,2,3    # a fourth seed; the others are kept
    python -m worldmodels.seed_study table --run vae=DATA_VAE --run vae_gan=DATA_GAN --out results/seeds.md

For every seed k in ``controller.seeds`` this runs stage 5 with ``controller.seed=k`` into
``<data-dir>/controller_seeds/seed_<k>/`` and scores its controller on the same
``controller.final_eval_episodes`` held-out tracks (the final-evaluation stream of the config's
``controller.seed``, default 0), so the seeds differ in their searches only.

Writes ``<data-dir>/controller_seeds/`` (``results.md``, ``results.json``, ``seeds.png``): per seed
the mean, std and IQM over the tracks, and the mean +- std (ddof 1) of the per-seed means. Run it
on a data dir of each V kind (``vae.model``) and put them side by side with ``table``, which refuses
runs scored on different tracks. Resumable: rerun the same command after an interruption. The
details are in ``worldmodels/seed_study.py``.
"""

from __future__ import annotations

from worldmodels import cli
from worldmodels.controller_training import parse_study_arguments
from worldmodels.seed_study import run_study, study_seeds

# TensorFlow is imported when the models are loaded, after the argument checks (and not in
# the spawned environment workers, which re-import this script).


def main(argv=None) -> int:
    cfg, args, command = parse_study_arguments(__doc__, argv)
    study_seeds(cfg)  # an empty list is a one-line error before any work
    run_study(cfg, args.data_dir, max_concurrent=args.max_concurrent, command=command)
    return 0


if __name__ == "__main__":
    cli.run(main)
