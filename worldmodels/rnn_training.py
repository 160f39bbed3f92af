"""Stage 4 as a library: train M (the MDN-RNN) on the latent series, resumably, and measure it.

:func:`train_rnn` is what ``04_train_rnn.py`` runs. It trains M on ``<data>/series/`` and
writes ``<data>/rnn/``: ``rnn.keras`` (the trained M), ``config.json``, ``split.json``,
``metrics.json`` (on every held-out episode: NLL per z dimension, reward MSE, done accuracy
and AUC, and the two baselines of ``models.mdn_rnn.baseline_nlls`` measured in the same run,
see ``worldmodels.metrics``; with ``rnn.action_head`` also the next action's MSE against the
baselines a_{t+1} = a_t and the training episodes' mean action), ``logs/`` (TensorBoard) and ``checkpoint/``.

Sequence windows of ``rnn.sequence_length`` transitions stream from disk
(``worldmodels.sequences``), so memory does not grow with the number of episodes. M is
validated on the episodes V never trained on: the split is ``datasets.split_episodes`` with
V's split seed (``vae.split_seed``, as stage 2 uses) and ``rnn.heldout_fraction`` (the same
fraction as V's by default, which gives exactly V's held-out set).

Training runs ``rnn.steps`` Adam updates (batches of ``rnn.batch_size`` windows, z re-sampled
from (mu, logvar) every batch) with the learning rate on a cosine decay from
``rnn.learning_rate`` to ``rnn.min_learning_rate`` over the run, and gradients clipped to a
global norm of ``rnn.grad_clip``. The steps are grouped into "epochs" of about one pass over
the training windows (``sequences.plan_epochs``), each followed by a held-out evaluation and
a checkpoint. A checkpoint is also written every minute (or every ``checkpoint_every``
steps): after Ctrl-C, SIGKILL or a lost machine, the same call continues exactly where it
stopped. A finished run reruns as a no-op and prints its results again. A checkpoint made
with other training settings (``rnn.steps`` included: the learning-rate schedule depends on
it) or other training episodes is refused; delete ``rnn/`` to train again.

The z NLL is measured twice, each time with baselines fitted to the same kind of z: with z = mu
(``MDNRNN.test_step``; ``beats_baselines``) and with z drawn from V's posterior, the z M is
trained on (``*_sampled``). They can disagree: a latent dimension V does not use has mu ~ 0 and
sigma ~ 1, so M rightly learns to predict N(0, 1) for it, while a baseline fitted on mu predicts
a near-constant and scores far better on z = mu. With many unused dimensions only the sampled
comparison says whether M learned the dynamics.

TensorFlow, Keras and the model are imported in :func:`_train_and_evaluate`, after the checks:
a finished run or a missing folder is then reported at once, not after a 5-second import.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import config
from worldmodels import artifacts, datasets, metrics, sequences, stage, storage

log = stage.tagged("04")
SERIES_HINT = f"Encode the rollouts first with: python {artifacts.MAKERS[artifacts.SERIES]}"


@dataclass(frozen=True)
class RnnRun:
    """What one training run of M works on, found once by :func:`train_rnn`'s checks."""

    out: Path
    """The output folder, ``<data>/rnn``."""
    train_paths: list
    """Series files M trains on (V's training episodes)."""
    heldout_paths: list
    """Series files M is evaluated on (V's held-out episodes); empty: M is evaluated on the training ones."""
    lengths: dict
    """Frames of every series file, by path."""
    train_windows: int
    """Training windows of ``rnn.sequence_length`` transitions."""
    plan: tuple
    """``(steps_per_epoch, epochs)`` of ``sequences.plan_epochs``."""
    prints: dict
    """The training fingerprint (:func:`fingerprint`)."""

    @property
    def eval_paths(self) -> list:
        return self.heldout_paths or self.train_paths

    @property
    def evaluated_on(self) -> str:
        return "heldout" if self.heldout_paths else "train"

    @property
    def total_steps(self) -> int:
        return self.plan[0] * self.plan[1]


def split(cfg: config.Config, paths):
    """``(train, heldout)`` series files: V's split (its split seed), so M is validated on episodes V never saw."""
    return datasets.split_episodes(paths, cfg.rnn.heldout_fraction, cfg.vae.split_seed)


def model_arguments(cfg: config.Config) -> dict:
    """``MDNRNN``'s keyword arguments from the config (all but ``seed``): its network and loss weights.

    The action head's and scheduled sampling's arguments are given only when they are on, so an M
    without them is built exactly as before the options existed.
    """
    arguments = dict(z_size=cfg.vae.z_size, hidden_units=cfg.rnn.hidden_units, num_mixtures=cfg.rnn.num_mixtures,
                     reward_head=cfg.rnn.reward_head, done_head=cfg.rnn.done_head, dropout=cfg.rnn.dropout,
                     done_weight=cfg.rnn.done_weight)
    if cfg.rnn.action_head:
        arguments.update(action_head=True, action_weight=cfg.rnn.action_weight)
    if cfg.rnn.scheduled_sampling > 0:
        arguments.update(scheduled_sampling=cfg.rnn.scheduled_sampling)
    return arguments


def build_model(cfg: config.Config, total_steps: int):
    """A compiled MDNRNN from ``cfg.rnn``: Adam on a cosine-decayed learning rate, global-norm clipping."""
    import keras

    from models.mdn_rnn import MDNRNN

    model = MDNRNN(**model_arguments(cfg), seed=cfg.rnn.seed)
    # Cosine rather than exponential decay: it stays near the initial rate for longer and lands on
    # min_learning_rate exactly at the last step (alpha is the final fraction of the initial rate).
    schedule = keras.optimizers.schedules.CosineDecay(
        cfg.rnn.learning_rate, decay_steps=total_steps, alpha=cfg.rnn.min_learning_rate / cfg.rnn.learning_rate)
    clip = cfg.rnn.grad_clip if cfg.rnn.grad_clip > 0 else None
    model.compile(optimizer=keras.optimizers.Adam(schedule, global_clipnorm=clip))
    return model


def check_learning_rates(cfg: config.Config) -> None:
    """Refuse a learning-rate schedule that cannot decay from ``rnn.learning_rate`` to ``rnn.min_learning_rate``."""
    if not 0 < cfg.rnn.learning_rate or not 0 <= cfg.rnn.min_learning_rate <= cfg.rnn.learning_rate:
        raise config.ConfigError(
            f"need 0 <= rnn.min_learning_rate <= rnn.learning_rate and rnn.learning_rate > 0, got "
            f"{cfg.rnn.min_learning_rate} and {cfg.rnn.learning_rate}")


def fingerprint(cfg: config.Config, train_paths, train_windows: int) -> dict:
    """What fixes M's batches and updates (see ``datasets.training_fingerprint``).

    ``rnn.action_weight`` counts only with the action head (without it the weight changes nothing), and
    ``rnn.scheduled_sampling`` only when on, so the fingerprint of a run without them is the one it had
    before the options existed.
    """
    keys = ("vae.seed", "vae.split_seed", "rnn.heldout_fraction", "rnn.sequence_length", "rnn.batch_size", "rnn.learning_rate",
            "rnn.min_learning_rate", "rnn.grad_clip", "rnn.steps", "rnn.dropout", "rnn.done_weight", "rnn.seed",
            "rnn.mixed_precision") + (("rnn.action_weight",) if cfg.rnn.action_head else ()) + (
            ("rnn.scheduled_sampling",) if cfg.rnn.scheduled_sampling > 0 else ())
    return datasets.training_fingerprint(cfg, train_paths, keys, train_windows=train_windows)


def _number(value, width=10) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.4f}"


def results_table(result: dict) -> str:
    """A few lines comparing M with its baselines (printed at the end, and again by a no-op rerun)."""
    base = result["baselines"]
    rows = [f"M on {result['evaluated_on']} episodes ({result['evaluated_episodes']} episodes, "
            f"{result['evaluated_transitions']} transitions) after {result['steps']} steps:",
            f"  {'metric':<30}{'M':>10}   baselines"]
    for label, key, kind in (("z NLL, z = mu (nats/dim/step)", "z_nll", "mu"),
                             ("z NLL, z ~ V's posterior", "z_nll_sampled", "sampled")):
        rows.append(f"  {label:<30}{_number(result[key])}   persistence {base[kind]['persistence']:.4f}, "
                    f"unconditional {base[kind]['unconditional']:.4f}")
    if result.get("z_nll_informative") is not None:
        label = f"z = mu, {len(result['informative_dimensions'])} informative dims"
        informative = result["baselines_informative"]
        rows.append(f"  {label:<30}{_number(result['z_nll_informative'])}   persistence "
                    f"{informative['persistence']:.4f}, unconditional {informative['unconditional']:.4f}")
    if "reward_mse" in result:
        rows.append(f"  {'reward MSE':<30}{_number(result['reward_mse'])}   "
                    f"train mean {base['reward_mse_of_train_mean']:.4f}")
    if "done_accuracy" in result:
        rows.append(f"  {'done accuracy':<30}{_number(result['done_accuracy'])}   "
                    f"always 'not done' {1.0 - result['done_positives'] / result['evaluated_steps']:.4f}")
        rows.append(f"  {'done AUC':<30}{_number(result['done_auc'])}   "
                    f"{result.get('done_auc_note') or 'chance 0.5000'}")
    if "action_mse" in result:
        rows.append(f"  {'next action MSE (per comp.)':<30}{_number(result['action_mse'])}   "
                    f"a_t+1 = a_t {result['action_mse_persistence']:.4f}, "
                    f"train mean {result['action_mse_train_mean']:.4f}")
    informative = result.get("beats_baselines_informative")
    rows.append(f"  beats both z baselines: {'yes' if result['beats_baselines'] else 'no'} (z = mu), "
                f"{'yes' if result['beats_baselines_sampled'] else 'no'} (sampled z)"
                + ("" if informative is None else f", {'yes' if informative else 'no'} (z = mu, informative dims)"))
    return "\n".join(rows)


def prepare_run(cfg: config.Config, data_dir, series_dirs=None, out=None) -> RnnRun:
    """Check the series and any earlier ``rnn/`` against ``cfg``, split and count them: the :class:`RnnRun`.

    ``series_dirs`` (default ``[<data>/series]``) are the folders M trains on, ``out`` (default
    ``<data>/rnn``) where it goes; the iterations of ``worldmodels.iterate`` give their own.
    """
    check_learning_rates(cfg)
    series_dirs = [artifacts.series_dir(data_dir)] if series_dirs is None else [Path(d) for d in series_dirs]
    out = artifacts.rnn_dir(data_dir) if out is None else Path(out)
    paths = []
    for series_dir in series_dirs:
        paths += storage.list_episodes(series_dir, artifacts.SERIES, hint=SERIES_HINT)
        stage.check_saved_config(series_dir, cfg, artifacts.VISION_KEYS, required_hint=SERIES_HINT)
    stage.check_saved_config(out, cfg, artifacts.RNN_KEYS)
    train_paths, heldout_paths = split(cfg, paths)
    # Every file is checked (headers only) before training, so a bad one stops the run now, not hours later.
    lengths = dict(zip(paths, sequences.check_series(paths, cfg.vae.z_size)))
    train_windows = sequences.count_windows([lengths[p] for p in train_paths], cfg.rnn.sequence_length)
    plan = sequences.plan_epochs(cfg.rnn.steps, train_windows, cfg.rnn.batch_size)
    return RnnRun(out, train_paths, heldout_paths, lengths, train_windows, plan,
                  fingerprint(cfg, train_paths, train_windows))


def train_rnn(cfg: config.Config, data_dir, *, checkpoint_every: int | None = None,
              reevaluate: bool = False, series_dirs=None, out=None, init_path=None) -> dict:
    """Train M from ``<data_dir>/series`` (resuming if a checkpoint exists); return its ``metrics.json``.

    A finished run returns its metrics without training; with ``reevaluate`` it recomputes them
    from the saved M first (after a change of the metrics). Raises ``storage.MissingDataError``
    without series and ``config.ConfigError`` for series or an ``rnn/`` made with an incompatible config.
    ``series_dirs`` and ``out`` are :func:`prepare_run`'s; ``init_path``, an ``rnn.keras`` whose
    weights a new run starts from (a fine-tune; a resumed run starts from its checkpoint).
    """
    run = prepare_run(cfg, data_dir, series_dirs, out)
    model_path = run.out / artifacts.RNN[1]
    done = stage.finished_metrics(run.out, (model_path,), "steps", run.total_steps, run.prints, "M", log)
    if done is not None and reevaluate:
        done = _reevaluate(cfg, run)
        storage.atomic_write_json(run.out / artifacts.METRICS_FILE, done)
    elif done is not None:
        log(f"M is already trained ({done['steps']} steps, {model_path}); nothing to do")
    if done is not None:
        print(results_table(done))
        return done

    where = artifacts.series_dir(data_dir) if series_dirs is None else f"{len(series_dirs)} folders"
    log(f"{len(run.lengths)} series in {where}: {len(run.train_paths)} episodes for training "
        f"({run.train_windows} windows of {cfg.rnn.sequence_length} transitions), {len(run.heldout_paths)} held out; "
        f"{run.plan[1]} epoch(s) of {run.plan[0]} steps of {cfg.rnn.batch_size} windows")
    if run.heldout_paths and series_dirs is None:  # other folders' episodes are in neither of V's sets
        compare_with_vision_split(cfg, data_dir, run.heldout_paths)
    stage.prepare_output(run.out, cfg, cfg.rnn.heldout_fraction, run.train_paths, run.heldout_paths)

    start = time.perf_counter()
    result = _train_and_evaluate(cfg, run, checkpoint_every, init_path)
    # metrics.json is written last: its presence (with enough steps) is what marks the stage complete.
    storage.atomic_write_json(run.out / artifacts.METRICS_FILE, result)
    log(f"done in {time.perf_counter() - start:.0f} s -> {run.out}")
    print(results_table(result))
    return result


def _train_and_evaluate(cfg: config.Config, run: RnnRun, checkpoint_every, init_path=None) -> dict:
    """Train M (resuming if a checkpoint exists; else from ``init_path``'s weights if given), save it,
    and return the metrics of metrics.json."""
    import keras

    from worldmodels import training
    from worldmodels.devices import describe_devices

    steps_per_epoch, epochs = run.plan
    training.remove_stale_model_temporaries(run.out)
    log(describe_devices())
    if cfg.rnn.mixed_precision:
        # The LSTM computes in float16; the MDN, reward and done heads (and so the NLL) stay
        # float32, and Keras wraps Adam in a LossScaleOptimizer.
        keras.mixed_precision.set_global_policy("mixed_float16")
    log(f"dtype policy {keras.mixed_precision.global_policy().name}")
    # The global seed fixes the initial weights and, with rnn.seed, the tf.data shuffles: every
    # session of a run must see the same batches for the resume to be exact.
    keras.utils.set_random_seed(cfg.rnn.seed)
    model = build_model(cfg, run.total_steps)
    if init_path is not None:
        import models.mdn_rnn  # noqa: F401  (registers MDNRNN for deserialisation)

        model.set_weights(keras.models.load_model(init_path, compile=False).get_weights())
    length, batch_size = cfg.rnn.sequence_length, cfg.rnn.batch_size
    writers = training.summary_writers(run.out)
    eval_windows = sequences.count_windows([run.lengths[p] for p in run.eval_paths], length)
    heldout_batches = math.ceil(eval_windows / batch_size)

    def on_epoch_end(epoch: int, logs: dict) -> dict:
        extra = {}
        if run.heldout_paths:
            heldout = sequences.sequence_dataset(run.eval_paths, length, batch_size, shuffle=False)
            # steps= is not optional: on a dataset of unknown length, evaluate() runs one more
            # step that fails at the end of the data after the metrics' counts were incremented,
            # which biases every mean low (by 1 / (batches + 1)).
            logs_heldout = model.evaluate(heldout, steps=heldout_batches, verbose=0, return_dict=True)
            extra = {f"heldout_{k}": v for k, v in logs_heldout.items()}
        training.log_epoch(writers, (epoch + 1) * steps_per_epoch, logs, extra,
                           extra_train={"learning_rate": float(model.optimizer.learning_rate)})
        return extra

    state = stage.fit(
        model,
        lambda epoch: sequences.sequence_dataset(run.train_paths, length, batch_size, seed=cfg.rnn.seed, epoch=epoch,
                                                 repeat=True, drop_remainder=True),
        steps_per_epoch, epochs, run.out,
        on_epoch_end=on_epoch_end, checkpoint_every=checkpoint_every, prints=run.prints,
        samples_per_step=batch_size, desc="M", log=log)
    training.atomic_save_model(model, run.out / artifacts.RNN[1])
    return evaluate(cfg, model, state, run)


def evaluate(cfg: config.Config, model, state: dict, run: RnnRun) -> dict:
    """The metrics of metrics.json for a trained M: held-out NLL, reward and done, and the baselines."""
    length, batch_size = cfg.rnn.sequence_length, cfg.rnn.batch_size
    log(f"evaluating M on every window of {len(run.eval_paths)} {run.evaluated_on} episode(s); fitting the baselines")
    action_mean = metrics.train_action_mean(run.train_paths) if cfg.rnn.action_head else None
    with datasets.surface_corrupt_files():
        evaluation = sequences.evaluate_model(model, run.eval_paths, length, batch_size, action_mean=action_mean)
        sampled = sequences.evaluate_model(model, run.eval_paths, length, batch_size, sample_seed=cfg.rnn.seed)
    base = metrics.rnn_baselines(run.train_paths, run.eval_paths, cfg.rnn.seed)
    last = state["history"][-1]
    result = {
        "steps": state["iterations"],
        "config_steps": cfg.rnn.steps,
        "epochs": state["epoch"],
        "steps_per_epoch": run.plan[0],
        "learning_rate_schedule": f"cosine decay from {cfg.rnn.learning_rate} to {cfg.rnn.min_learning_rate} "
                                  f"over {run.total_steps} steps",
        "train_episodes": len(run.train_paths),
        "train_windows": run.train_windows,
        "evaluated_on": run.evaluated_on,
        "evaluated_episodes": len(run.eval_paths),
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
        **metrics.informative_comparison(evaluation["z_nll_per_dimension"], base),
        "fingerprint": run.prints,
    }
    for key in ("reward_mse", "done_accuracy", "done_auc", "done_positives", "action_mse",
                "action_mse_per_component", "action_mse_persistence", "action_mse_train_mean"):
        if key in evaluation:
            result[key] = evaluation[key]
    if cfg.rnn.action_head:
        result["beats_action_baselines"] = bool(
            evaluation["action_mse"] < min(evaluation["action_mse_persistence"], evaluation["action_mse_train_mean"]))
    if cfg.rnn.done_head and evaluation["done_auc"] is None:
        result["done_auc_note"] = ("undefined: the evaluated steps hold no positive done label"
                                   if evaluation["done_positives"] == 0 else
                                   "undefined: every evaluated step is a positive done label")
    return result


def _reevaluate(cfg: config.Config, run: RnnRun) -> dict:
    """metrics.json recomputed from the saved M and its training state (after a change of the metrics)."""
    from worldmodels import training

    state = training.load_state(run.out / "checkpoint")
    if state is None:
        raise storage.MissingDataError("M's training state is missing, so it cannot be re-evaluated; "
                                       f"delete {run.out} and train it again")
    # run.out is always a folder named rnn/ inside a data dir (or an iteration's folder, laid out alike).
    return evaluate(cfg, artifacts.load_rnn(run.out.parent, cfg), state, run)


def compare_with_vision_split(cfg: config.Config, data_dir, heldout_paths) -> None:
    """Say so when M's held-out episodes are not V's (then V has trained on some of them)."""
    recorded = artifacts.vision_dir(data_dir, cfg) / artifacts.SPLIT_FILE
    if not recorded.is_file():
        log(f"note: {recorded} is missing, so M's held-out set cannot be compared with V's")
        return
    vision_heldout = set(storage.read_json(recorded).get("heldout", []))
    seen_by_v = sorted(p.name for p in heldout_paths if p.name not in vision_heldout)
    if seen_by_v:
        log(f"note: {len(seen_by_v)} of M's {len(heldout_paths)} held-out episodes were in V's training set "
            f"(rnn.heldout_fraction={cfg.rnn.heldout_fraction}, vae.heldout_fraction={cfg.vae.heldout_fraction}); "
            "M's held-out metrics then include frames V has seen")
