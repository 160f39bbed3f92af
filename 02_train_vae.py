"""Stage 2: train V on the frames in ``<data-dir>/rollouts/`` -> ``<data-dir>/vae/`` (or ``vae_gan/``).

    python 02_train_vae.py --preset small
    python 02_train_vae.py --preset small --set vae.model=vae_gan    # the VAE-GAN as V -> vae_gan/
    python 02_train_vae.py --set vae.epochs=20 --set vae.batch_size=256 --set vae.mixed_precision=true
    python 02_train_vae.py --set vae.distribute=true          # all visible GPUs (MirroredStrategy)

Resumable: after Ctrl-C, SIGKILL or a lost machine, rerun the same command to continue from the
last checkpoint; a finished run reruns as a no-op. What it writes and how it trains are described
in ``worldmodels/vision_training.py``.
"""

from __future__ import annotations

import config
from worldmodels import cli, stage
from worldmodels.vision_training import train_vision


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    stage.add_checkpoint_every(parser)
    cfg, args = config.parse_args(__doc__, argv, parser)
    train_vision(cfg, args.data_dir, checkpoint_every=args.checkpoint_every)
    return 0


if __name__ == "__main__":
    cli.run(main)
