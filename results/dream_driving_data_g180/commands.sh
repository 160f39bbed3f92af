#!/bin/bash
# C trained only in M's dream, second run (issue 19; README "C trained in M's dream on driving data"): the data
# driven by the long cpu search's generation-180 controller (750.9 on the 100 final held-out tracks, shipped as
# pretrained/carracing-cpu) instead of generation 40's. G: the long search carried at generation 186 (its kept
# controller is generation 180's); D: a new data dir. 2-core Intel Xeon, 2 cores shared with other runs throughout
# (the VAE seed study, then the V-data experiment of issue 18); times are wall times of this run.
set -e
G=${G:-runs/g180}; D=${D:-runs/dream2}
python -m worldmodels.carry restore cpu-gan-s0 --data-dir $G      # the carry at generation 186
mkdir -p $D && cp -r $G/vae_gan $D/                                 # V: the long run's VAE-GAN, unchanged
S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=0.1"
python 01_generate_data.py --preset small --data-dir $D $S          # 200 episodes: 180 by C + noise 0.1, 20 brownian (over two sessions)
python 03_generate_rnn_data.py --preset small --data-dir $D $S      # 2.5 min
python 04_train_rnn.py --preset small --data-dir $D $S              # 1000 steps, 41 min
python 05_train_controller.py --preset small --data-dir $D $S --env dream --set dream.temperature=1.0 \
  --set controller.population=32 --set controller.rollouts_per_member=16 --set controller.generations=100 \
  --set controller.eval_every=20 --set controller.eval_episodes=32  # 100 dream generations 67 min + 5 evaluations on
  # 32 real tracks 37 min + the final one on 100 tracks 19 min (over two sessions)
python evaluate_controller.py --data-dir $D --controller $D/controller_dream_t1 --episodes 10 --track-seed 3000000 \
  --profile --output profile_g20_s3000000_n10.json  # how generation 20 drives in reality (10 validation tracks; 3 min)
