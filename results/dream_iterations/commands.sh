#!/bin/bash
# The iterative procedure (issue 19; README "C trained in M's dream on driving data", third part) on the second
# dream-only run's data dir: iteration i collects 64 episodes with the previous controller plus action noise 0.1
# (iteration 1: the dream-only controller, controller_dream_t1, -34.1 on the 100 final tracks), replays the 8 of 16
# 50-step windows whose dream departs most from reality ("repair"), fine-tunes M on everything so far, evolves C in the
# new M's dream for 100 generations (32 members x 16 dream episodes) from the previous controller, and scores it on the
# 100 final held-out real tracks. Run first: results/dream_driving_data_g180/commands.sh (D, G). 2-core Intel Xeon,
# the 2 cores shared with another search throughout. Resumes after any stop (rerun); a larger count continues.
set -e
G=${G:-runs/g180}; D=${D:-runs/dream2}
S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=0.1"
python 06_iterate.py --preset small --data-dir $D $S --set dream.temperature=1.0 \
  --set controller.population=32 --set controller.rollouts_per_member=16 \
  --set iterate.iterations=3 --set iterate.episodes=64 --set iterate.generations=100 --set iterate.eval_episodes=100 \
  --set iterate.repair_episodes=8 --set iterate.repair_candidates=16
  # iteration 1: ~2.9 h wall over three runs (its row says 0.66 h: the last run only, a bug fixed since)
python -m worldmodels.figures iterations_table --data-dir $D --out results/dream_iterations/iterations.md
python -m worldmodels.figures sample_efficiency --data-dir $D --also-data-dir runs/gan --out results/sample_efficiency.png
