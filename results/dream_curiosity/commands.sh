#!/bin/bash
# Issue 19 item 3, curiosity measured: results/dream_ss's iteration 1 (498.6 +- 217.0 on the 100 final tracks) run again
# with one change, curiosity on: before the collection, C and 8 noisy variants (step controller.sigma_init) each drive
# one 200-step real episode on the same track, and the fittest by return + beta x M's NLL of the episode (beta 1)
# collects the 64 episodes. The same V, M, data, dream-only C (links to D's), seeds and repair as the run without.
# 2-core Intel Xeon, 2026-12-05: 1.74 h beside two to three other jobs. Resumable: rerun.
set -e
G=${G:-runs/gan}; D=${D:-runs/dream3}; C=${C:-runs/dream3_cur}
mkdir -p $C; for f in rollouts series vae_gan rnn controller_dream_t1; do [ -e $C/$f ] || ln -s $(realpath $D/$f) $C/$f; done
S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=0.1 --set rnn.scheduled_sampling=0.3"
python 06_iterate.py --preset small --data-dir $C $S --set dream.temperature=1.0 \
  --set controller.population=32 --set controller.rollouts_per_member=16 \
  --set iterate.iterations=1 --set iterate.episodes=64 --set iterate.generations=100 --set iterate.eval_episodes=100 \
  --set iterate.repair_episodes=32 --set iterate.repair_candidates=64 \
  --set iterate.curiosity_variants=8 --set iterate.curiosity=1.0
