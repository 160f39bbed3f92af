"""The iterative procedure: collect with the current C, fine-tune M on all data, retrain C in the dream, score it.

    python 06_iterate.py --preset small                                    # -> <data-dir>/iterations/
    python 06_iterate.py --set iterate.iterations=20 --set iterate.episodes=32

The seed report's procedure for environments a random policy does not explore: per iteration,
``iterations/iter_<iii>/`` gets the new episodes (``rollouts/``, ``series/``), the fine-tuned M
(``rnn/``) and the controller trained in its dream (``controller/``), and
``iterations/iterations.csv`` one row (real environment steps, M on the new episodes, dream and
real scores, exploit gap). Needs stages 1-4 (``rollouts/``, V, ``series/``, ``rnn/``).

Resumable: after Ctrl-C or SIGKILL rerun the same command; a larger ``iterate.iterations``
continues a finished run. What each step does is described in ``worldmodels/iterate.py``.
"""

from __future__ import annotations

import shlex
import sys

import config
from worldmodels import cli
from worldmodels.iterate import run_iterations


def main(argv=None) -> int:
    cfg, args = config.parse_args(__doc__, argv)
    command = shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    run_iterations(cfg, args.data_dir, command=command)
    return 0


if __name__ == "__main__":
    cli.run(main)
