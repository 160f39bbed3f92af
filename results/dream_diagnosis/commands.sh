#!/bin/bash
# Why the dream does not transfer (issue 19, README sixth part, "What the diagnostics say"). D is
# results/dream_ss/commands.sh's data dir (dream3), with the Ms of results/dream_dropout (D_d00, D_d005), one more M
# from rnn.seed 1 on the same episodes (D_m1, as D_d00 with --set rnn.seed=1 and dropout 0.1), the three iterations'
# Ms (D/iterations/iter_00k/rnn, read through a folder I_k that links rnn/ to it and rollouts, series, vae_gan to D's)
# and results/dream_expert's data dir (E). 2-core Intel Xeon, 2026-12-05, beside two or three other jobs.
set -e
D=${D:-runs/dream3}; E=${E:-runs/expert}; R=results/dream_diagnosis
# 1. Does M know what steering does? Full left vs full right for 20 steps from frame 50 of M's 13 held-out
#    episodes, in M's open loop and in reality (~1.5 min each).
for N in $D ${D}_d00 ${D}_d005 ${D}_m1 $E; do
  python -m worldmodels.diagnostics --data-dir $N --steering 20 --out $R/steering_$(basename $N).json
done
# The same check on two data sets that change only how the driver's actions are chosen (stage 1 as results/dream_ss,
# one --set more; the runs' scripts: results/dream_lapse/commands.sh): data.controller_noise=0.3 (NS) and
# data.controller_steer_lapses=0.02 (L). --steering also prints steering_r2_z, how much of the episodes' steering a
# linear fit on z predicts (held out, two folds over the episodes).
NS=${NS:-runs/noise3}; L=${L:-runs/lapse}
for N in $NS $L; do
  python -m worldmodels.diagnostics --data-dir $N --steering 20 --out $R/steering_$(basename $N).json
done
H=$(python -c "import json; print(' '.join('$D/series/' + n for n in json.load(open('$D/rnn/split.json'))['heldout']))")
for k in 1 2 3; do
  I=runs/iter$k; mkdir -p $I; for f in rollouts series vae_gan; do ln -sfn $(realpath $D/$f) $I/$f; done
  ln -sfn $(realpath $D/iterations/iter_00$k/rnn) $I/rnn
  python -m worldmodels.diagnostics --data-dir $I $H --steering 20 --out $R/steering_iter$k.json   # the same 13 episodes
done
# 2. The exploit under C's own steering, and whether the Ms' disagreement sees it: the fourth part's dream-only C
#    (74.1) from 64 real states, dreamt and replayed (50 steps: 6 min; 200 steps: 8 min). --figure X.png also draws
#    the windows to X_control.png, kept here as the JSON's name .png.
python -m worldmodels.diagnostics --data-dir $D --ensemble ${D}_d00,${D}_d005 --controller $D/controller_dream_t1 \
  --out $R/control_ss_d00_d005_h50.json --figure /tmp/h50.png && mv /tmp/h50_control.png $R/control_ss_d00_d005_h50.png
python -m worldmodels.diagnostics --data-dir $D --ensemble ${D}_d00,${D}_d005 --controller $D/controller_dream_t1 \
  --horizon 200 --out $R/control_ss_d00_d005_h200.json --figure /tmp/h200.png && mv /tmp/h200_control.png $R/control_ss_d00_d005_h200.png
python -m worldmodels.diagnostics --data-dir $D --ensemble ${D}_m1 --controller $D/controller_dream_t1 \
  --horizon 200 --out $R/control_ss_m1_h200.json --figure /tmp/m1.png && mv /tmp/m1_control.png $R/control_ss_m1_h200.png
