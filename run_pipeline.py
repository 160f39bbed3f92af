"""Run the whole pipeline, stage by stage, with one preset: 01 -> 05, then a summary of the results.

    python run_pipeline.py --preset quick          # 15-34 min on 2 CPU cores (README, "The pipeline")
    python run_pipeline.py --preset small --data-dir /mnt/ebs/data
    python run_pipeline.py --preset quick --help-config     # every setting the stages will use

Every stage resumes where it stopped, so rerunning this command after an interruption
(Ctrl-C, SIGKILL, a stopped or terminated instance, a failed stage) redoes nothing that was
finished. ``--set`` options are passed to every stage. The data folder is ``--data-dir``,
else ``$WORLDMODELS_DATA``, else ``data``.

The closing summary gives each stage's key numbers (read from its ``metrics.json``), its time
summed over every run of this command on the data folder (kept in ``<data-dir>/pipeline.json``,
updated every 30 s, so even a killed run's time counts), and which stages were already done and
only checked. The logic is in ``worldmodels/pipeline.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import config
from worldmodels import cli, pipeline


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = config.make_parser(__doc__, default_preset="quick")
    cfg, args = config.parse_args(__doc__, argv, parser)
    return pipeline.run(cfg, Path(args.data_dir), args.preset, args.overrides, args.verbose)


if __name__ == "__main__":
    cli.run(main)
