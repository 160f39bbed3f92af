#!/bin/bash
# The branched dream (issue 19; README "C trained in M's dream on driving data", sixth part): short dreams started
# every 25 frames of every series (dream.start_every=25), at most 200 steps each (dream.max_steps=200), 64 per member
# (the agent steps of 16 x 1000), C from zeros, 100 generations, everything else as results/dream_ss's dream-only run.
# D is results/dream_ss/commands.sh's data dir after its three iterations. 2-core Intel Xeon, 2026-12-05.
set -e
G=${G:-runs/gan}; D=${D:-runs/dream3}; B=${B:-runs/branch}; A=${A:-runs/branch_ss}
S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=0.1 --set rnn.scheduled_sampling=0.3"
F="--env dream --set dream.temperature=1.0 --set dream.start_every=25 --set dream.max_steps=200 \
  --set controller.population=32 --set controller.rollouts_per_member=64 \
  --set controller.generations=100 --set controller.eval_every=20 --set controller.eval_episodes=32"
# (a) iteration 3's M and all 488 series so far (stage 3's 200, and each iteration's 64 collected + 32 repaired):
# 16,995 starts. 1.1 h beside three other jobs (dream 100 generations ~55 min, 5 checks on 32 tracks, final 100 tracks)
mkdir -p $B/series && for f in $D/series/*.npz $D/iterations/iter_00[123]/series/*.npz; do ln -sf $(realpath $f) $B/series/; done
cp $D/series/config.json $B/series/ && ln -sfn $(realpath $D/vae_gan) $B/vae_gan && ln -sfn $(realpath $D/rollouts) $B/rollouts
ln -sfn $(realpath $D/iterations/iter_003/rnn) $B/rnn
python 05_train_controller.py --preset small --data-dir $B $S $F
# (b) the ablation: results/dream_ss's own dream-only search (stage 4's M, its 200 series: 74.1 with 1000-step dreams
# from frame 50) with only the dream changed. ~1 h beside three other jobs.
mkdir -p $A && for f in series vae_gan rollouts rnn; do ln -sfn $(realpath $D/$f) $A/$f; done
python 05_train_controller.py --preset small --data-dir $A $S $F
