#!/bin/bash
# C trained in M's dream with M trained with scheduled sampling 0.3 (issue 19, item 6; README "C trained in M's dream
# on driving data", fourth part): the second dream-only run (results/dream_driving_data_g180/commands.sh) again with
# one change, rnn.scheduled_sampling=0.3. Same V (the long cpu search's VAE-GAN), the same driver (its kept
# generation-180 controller, 750.9 on the 100 final tracks) and the same episode seeds, so the same 200 episodes.
# N: the ablation, M without scheduled sampling on the very same episodes (links), i.e. the second run's M.
# 2-core Intel Xeon, 2026-12-04; times are wall times, with what shared the 2 cores.
set -e
G=${G:-runs/gan}; D=${D:-runs/dream3}; N=${N:-runs/dream3_noss}
[ -f $G/controller/controller.npz ] || python -m worldmodels.carry restore cpu-gan-s0 --data-dir $G  # the long search
mkdir -p $D && cp -r $G/vae_gan $D/                                 # V: the long run's VAE-GAN, unchanged
S="--set vae.model=vae_gan --set data.policy=controller:0.9,brownian:0.1 --set data.controller=$G/controller --set rnn.dropout=0.1"
python 01_generate_data.py --preset small --data-dir $D $S          # 200 episodes, 14 min (beside the test suite from minute 6)
python 03_generate_rnn_data.py --preset small --data-dir $D $S      # 2 min
python 04_train_rnn.py --preset small --data-dir $D $S --set rnn.scheduled_sampling=0.3   # 22 min, half of it beside the test suite
python 05_train_controller.py --preset small --data-dir $D $S --set rnn.scheduled_sampling=0.3 --env dream \
  --set dream.temperature=1.0 --set controller.population=32 --set controller.rollouts_per_member=16 \
  --set controller.generations=100 --set controller.eval_every=20 --set controller.eval_episodes=32  # 33 min beside the ablation's M: 100
  # dream generations 17 min, 5 checks on 32 real tracks ~2.5 min each, the final 100 tracks 4 min
# The ablation: M without scheduled sampling on the same episodes, then both Ms against reality on their held-out series
mkdir -p $N && for f in rollouts series vae_gan; do ln -s $(realpath $D/$f) $N/$f; done
python 04_train_rnn.py --preset small --data-dir $N $S              # 28 min beside the dream search
python -m worldmodels.diagnostics --data-dir $N --out results/dream_ss/m_without_ss.json --figure results/dream_ss/m_without_ss.png
python -m worldmodels.diagnostics --data-dir $D --out results/dream_ss/m_with_ss.json --figure results/dream_ss/m_with_ss.png
# Then the iterative procedure on this M with a 4x larger repair (32 of 64 windows); resumes after any stop (rerun),
# carried between machines with: python -m worldmodels.carry save --data-dir $D --name dream3-iterations --iterations
python 06_iterate.py --preset small --data-dir $D $S --set rnn.scheduled_sampling=0.3 --set dream.temperature=1.0 \
  --set controller.population=32 --set controller.rollouts_per_member=16 \
  --set iterate.iterations=3 --set iterate.episodes=64 --set iterate.generations=100 --set iterate.eval_episodes=100 \
  --set iterate.repair_episodes=32 --set iterate.repair_candidates=64
# After each iteration: python -m worldmodels.carry save --data-dir $D --name dream3-iterations --iterations
# Iteration 1: 0.99 h in all over two sessions (its dream search and scoring beside the hybrid below).
python -m worldmodels.figures iterations_table --data-dir $D --out results/dream_ss/iterations.md

# The hybrid (issue 19 item 7): the dream-only controller above fine-tuned in the real environment, 20 generations
# of the cpu preset's search; 49 min with the 2 cores shared with the iterative run. Resumable: rerun.
python 05_train_controller.py --preset cpu --data-dir $D $S --set rnn.scheduled_sampling=0.3 \
  --set controller.init_from=controller_dream_t1 --set controller.generations=20
# The hybrid's control: the same search from zeros on the same V and M (a data dir of links to $D's rollouts, series,
# vae_gan and rnn); files results/dream_ss/control_*. ~1.5 h over two sessions beside three other jobs.
R=runs/dream3_real; mkdir -p $R; for f in rollouts series vae_gan rnn; do ln -s $(realpath $D/$f) $R/$f; done
python 05_train_controller.py --preset cpu --data-dir $R $S --set rnn.scheduled_sampling=0.3 --set controller.generations=20
# Issue 19's figure: held-out real score against the real steps behind it (this data dir and the long cpu search)
python -m worldmodels.figures sample_efficiency --data-dir $D --also-data-dir $G --out results/sample_efficiency.png
# How three controllers drive on the same 10 validation tracks (~2 min each, beside three other jobs)
python evaluate_controller.py --data-dir $D --controller $D/iterations/iter_001/controller --episodes 10 \
  --track-seed 3000000 --profile --output results/dream_ss/profile_iter1_s3000000_n10.json
python evaluate_controller.py --data-dir $D --controller $D/controller_hybrid --episodes 10 \
  --track-seed 3000000 --profile --output results/dream_ss/profile_hybrid_s3000000_n10.json
python evaluate_controller.py --data-dir $G --controller $G/controller --episodes 10 \
  --track-seed 3000000 --profile --output results/dream_ss/profile_gan_g180_s3000000_n10.json
# What iteration 1's collection holds (1 min)
python -m worldmodels.metrics driving $D/iterations/iter_001/rollouts --per-policy 20 --out results/driving_data/dream3_iter1_collection.json
