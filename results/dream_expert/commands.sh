#!/bin/bash
# The dream on data that costs few real steps (issue 19; README sixth part): stage 1 driven 90% by the noisy
# pure-pursuit `expert` (it reads the track's centre line: no training) and 10% by the random policy; V the long cpu
# run's VAE-GAN (as results/dream_ss); M with scheduled sampling 0.3 and dropout 0.1 (as results/dream_ss); C only in
# the dream (as results/dream_ss), then the iterative procedure (as results/dream_ss). Resumable: rerun.
# 2-core Intel Xeon, 2026-12-04/05, at nice 15 beside three other jobs.
set -e
G=${G:-runs/gan}; E=${E:-runs/expert}
[ -f $G/controller/controller.npz ] || python -m worldmodels.carry restore cpu-gan-s0 --data-dir $G
mkdir -p $E && [ -d $E/vae_gan ] || cp -r $G/vae_gan $E/
S="--set vae.model=vae_gan --set data.policy=expert:0.9,brownian:0.1 --set rnn.dropout=0.1 --set rnn.scheduled_sampling=0.3"
python 01_generate_data.py --preset small --data-dir $E $S        # 200 episodes (177,835 frames), ~22 min
python 03_generate_rnn_data.py --preset small --data-dir $E $S    # 2.5 min
python 04_train_rnn.py --preset small --data-dir $E $S
python -m worldmodels.diagnostics --data-dir $E --out results/dream_expert/world_model.json --figure results/dream_expert/world_model.png
python 05_train_controller.py --preset small --data-dir $E $S --env dream \
  --set dream.temperature=1.0 --set controller.population=32 --set controller.rollouts_per_member=16 \
  --set controller.generations=100 --set controller.eval_every=20 --set controller.eval_episodes=32
python 06_iterate.py --preset small --data-dir $E $S --set dream.temperature=1.0 \
  --set controller.population=32 --set controller.rollouts_per_member=16 \
  --set iterate.iterations=3 --set iterate.episodes=64 --set iterate.generations=100 --set iterate.eval_episodes=100 \
  --set iterate.repair_episodes=32 --set iterate.repair_candidates=64
