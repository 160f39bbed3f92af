"""Stage 4: train M (the MDN-RNN) on the latent series in ``<data-dir>/series/`` -> ``<data-dir>/rnn/``.

    python 04_train_rnn.py --preset small
    python 04_train_rnn.py --set rnn.steps=8000 --set rnn.dropout=0.1     # Dropout's Dream Land

Sequence windows of ``rnn.sequence_length`` transitions stream from disk
(``worldmodels.sequences``), so memory does not grow with the number of episodes. M is
validated on the episodes V never trained on: the split is ``datasets.split_episodes`` with
V's split seed (``vae.split_seed``, as 02 uses) and ``rnn.heldout_fraction`` (the same fraction as V's by
default, which gives exactly V's held-out set).

Training runs ``rnn.steps`` Adam updates (batches of ``rnn.batch_size`` windows, z re-sampled
from (mu, logvar) every batch) with the learning rate on a cosine decay from
``rnn.learning_rate`` to ``rnn.min_learning_rate`` over the run, and gradients clipped to a
global norm of ``rnn.grad_clip``. The steps are grouped into "epochs" of about one pass over
the training windows (``sequences.plan_epochs``), each followed by a held-out evaluation and
a checkpoint. A checkpoint is also written every minute (or every ``--checkpoint-every``
steps): after Ctrl-C, SIGKILL or a lost machine, rerun the same command to continue exactly
where it stopped. A finished run reruns as a no-op and prints its results again. A checkpoint
made with other training settings (``rnn.steps`` included: the learning-rate schedule depends
on it) or other training episodes is refused; delete ``rnn/`` to train again.

Writes ``rnn/``: ``rnn.keras`` (the trained M), ``config.json``, ``split.json``,
``metrics.json`` (on every held-out episode: NLL per z dimension, reward MSE, done accuracy
and AUC, and the two baselines of ``models.mdn_rnn.baseline_nlls`` measured in the same run),
``logs/`` (TensorBoard), ``checkpoint/``.

The z NLL is measured twice, each time with baselines fitted to the same kind of z: with z = mu
(``MDNRNN.test_step``; ``beats_baselines``) and with z drawn from V's posterior, the z M is
trained on (``*_sampled``). They can disagree: a latent dimension V does not use has mu ~ 0 and
sigma ~ 1, so M rightly learns to predict N(0, 1) for it, while a baseline fitted on mu predicts
a near-constant and scores far better on z = mu. With many unused dimensions only the sampled
comparison says whether M learned the dynamics.
"""

from __future__ import annotations

import math
import time

import numpy as np

import config
from worldmodels import artifacts, cli, datasets, sequences, storage

# TensorFlow, Keras and the model are imported in train_and_evaluate(), after the checks: a
# finished run or a missing folder is then reported at once, not after a 5-second import.

# The baselines are fitted on at most this many training episodes (evenly spread): per-dimension
# means and variances are exact to a fraction of a percent long before, and memory stays bounded.
# The evaluated episodes are scored in chunks of this many.
BASELINE_EPISODES = 200
SERIES_HINT = "Encode the rollouts first with: python 03_generate_rnn_data.py"


def split(cfg: config.Config, paths):
    """``(train, heldout)`` series files: V's split (its split seed), so M is validated on episodes V never saw."""
    return datasets.split_episodes(paths, cfg.rnn.heldout_fraction, cfg.vae.split_seed)


def build_model(cfg: config.Config, total_steps: int):
    """A compiled MDNRNN from ``cfg.rnn``: Adam on a cosine-decayed learning rate, global-norm clipping."""
    import keras

    from models.mdn_rnn import MDNRNN

    model = MDNRNN(z_size=cfg.vae.z_size, hidden_units=cfg.rnn.hidden_units, num_mixtures=cfg.rnn.num_mixtures,
                   reward_head=cfg.rnn.reward_head, done_head=cfg.rnn.done_head, dropout=cfg.rnn.dropout,
                   done_weight=cfg.rnn.done_weight, seed=cfg.rnn.seed)
    # Cosine rather than exponential decay: it stays near the initial rate for longer and lands on
    # min_learning_rate exactly at the last step (alpha is the final fraction of the initial rate).
    schedule = keras.optimizers.schedules.CosineDecay(
        cfg.rnn.learning_rate, decay_steps=total_steps, alpha=cfg.rnn.min_learning_rate / cfg.rnn.learning_rate)
    clip = cfg.rnn.grad_clip if cfg.rnn.grad_clip > 0 else None
    model.compile(optimizer=keras.optimizers.Adam(schedule, global_clipnorm=clip))
    return model


def check_learning_rates(cfg: config.Config) -> None:
    if not 0 < cfg.rnn.learning_rate or not 0 <= cfg.rnn.min_learning_rate <= cfg.rnn.learning_rate:
        raise config.ConfigError(
            f"need 0 <= rnn.min_learning_rate <= rnn.learning_rate and rnn.learning_rate > 0, got "
            f"{cfg.rnn.min_learning_rate} and {cfg.rnn.learning_rate}")


def fingerprint(cfg: config.Config, train_paths, train_windows: int) -> dict:
    """What fixes M's batches and updates (see ``datasets.training_fingerprint``)."""
    keys = ("vae.seed", "vae.split_seed", "rnn.heldout_fraction", "rnn.sequence_length", "rnn.batch_size", "rnn.learning_rate",
            "rnn.min_learning_rate", "rnn.grad_clip", "rnn.steps", "rnn.dropout", "rnn.done_weight", "rnn.seed",
            "rnn.mixed_precision")
    return datasets.training_fingerprint(cfg, train_paths, keys, train_windows=train_windows)


# A latent dimension is "informative" when V's posterior differs from the prior by more than this
# on average (KL in nats, on the training series). With the free-bits floor V puts its
# information in a few dimensions; on the others mu is nearly constant while the posterior is
# nearly the prior, which hands a baseline fitted on mu an easy win that says nothing about M.
INFORMATIVE_KL = 0.5


def baselines(train_paths, eval_paths, seed: int) -> dict:
    """``models.mdn_rnn.baseline_nlls`` on ``eval_paths`` for z = mu and for sampled z, and a reward baseline.

    ``{"mu": {"persistence", "unconditional"}, "sampled": {...}, "mu_per_dimension": {...},
    "sampled_per_dimension": {...}, "kl_per_dimension", "reward_mse_of_train_mean",
    "fitted_on_episodes"}``. Sampled z use the noise of ``sequences.latent_noise(seed, name)``,
    the same draws as ``sequences.evaluate_model(..., sample_seed=seed)``. Fitted on at most
    BASELINE_EPISODES training episodes; the evaluated episodes are scored in chunks whose
    means are weighted by their number of transitions (exactly the mean over all of them).
    ``kl_per_dimension`` is V's mean KL per latent dimension on the fitted training episodes.
    """
    from models.mdn_rnn import baseline_nlls
    from models.vae import kl_per_dimension

    keys = ("mu", "logvar", "reward")
    picks = np.unique(np.linspace(0, len(train_paths) - 1, min(BASELINE_EPISODES, len(train_paths))).astype(int))
    fit_paths = [train_paths[i] for i in picks]
    fit = [storage.load_episode(p, "series", keys=keys) for p in fit_paths]
    train_z = {"mu": [f["mu"] for f in fit],
               "sampled": [sequences.sampled_latents(f, seed, p.name) for f, p in zip(fit, fit_paths)]}
    kl = kl_per_dimension(np.concatenate([f["mu"] for f in fit]), np.concatenate([f["logvar"] for f in fit]))
    reward_mean = float(np.mean(np.concatenate([f["reward"] for f in fit])))
    totals = {kind: {"persistence": 0.0, "unconditional": 0.0} for kind in train_z}
    transitions, reward_error, steps = 0, 0.0, 0
    for start in range(0, len(eval_paths), BASELINE_EPISODES):
        chunk_paths = eval_paths[start:start + BASELINE_EPISODES]
        chunk = [storage.load_episode(p, "series", keys=keys) for p in chunk_paths]
        reward = np.concatenate([c["reward"] for c in chunk]).astype(np.float64)
        reward_error += float(np.sum(np.square(reward - reward_mean)))
        steps += len(reward)
        count = sum(len(c["mu"]) - 1 for c in chunk)
        if not count:
            continue
        eval_z = {"mu": [c["mu"] for c in chunk],
                  "sampled": [sequences.sampled_latents(c, seed, p.name) for c, p in zip(chunk, chunk_paths)]}
        for kind in totals:
            for name, value in baseline_nlls(train_z[kind], eval_z[kind], per_dimension=True).items():
                totals[kind][name] = totals[kind][name] + value * count
        transitions += count
    per_dimension = {kind: {name: total / transitions for name, total in values.items()}
                     for kind, values in totals.items()}
    return {
        **{kind: {name: float(np.mean(v)) for name, v in values.items()} for kind, values in per_dimension.items()},
        **{f"{kind}_per_dimension": {name: [float(x) for x in v] for name, v in values.items()}
           for kind, values in per_dimension.items()},
        "kl_per_dimension": [float(x) for x in kl],
        "fitted_on_episodes": len(fit_paths),
        "reward_mse_of_train_mean": reward_error / steps,
    }


def informative_comparison(z_nll_per_dimension, base: dict) -> dict:
    """M and the z = mu baselines on the informative latent dimensions only (see INFORMATIVE_KL)."""
    dims = [i for i, k in enumerate(base["kl_per_dimension"]) if k > INFORMATIVE_KL]
    if not dims:
        return {"informative_dimensions": [], "z_nll_informative": None, "baselines_informative": None,
                "beats_baselines_informative": None}
    ours = float(np.mean([z_nll_per_dimension[i] for i in dims]))
    theirs = {name: float(np.mean([values[i] for i in dims])) for name, values in base["mu_per_dimension"].items()}
    return {"informative_dimensions": dims, "z_nll_informative": ours, "baselines_informative": theirs,
            "beats_baselines_informative": bool(ours < min(theirs.values()))}


def _number(value, width=10) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.4f}"


def results_table(metrics: dict) -> str:
    """A few lines comparing M with its baselines (printed at the end, and again by a no-op rerun)."""
    base = metrics["baselines"]
    rows = [f"M on {metrics['evaluated_on']} episodes ({metrics['evaluated_episodes']} episodes, "
            f"{metrics['evaluated_transitions']} transitions) after {metrics['steps']} steps:",
            f"  {'metric':<30}{'M':>10}   baselines"]
    for label, key, kind in (("z NLL, z = mu (nats/dim/step)", "z_nll", "mu"),
                             ("z NLL, z ~ V's posterior", "z_nll_sampled", "sampled")):
        rows.append(f"  {label:<30}{_number(metrics[key])}   persistence {base[kind]['persistence']:.4f}, "
                    f"unconditional {base[kind]['unconditional']:.4f}")
    if metrics.get("z_nll_informative") is not None:
        label = f"z = mu, {len(metrics['informative_dimensions'])} informative dims"
        informative = metrics["baselines_informative"]
        rows.append(f"  {label:<30}{_number(metrics['z_nll_informative'])}   persistence "
                    f"{informative['persistence']:.4f}, unconditional {informative['unconditional']:.4f}")
    if "reward_mse" in metrics:
        rows.append(f"  {'reward MSE':<30}{_number(metrics['reward_mse'])}   "
                    f"train mean {base['reward_mse_of_train_mean']:.4f}")
    if "done_accuracy" in metrics:
        rows.append(f"  {'done accuracy':<30}{_number(metrics['done_accuracy'])}   "
                    f"always 'not done' {1.0 - metrics['done_positives'] / metrics['evaluated_steps']:.4f}")
        rows.append(f"  {'done AUC':<30}{_number(metrics['done_auc'])}   "
                    f"{metrics.get('done_auc_note') or 'chance 0.5000'}")
    informative = metrics.get("beats_baselines_informative")
    rows.append(f"  beats both z baselines: {'yes' if metrics['beats_baselines'] else 'no'} (z = mu), "
                f"{'yes' if metrics['beats_baselines_sampled'] else 'no'} (sampled z)"
                + ("" if informative is None else f", {'yes' if informative else 'no'} (z = mu, informative dims)"))
    return "\n".join(rows)


def train_and_evaluate(cfg, args, out, train_paths, eval_paths, evaluated_on, plan, windows, prints) -> dict:
    """Train M (resuming if a checkpoint exists), save it, and return the metrics of metrics.json."""
    import keras

    from worldmodels import training
    from worldmodels.devices import describe_devices

    steps_per_epoch, epochs = plan
    train_windows, heldout_windows = windows
    total_steps = steps_per_epoch * epochs
    training.remove_stale_model_temporaries(out)
    print(f"[04] {describe_devices()}")
    if cfg.rnn.mixed_precision:
        # The LSTM computes in float16; the MDN, reward and done heads (and so the NLL) stay
        # float32, and Keras wraps Adam in a LossScaleOptimizer.
        keras.mixed_precision.set_global_policy("mixed_float16")
    print(f"[04] dtype policy {keras.mixed_precision.global_policy().name}")
    # The global seed fixes the initial weights and, with rnn.seed, the tf.data shuffles: every
    # session of a run must see the same batches for the resume to be exact.
    keras.utils.set_random_seed(cfg.rnn.seed)
    model = build_model(cfg, total_steps)
    length, batch_size = cfg.rnn.sequence_length, cfg.rnn.batch_size
    writers = training.summary_writers(out)

    heldout_batches = math.ceil(heldout_windows / batch_size)

    def on_epoch_end(epoch: int, logs: dict) -> dict:
        extra = {}
        if evaluated_on == "heldout":
            heldout = sequences.sequence_dataset(eval_paths, length, batch_size, shuffle=False)
            # steps= is not optional: on a dataset of unknown length, evaluate() runs one more
            # step that fails at the end of the data after the metrics' counts were incremented,
            # which biases every mean low (by 1 / (batches + 1)).
            logs_heldout = model.evaluate(heldout, steps=heldout_batches, verbose=0, return_dict=True)
            extra = {f"heldout_{k}": v for k, v in logs_heldout.items()}
        training.log_epoch(writers, (epoch + 1) * steps_per_epoch, logs, extra,
                           extra_train={"learning_rate": float(model.optimizer.learning_rate)})
        return extra

    with datasets.surface_corrupt_files():
        state = training.train(
            model,
            lambda epoch: sequences.sequence_dataset(train_paths, length, batch_size, seed=cfg.rnn.seed, epoch=epoch,
                                                     repeat=True, drop_remainder=True),
            steps_per_epoch,
            epochs,
            out / "checkpoint",
            on_epoch_end=on_epoch_end,
            checkpoint_every_steps=args.checkpoint_every,
            fingerprint=prints,
            samples_per_step=batch_size,
            desc="M",
            log=lambda message: print(f"[04] {message}", flush=True),
        )
        training.atomic_save_model(model, artifacts.rnn_path(args.data_dir))
    return evaluate(cfg, model, state, train_paths, eval_paths, evaluated_on, plan, train_windows, prints)


def evaluate(cfg, model, state, train_paths, eval_paths, evaluated_on, plan, train_windows, prints) -> dict:
    """The metrics of metrics.json for a trained M: held-out NLL, reward and done, and the baselines."""
    steps_per_epoch, epochs = plan
    total_steps = steps_per_epoch * epochs
    length, batch_size = cfg.rnn.sequence_length, cfg.rnn.batch_size
    print(f"[04] evaluating M on every window of {len(eval_paths)} {evaluated_on} episode(s); "
          "fitting the baselines")
    with datasets.surface_corrupt_files():
        evaluation = sequences.evaluate_model(model, eval_paths, length, batch_size)
        sampled = sequences.evaluate_model(model, eval_paths, length, batch_size, sample_seed=cfg.rnn.seed)
    base = baselines(train_paths, eval_paths, cfg.rnn.seed)
    last = state["history"][-1]
    metrics = {
        "steps": state["iterations"],
        "config_steps": cfg.rnn.steps,
        "epochs": state["epoch"],
        "steps_per_epoch": steps_per_epoch,
        "learning_rate_schedule": f"cosine decay from {cfg.rnn.learning_rate} to {cfg.rnn.min_learning_rate} "
                                  f"over {total_steps} steps",
        "train_episodes": len(train_paths),
        "train_windows": train_windows,
        "evaluated_on": evaluated_on,
        "evaluated_episodes": len(eval_paths),
        "evaluated_transitions": evaluation["transitions"],
        "evaluated_steps": evaluation["steps"],
        "train_loss": last["loss"],
        "heldout_loss": last.get("heldout_loss"),
        "z_nll": evaluation["z_nll"],
        "z_nll_per_dimension": evaluation["z_nll_per_dimension"],
        "z_nll_sampled": sampled["z_nll"],
        "z_nll_sampled_per_dimension": sampled["z_nll_per_dimension"],
        "baselines": base,
        "beats_baselines": bool(evaluation["z_nll"] < min(base["mu"].values())),
        "beats_baselines_sampled": bool(sampled["z_nll"] < min(base["sampled"].values())),
        **informative_comparison(evaluation["z_nll_per_dimension"], base),
        "fingerprint": prints,
    }
    for key in ("reward_mse", "done_accuracy", "done_auc", "done_positives"):
        if key in evaluation:
            metrics[key] = evaluation[key]
    if cfg.rnn.done_head and evaluation["done_auc"] is None:
        metrics["done_auc_note"] = ("undefined: the evaluated steps hold no positive done label"
                                    if evaluation["done_positives"] == 0 else
                                    "undefined: every evaluated step is a positive done label")
    return metrics


def reevaluate(cfg, args, train_paths, heldout_paths, plan, train_windows, prints) -> dict:
    """metrics.json recomputed from the saved M and its training state (after a change of the metrics)."""
    from worldmodels import training

    state = training.load_state(args.data_dir / artifacts.RNN[0] / "checkpoint")
    if state is None:
        raise storage.MissingDataError("M's training state is missing, so it cannot be re-evaluated; "
                                       f"delete {args.data_dir / artifacts.RNN[0]} and train it again")
    model = artifacts.load_rnn(args.data_dir, cfg)
    evaluated_on = "heldout" if heldout_paths else "train"
    return evaluate(cfg, model, state, train_paths, heldout_paths or train_paths, evaluated_on, plan,
                    train_windows, prints)


def compare_with_vision_split(cfg: config.Config, data_dir, heldout_paths) -> None:
    """Say so when M's held-out episodes are not V's (then V has trained on some of them)."""
    recorded = artifacts.vision_dir(data_dir, cfg) / "split.json"
    if not recorded.is_file():
        print(f"[04] note: {recorded} is missing, so M's held-out set cannot be compared with V's")
        return
    vision_heldout = set(storage.read_json(recorded).get("heldout", []))
    seen_by_v = sorted(p.name for p in heldout_paths if p.name not in vision_heldout)
    if seen_by_v:
        print(f"[04] note: {len(seen_by_v)} of M's {len(heldout_paths)} held-out episodes were in V's training set "
              f"(rnn.heldout_fraction={cfg.rnn.heldout_fraction}, vae.heldout_fraction={cfg.vae.heldout_fraction}); "
              "M's held-out metrics then include frames V has seen")


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                        help="also checkpoint every STEPS batches (default: every 60 s and at every epoch end)")
    parser.add_argument("--reevaluate", action="store_true",
                        help="recompute metrics.json of a finished M from rnn.keras (no training)")
    cfg, args = config.parse_args(__doc__, argv, parser)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error("--checkpoint-every must be a positive number of steps")
    check_learning_rates(cfg)
    series_dir = args.data_dir / artifacts.SERIES
    out = args.data_dir / artifacts.RNN[0]
    model_path = artifacts.rnn_path(args.data_dir)

    paths = storage.list_episodes(series_dir, "series", hint=SERIES_HINT)
    if not (series_dir / "config.json").is_file():
        raise storage.MissingDataError(f"{series_dir / 'config.json'} is missing, so the V that made the series is "
                                       f"unknown. {SERIES_HINT}")
    config.check_compatible(config.load_config(series_dir / "config.json"), cfg, artifacts.VISION_KEYS,
                            str(series_dir))
    if (out / "config.json").is_file():
        config.check_compatible(config.load_config(out / "config.json"), cfg, artifacts.RNN_KEYS, str(out))
    train_paths, heldout_paths = split(cfg, paths)
    # Every file is checked (headers only) before training, so a bad one stops the run now, not hours later.
    lengths = dict(zip(paths, sequences.check_series(paths, cfg.vae.z_size)))
    train_windows = sequences.count_windows([lengths[p] for p in train_paths], cfg.rnn.sequence_length)
    plan = sequences.plan_epochs(cfg.rnn.steps, train_windows, cfg.rnn.batch_size)
    prints = fingerprint(cfg, train_paths, train_windows)

    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and model_path.is_file():
        done = storage.read_json(metrics_path)
        if done.get("steps", 0) >= plan[0] * plan[1] and args.reevaluate:
            metrics = reevaluate(cfg, args, train_paths, heldout_paths, plan, train_windows, prints)
            storage.atomic_write_json(metrics_path, metrics)
            print(results_table(metrics))
            return 0
        if done.get("steps", 0) >= plan[0] * plan[1]:
            if done.get("fingerprint") != prints:
                print(f"[04] note: M in {out} was trained on other series or settings than the current ones; "
                      f"delete {out} to train it again")
            print(f"[04] M is already trained ({done['steps']} steps, {model_path}); nothing to do")
            print(results_table(done))
            return 0

    evaluated_on = "heldout" if heldout_paths else "train"
    eval_paths = heldout_paths or train_paths
    print(f"[04] {len(paths)} series in {series_dir}: {len(train_paths)} episodes for training "
          f"({train_windows} windows of {cfg.rnn.sequence_length} transitions), {len(heldout_paths)} held out; "
          f"{plan[1]} epoch(s) of {plan[0]} steps of {cfg.rnn.batch_size} windows")
    if heldout_paths:
        compare_with_vision_split(cfg, args.data_dir, heldout_paths)
    out.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, out)
    datasets.save_split(out, cfg.rnn.heldout_fraction, cfg.vae.split_seed, train_paths, heldout_paths)

    start = time.perf_counter()
    eval_windows = sequences.count_windows([lengths[p] for p in eval_paths], cfg.rnn.sequence_length)
    metrics = train_and_evaluate(cfg, args, out, train_paths, eval_paths, evaluated_on, plan,
                                 (train_windows, eval_windows), prints)
    # metrics.json is written last: its presence (with enough steps) is what marks the stage complete.
    storage.atomic_write_json(metrics_path, metrics)
    print(f"[04] done in {time.perf_counter() - start:.0f} s -> {out}")
    print(results_table(metrics))
    return 0


if __name__ == "__main__":
    cli.run(main)
