#!/bin/bash
# The pessimistic dream (MOPO; issue 19; README "Pessimism where Ms disagree"): results/dream_ss's dream-only search
# (its stage-4 M, 200 series, 1000-step dreams from frame 50, 32 x 16, 100 generations from zeros, 5 checks on 32 real
# tracks: 74.1 +- 77.6) with one change: every step pays M's reward minus lambda x the disagreement u of M and a
# second M trained on the same episodes from rnn.seed 1 (D_m1, as results/dream_dropout with dropout 0.1 and
# --set rnn.seed=1). lambda = 10: u measured teacher-forced on M's held-out episodes is 0.0117 a step
# (u_on_data_m1.json), so the dream charges ~0.12 a step on data the Ms know. D is results/dream_ss's data dir.
# 2-core Intel Xeon, 2026-12-04/05, 2 sessions, beside two to four other jobs.
set -e
G=${G:-runs/gan}; D=${D:-runs/dream3}; M1=${D}_m1; P=${P:-runs/pess2_l10}
S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=0.1 --set rnn.scheduled_sampling=0.3"
mkdir -p $M1 && for f in rollouts series vae_gan; do ln -sfn $(realpath $D/$f) $M1/$f; done
python 04_train_rnn.py --preset small --data-dir $M1 $S --set rnn.seed=1
python -m worldmodels.diagnostics --data-dir $D --ensemble $M1 --out results/dream_pessimism/u_on_data_m1.json
mkdir -p $P && for f in rollouts series vae_gan rnn; do ln -sfn $(realpath $D/$f) $P/$f; done
python 05_train_controller.py --preset small --data-dir $P $S --env dream \
  --set dream.temperature=1.0 --set dream.ensemble=$M1 --set dream.pessimism=10 \
  --set controller.population=32 --set controller.rollouts_per_member=16 \
  --set controller.generations=100 --set controller.eval_every=20 --set controller.eval_episodes=32
