#!/bin/bash
# Issue 19: does M learn what steering does when the data shows steering apart from the frames that call for it?
# results/dream_ss/commands.sh's recipe (same V, the same generation-180 driver, the same episode seeds, scheduled
# sampling 0.3, dropout 0.1, the dream-only search of its fourth part) with one change each:
#   NS: data.controller_noise=0.3 (3x the driver's correlated action noise)
#   L:  data.controller_steer_lapses=0.02 (with chance 0.02 a step the steering is replaced for ~10 steps by one
#       uniform random steer, held; gas and brake stay the driver's)
# then the steering check (results/dream_diagnosis/commands.sh) and the dream-only search. Compare the fourth part:
# steering 0.55 of 11.56 after 10 steps, dream-only C 74.1 +- 77.6 on the 100 final tracks.
# 2-core Intel Xeon, 2026-12-05, each beside two to four other jobs. Every command resumes after a stop (rerun).
set -e
G=${G:-runs/gan}
S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=0.1 --set rnn.scheduled_sampling=0.3"
[ -f $G/controller/controller.npz ] || python -m worldmodels.carry restore cpu-gan-s0 --data-dir $G  # the long search
for run in "runs/noise3 --set data.controller_noise=0.3" "runs/lapse --set data.controller_steer_lapses=0.02"; do
  set -- $run; D=$1; shift; X="$S $*"
  mkdir -p $D; [ -d $D/vae_gan ] || cp -r $G/vae_gan $D/
  python 01_generate_data.py --preset small --data-dir $D $X      # 200 episodes; lapse: 37 min beside 3 jobs
  python 03_generate_rnn_data.py --preset small --data-dir $D $X
  python 04_train_rnn.py --preset small --data-dir $D $X          # lapse: 38 min beside 3 jobs
  python -m worldmodels.diagnostics --data-dir $D --steering 20 --out $D/world_model.json
  python 05_train_controller.py --preset small --data-dir $D $X --env dream --set dream.temperature=1.0 \
    --set controller.population=32 --set controller.rollouts_per_member=16 --set controller.generations=100 \
    --set controller.eval_every=20 --set controller.eval_episodes=32
done
# How the lapse run's dream-only controller drives (run while the search stood at generation 20-22, so that its
# controller.npz held generation 20's CMA mean; the JSON records the generation): 6 validation tracks, ~3 min.
python evaluate_controller.py --data-dir runs/lapse --controller runs/lapse/controller_dream_t1 --episodes 6 \
  --track-seed 3000000 --profile --output results/dream_lapse/profile_lapse_g20_s3000000_n6.json
