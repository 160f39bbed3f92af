#!/bin/bash
# C trained only in M's dream, on data in which driving happens (issue 19, first run; README
# "C trained in M's dream on driving data"). G: the long cpu search carried at generation 40
# (its controller scores 693.9 on the 100 final held-out tracks); D: a new data dir.
# Times on a 2-core Intel Xeon, 2 cores shared with the long search throughout.
set -e
G=${G:-runs/g40}; D=${D:-runs/dream}
python -m worldmodels.carry restore cpu-gan-s0 --data-dir $G      # needs the carry at generation 40
mkdir -p $D && cp -r $G/vae_gan $D/                                 # V: the long run's VAE-GAN, unchanged
S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=0.1"
python 01_generate_data.py --preset small --data-dir $D $S          # 200 episodes: 180 by C + noise 0.1, 20 brownian; ~16 min
python 03_generate_rnn_data.py --preset small --data-dir $D $S      # 96 s
python 04_train_rnn.py --preset small --data-dir $D $S              # 1000 steps, 32 min
python 05_train_controller.py --preset small --data-dir $D $S --env dream --set dream.temperature=1.0 \
  --set controller.population=32 --set controller.rollouts_per_member=16 --set controller.generations=100 \
  --set controller.eval_every=20 --set controller.eval_episodes=32   # 45 min: ~23 min of dream generations, 22 min of real evaluations (5 x 32 tracks, final 100)
