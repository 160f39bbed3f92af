"""The temperature study: train C in M's dream at each tau, score each in the real CarRacing.

    python study_temperature.py --preset small
    python study_temperature.py --set dream.temperatures=0.5,1.0,1.15,1.3 --set controller.generations=100

For every tau in ``dream.temperatures`` this runs stage 5 in the dream into
``<data-dir>/controller_dream_t<tau>/`` and scores each controller on the same held-out real tracks.

Writes ``<data-dir>/temperature_study/`` (``results.md``, ``results.json``, ``temperature.png``).
Resumable: rerun the same command after an interruption. The details are in
``worldmodels/temperature_study.py``.
"""

from __future__ import annotations

import config
from worldmodels import cli
from worldmodels.controller_training import parse_study_arguments
from worldmodels.temperature_study import run_study

# TensorFlow is imported when the models are loaded, after the argument checks (and not in
# the spawned environment workers, which re-import this script).


def main(argv=None) -> int:
    cfg, args, command = parse_study_arguments(__doc__, argv)
    if not cfg.dream.temperatures:
        raise config.ConfigError("dream.temperatures is empty; give at least one, e.g. --set dream.temperatures=1.0,1.15")
    run_study(cfg, args.data_dir, max_concurrent=args.max_concurrent, command=command)
    return 0


if __name__ == "__main__":
    cli.run(main)
