"""Stage 2 as a library: train V (the paper's VAE or the VAE-GAN) on the rollouts, resumably.

:func:`train_vision` is what ``02_train_vae.py`` runs. It trains V on the frames in
``<data>/rollouts/`` and writes ``<data>/vae/`` (``<data>/vae_gan/`` for the VAE-GAN, with files
named ``vae_gan.*``): ``vae.keras`` and ``vae.weights.h5`` (the trained V), ``config.json``,
``split.json`` (train / held-out episodes), ``metrics.json`` (on every held-out frame,
``worldmodels.metrics.vision_metrics``), ``logs/`` (TensorBoard: losses and held-out
reconstructions per epoch) and ``checkpoint/``.

Frames stream from disk (``worldmodels.datasets``), so memory does not grow with the number of
rollouts. Episodes are split into training and held-out sets by file name, so the split never
changes when rollouts are added, and M (stage 4) reuses it.

A checkpoint (weights, Adam state, RNG state, position in the epoch) is written every minute
(or every ``checkpoint_every`` steps) and at the end of every epoch (``worldmodels.training``):
after Ctrl-C, SIGKILL or a lost machine, the same call continues from it. A finished run
reruns as a no-op; a larger ``vae.epochs`` continues it.

TensorFlow, Keras and the model are imported in :func:`_train_and_evaluate`, after the checks:
a finished run or a missing folder is then reported at once, not after a 5-second import.
"""

from __future__ import annotations

import time

import numpy as np

import config
from worldmodels import artifacts, datasets, metrics, stage, storage

log = stage.tagged("02")


def build_model(cfg: config.Config):
    """A compiled V of the kind ``vae.model`` names: the paper's ConvVAE or the VAE-GAN (same encoder/decoder)."""
    import keras

    if cfg.vae.model == "vae_gan":
        from vae_gan.model import build_vae_gan

        margin = cfg.vae_gan.equilibrium_margin or None
        return build_vae_gan(cfg.vae, cfg.vae_gan, pixel_weight=cfg.vae_gan.pixel_weight, equilibrium_margin=margin)
    from models.vae import ConvVAE

    model = ConvVAE(z_size=cfg.vae.z_size, kl_tolerance=cfg.vae.kl_tolerance, seed=cfg.vae.seed)
    model.compile(optimizer=keras.optimizers.Adam(cfg.vae.learning_rate))
    return model


def epochs_of(cfg: config.Config) -> int:
    """The number of epochs of the V that ``vae.model`` names (the VAE-GAN has its own)."""
    return cfg.vae_gan.epochs if cfg.vae.model == "vae_gan" else cfg.vae.epochs


def fingerprint(cfg: config.Config, train_paths, train_frames: int) -> dict:
    """What fixes V's batches and updates (see ``datasets.training_fingerprint``)."""
    keys = ["vae.batch_size", "vae.learning_rate", "vae.seed", "vae.split_seed", "vae.heldout_fraction", "vae.shuffle_buffer",
            "vae.episodes_in_flight", "vae.mixed_precision"]
    if cfg.vae.model == "vae_gan":
        # The VAE-GAN's own settings fix its updates too.
        keys += [f"vae_gan.{name}" for name in config.to_dict(cfg)["vae_gan"]]
    return datasets.training_fingerprint(cfg, train_paths, keys, train_frames=train_frames)


def image_grid(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Originals (uint8) on the top row, reconstructions (float [0, 1]) below -> float32 (1, 128, N * 64, 3)."""
    top = np.concatenate(list(originals.astype(np.float32) / 255.0), axis=1)
    bottom = np.concatenate(list(reconstructions.astype(np.float32)), axis=1)
    return np.concatenate([top, bottom], axis=0)[None]


def train_vision(cfg: config.Config, data_dir, *, checkpoint_every: int | None = None) -> dict:
    """Train V from ``<data_dir>/rollouts`` (resuming if a checkpoint exists); return its ``metrics.json``.

    A finished run (``metrics.json`` with at least ``epochs_of(cfg)`` epochs) returns its
    metrics without training. Raises ``storage.MissingDataError`` without rollouts and
    ``config.ConfigError`` for rollouts or a V folder made with an incompatible config.
    """
    rollouts = artifacts.rollouts_dir(data_dir)
    out = artifacts.vision_dir(data_dir, cfg)
    model_path = artifacts.vision_path(data_dir, cfg)

    paths = storage.list_episodes(rollouts, artifacts.ROLLOUTS, hint=f"Run {artifacts.MAKERS[artifacts.ROLLOUTS]} first.")
    stage.check_saved_config(rollouts, cfg, artifacts.ROLLOUT_KEYS, log=log)
    stage.check_saved_config(out, cfg, artifacts.VAE_KEYS)
    train_paths, heldout_paths = datasets.split_episodes(paths, cfg.vae.heldout_fraction, cfg.vae.split_seed)
    # Every file is checked (headers only) before training, so a bad one stops the run now, not hours later.
    lengths = dict(zip(paths, datasets.check_episodes(paths)))
    prints = fingerprint(cfg, train_paths, sum(lengths[p] for p in train_paths))

    done = stage.finished_metrics(out, (model_path, artifacts.weights_path(model_path)), "epochs", epochs_of(cfg),
                                  prints, "V", log)
    if done is not None:
        log(f"V is already trained ({done['epochs']} epochs, {model_path}); nothing to do")
        return done

    log(f"{len(paths)} episodes in {rollouts}: {len(train_paths)} for training "
        f"({prints['train_frames']} frames), {len(heldout_paths)} held out "
        f"({sum(lengths[p] for p in heldout_paths)} frames)")
    stage.prepare_output(out, cfg, cfg.vae.heldout_fraction, train_paths, heldout_paths)

    start = time.perf_counter()
    result = _train_and_evaluate(cfg, data_dir, out, (train_paths, heldout_paths), lengths, prints, checkpoint_every)
    # metrics.json is written last: its presence (with enough epochs) is what marks the stage complete.
    storage.atomic_write_json(out / artifacts.METRICS_FILE, result)
    log(f"done in {time.perf_counter() - start:.0f} s: MSE {result['reconstruction_mse']:.5f}, "
        f"PSNR {result['psnr_db']:.2f} dB, KL {result['kl_per_frame']:.2f} nats/frame, "
        f"{result['active_dimensions']}/{cfg.vae.z_size} active dimensions on {result['evaluated_on']} "
        f"frames -> {out}")
    return result


def _train_and_evaluate(cfg, data_dir, out, split, lengths, prints, checkpoint_every) -> dict:
    """Train V (resuming if a checkpoint exists), save it, and return the metrics of metrics.json."""
    import keras
    import tensorflow as tf

    from worldmodels import training
    from worldmodels.devices import describe_devices

    train_paths, heldout_paths = split
    training.remove_stale_model_temporaries(out)
    log(describe_devices())
    if cfg.vae.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(cfg.vae.seed)
    strategy = tf.distribute.MirroredStrategy() if cfg.vae.distribute else tf.distribute.get_strategy()
    log(f"{strategy.num_replicas_in_sync} replica(s), dtype policy {keras.mixed_precision.global_policy().name}")
    with strategy.scope():
        model = build_model(cfg)

    train_frames = sum(lengths[p] for p in train_paths)
    heldout_frames = sum(lengths[p] for p in heldout_paths)
    eval_paths = heldout_paths or train_paths
    grid_originals = metrics.grid_frames(eval_paths)
    writers = training.summary_writers(out)

    def on_epoch_end(epoch: int, logs: dict) -> dict:
        extra = {}
        if heldout_paths:
            heldout = datasets.frame_dataset(heldout_paths, cfg.vae.batch_size, shuffle=False)
            steps = datasets.steps_per_epoch(heldout_frames, cfg.vae.batch_size)
            extra = {f"heldout_{k}": v for k, v in
                     model.evaluate(heldout, steps=steps, verbose=0, return_dict=True).items()}
        with writers["heldout"].as_default(step=epoch + 1):
            tf.summary.image("originals_vs_reconstructions",
                             image_grid(grid_originals, model(grid_originals, training=False).numpy()))
        training.log_epoch(writers, epoch + 1, logs, extra)
        return extra

    state = stage.fit(
        model,
        lambda epoch: datasets.frame_dataset(train_paths, cfg.vae.batch_size, cfg.vae.shuffle_buffer,
                                             cfg.vae.episodes_in_flight, cfg.vae.seed, epoch),
        datasets.steps_per_epoch(train_frames, cfg.vae.batch_size), epochs_of(cfg), out,
        on_epoch_end=on_epoch_end, checkpoint_every=checkpoint_every, prints=prints,
        samples_per_step=cfg.vae.batch_size, desc="V", log=log)
    model_path = artifacts.vision_path(data_dir, cfg)
    training.atomic_save_model(model, artifacts.weights_path(model_path))
    training.atomic_save_model(model, model_path)
    log(f"evaluating V on every frame of {len(eval_paths)} {'held-out' if heldout_paths else 'training'} episode(s)")
    with datasets.surface_corrupt_files():
        evaluation = metrics.vision_metrics(model, eval_paths, cfg.vae.batch_size)
    last = state["history"][-1]
    return {
        "epochs": state["epoch"],
        "evaluated_on": "heldout" if heldout_paths else "train",
        "heldout_episodes": len(heldout_paths),
        "heldout_frames": heldout_frames,
        "train_episodes": len(train_paths),
        "train_frames": train_frames,
        # The VAE-GAN has one loss per player and no single "loss".
        "train_loss": last.get("loss", last.get("enc_loss")),
        "heldout_loss": last.get("heldout_loss", last.get("heldout_enc_loss")),
        **evaluation,
        "z_size": cfg.vae.z_size,
        "kl_tolerance": cfg.vae.kl_tolerance,
        "fingerprint": prints,
    }
