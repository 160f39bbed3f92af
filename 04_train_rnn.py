"""Stage 4: train M (the MDN-RNN) on the latent series in ``<data-dir>/series/`` -> ``<data-dir>/rnn/``.

    python 04_train_rnn.py --preset small
    python 04_train_rnn.py --set rnn.steps=8000 --set rnn.dropout=0.1     # Dropout's Dream Land
    python 04_train_rnn.py --reevaluate              # recompute metrics.json of a finished M

Resumable: after Ctrl-C, SIGKILL or a lost machine, rerun the same command to continue exactly
where it stopped; a finished run reruns as a no-op and prints its results again. What it writes,
how it trains and what its metrics mean are described in ``worldmodels/rnn_training.py``.
"""

from __future__ import annotations

import config
from worldmodels import cli, stage
from worldmodels.rnn_training import train_rnn


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    stage.add_checkpoint_every(parser)
    parser.add_argument("--reevaluate", action="store_true",
                        help="recompute metrics.json of a finished M from rnn.keras (no training)")
    cfg, args = config.parse_args(__doc__, argv, parser)
    train_rnn(cfg, args.data_dir, checkpoint_every=args.checkpoint_every, reevaluate=args.reevaluate)
    return 0


if __name__ == "__main__":
    cli.run(main)
