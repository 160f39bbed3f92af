#!/bin/bash
# M's dropout compared (issue 19 item 6; README sixth part): results/dream_ss's stage-4 M (scheduled sampling 0.3,
# dropout 0.1) trained again on the very same 200 episodes (links) with dropout 0 and 0.05, each dreamt with its own
# dropout as the per-episode mask, and a dream-only C searched in each dream exactly as results/dream_ss (100
# generations of 32 x 16 dream episodes at tau 1, 5 checks on 32 real tracks), scored on the same 100 final tracks.
# D is results/dream_ss/commands.sh's data dir. 2-core Intel Xeon, 2026-12-04/05, beside two or three other jobs.
set -e
G=${G:-runs/gan}; D=${D:-runs/dream3}
for p in 0.0 0.05; do
  N=${D}_d${p/./}
  mkdir -p $N && for f in rollouts series vae_gan; do ln -sfn $(realpath $D/$f) $N/$f; done
  S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=$p --set rnn.scheduled_sampling=0.3"
  python 04_train_rnn.py --preset small --data-dir $N $S
  python -m worldmodels.diagnostics --data-dir $N --out results/dream_dropout/m_d${p/./}.json --figure results/dream_dropout/m_d${p/./}.png
  python 05_train_controller.py --preset small --data-dir $N $S --env dream \
    --set dream.temperature=1.0 --set controller.population=32 --set controller.rollouts_per_member=16 \
    --set controller.generations=100 --set controller.eval_every=20 --set controller.eval_episodes=32
done
