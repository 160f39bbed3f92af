"""Stage 2: train V on the frames in ``<data-dir>/rollouts/`` -> ``<data-dir>/vae/`` (or ``vae_gan/``).

    python 02_train_vae.py --preset small
    python 02_train_vae.py --preset small --set vae.model=vae_gan    # the VAE-GAN as V -> vae_gan/
    python 02_train_vae.py --set vae.epochs=20 --set vae.batch_size=256 --set vae.mixed_precision=true
    python 02_train_vae.py --set vae.distribute=true          # all visible GPUs (MirroredStrategy)

Frames stream from disk (``worldmodels.datasets``), so memory does not grow with the number
of rollouts. Episodes are split into training and held-out sets by file name, so the split
never changes when rollouts are added, and M (stage 4) can reuse it.

A checkpoint (weights, Adam state, RNG state, position in the epoch) is written every minute
(or every ``--checkpoint-every`` steps) and at the end of every epoch: after Ctrl-C, SIGKILL
or a lost machine, rerun the same command to continue from it. A finished run reruns as a
no-op; a larger ``vae.epochs`` continues it.

Writes ``vae/`` (``vae_gan/`` for the VAE-GAN, with files named ``vae_gan.*``):
``vae.keras`` and ``vae.weights.h5`` (the trained V), ``config.json``,
``split.json`` (train / held-out episodes), ``metrics.json`` (on every held-out frame),
``logs/`` (TensorBoard: losses and held-out reconstructions per epoch), ``checkpoint/``.
"""

from __future__ import annotations

import time

import numpy as np

import config
from worldmodels import artifacts, cli, datasets, storage

# TensorFlow, Keras and the model are imported in train_and_evaluate(), after the checks:
# a finished run or a missing folder is then reported at once, not after a 5-second import.

# What defines a rollout folder (as in 01_generate_data.py): V is trained on the data this command describes.
ROLLOUT_KEYS = ("data.seed", "data.policy", "data.max_steps")
# What defines V for the stages that consume it: a vae/ folder made with other values is not continued.
VAE_KEYS = ("vae.model", "vae.z_size", "vae.kl_tolerance")
GRID_FRAMES = 8


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


def grid_frames(paths) -> np.ndarray:
    """GRID_FRAMES frames spread over the first episode of ``paths``, uint8 (N, 64, 64, 3)."""
    obs = storage.load_episode(paths[0], keys=("obs",))["obs"]
    return obs[np.linspace(0, len(obs) - 1, min(GRID_FRAMES, len(obs))).astype(int)]


def evaluate_frames(model, paths, batch_size: int) -> dict:
    """V's metrics on every frame of ``paths``, streamed in batches (memory: a batch, plus mu (N, Z) of all frames).

    Returns reconstruction MSE and PSNR of the posterior-mean reconstructions, the KL per frame
    and per dimension (nats), and the number of active dimensions (models.vae helpers).
    """
    from models import vae as vae_lib

    frames, mse, psnr, kl_dims, mus = 0, 0.0, 0.0, 0.0, []
    for batch in datasets.frame_dataset(paths, batch_size, shuffle=False):
        batch = batch.numpy()
        mu, logvar = model.encoder(vae_lib.to_float_frames(batch), training=False)
        reconstruction = model.decoder(mu, training=False).numpy()
        mu, logvar = mu.numpy(), logvar.numpy()
        n = len(batch)
        pixel = vae_lib.reconstruction_metrics(batch, reconstruction)
        # Both helpers average over frames, so frame-weighted means of the batches are exact.
        mse += pixel["mse"] * n
        psnr += pixel["psnr"] * n
        kl_dims = kl_dims + vae_lib.kl_per_dimension(mu, logvar) * n
        mus.append(mu)
        frames += n
    kl_dims = kl_dims / frames
    return {
        "reconstruction_mse": mse / frames,
        "psnr_db": psnr / frames,
        "kl_per_frame": float(kl_dims.sum()),
        "kl_per_dimension": [float(k) for k in kl_dims],
        "active_dimensions": vae_lib.active_dimensions(np.concatenate(mus)),
    }


def weights_path(model_path):
    """``vae.keras`` -> ``vae.weights.h5`` beside it."""
    return model_path.with_name(model_path.name.replace(".keras", ".weights.h5"))


def train_and_evaluate(cfg, args, out, train_paths, heldout_paths, lengths, prints) -> dict:
    """Train V (resuming if a checkpoint exists), save it, and return the metrics of metrics.json."""
    import keras
    import tensorflow as tf

    from worldmodels import training
    from worldmodels.devices import describe_devices

    training.remove_stale_model_temporaries(out)
    print(f"[02] {describe_devices()}")
    if cfg.vae.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(cfg.vae.seed)
    strategy = tf.distribute.MirroredStrategy() if cfg.vae.distribute else tf.distribute.get_strategy()
    print(f"[02] {strategy.num_replicas_in_sync} replica(s), dtype policy {keras.mixed_precision.global_policy().name}")
    with strategy.scope():
        model = build_model(cfg)

    train_frames = sum(lengths[p] for p in train_paths)
    heldout_frames = sum(lengths[p] for p in heldout_paths)
    eval_paths = heldout_paths or train_paths
    grid_originals = grid_frames(eval_paths)
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

    with datasets.surface_corrupt_files():
        state = training.train(
            model,
            lambda epoch: datasets.frame_dataset(train_paths, cfg.vae.batch_size, cfg.vae.shuffle_buffer,
                                                 cfg.vae.episodes_in_flight, cfg.vae.seed, epoch),
            datasets.steps_per_epoch(train_frames, cfg.vae.batch_size),
            epochs_of(cfg),
            out / "checkpoint",
            on_epoch_end=on_epoch_end,
            checkpoint_every_steps=args.checkpoint_every,
            fingerprint=prints,
            samples_per_step=cfg.vae.batch_size,
            desc="V",
            log=lambda message: print(f"[02] {message}", flush=True),
        )
        model_path = artifacts.vision_path(args.data_dir, cfg)
        training.atomic_save_model(model, weights_path(model_path))
        training.atomic_save_model(model, model_path)
        print(f"[02] evaluating V on every frame of {len(eval_paths)} "
              f"{'held-out' if heldout_paths else 'training'} episode(s)")
        evaluation = evaluate_frames(model, eval_paths, cfg.vae.batch_size)
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


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                        help="also checkpoint every STEPS batches (default: every 60 s and at every epoch end)")
    cfg, args = config.parse_args(__doc__, argv, parser)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        parser.error("--checkpoint-every must be a positive number of steps")
    rollouts = args.data_dir / artifacts.ROLLOUTS
    out = artifacts.vision_dir(args.data_dir, cfg)
    model_path = artifacts.vision_path(args.data_dir, cfg)

    paths = storage.list_episodes(rollouts, "rollouts", hint="Run 01_generate_data.py first.")
    if (rollouts / "config.json").is_file():
        config.check_compatible(config.load_config(rollouts / "config.json"), cfg, ROLLOUT_KEYS, str(rollouts))
    else:
        print(f"[02] note: {rollouts / 'config.json'} is missing, so the rollouts' settings cannot be checked")
    if (out / "config.json").is_file():
        config.check_compatible(config.load_config(out / "config.json"), cfg, VAE_KEYS, str(out))
    train_paths, heldout_paths = datasets.split_episodes(paths, cfg.vae.heldout_fraction, cfg.vae.split_seed)
    # Every file is checked (headers only) before training, so a bad one stops the run now, not hours later.
    lengths = dict(zip(paths, datasets.check_episodes(paths)))
    prints = fingerprint(cfg, train_paths, sum(lengths[p] for p in train_paths))

    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and model_path.is_file() and weights_path(model_path).is_file():
        done = storage.read_json(metrics_path)
        if done.get("epochs", 0) >= epochs_of(cfg):
            if done.get("fingerprint") != prints:
                print(f"[02] note: V in {out} was trained on other rollouts or settings than the current ones; "
                      f"delete {out} to train it again")
            print(f"[02] V is already trained ({done['epochs']} epochs, {model_path}); nothing to do")
            return 0

    print(f"[02] {len(paths)} episodes in {rollouts}: {len(train_paths)} for training "
          f"({prints['train_frames']} frames), {len(heldout_paths)} held out "
          f"({sum(lengths[p] for p in heldout_paths)} frames)")
    out.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, out)
    datasets.save_split(out, cfg.vae.heldout_fraction, cfg.vae.split_seed, train_paths, heldout_paths)

    start = time.perf_counter()
    metrics = train_and_evaluate(cfg, args, out, train_paths, heldout_paths, lengths, prints)
    # metrics.json is written last: its presence (with enough epochs) is what marks the stage complete.
    storage.atomic_write_json(metrics_path, metrics)
    print(f"[02] done in {time.perf_counter() - start:.0f} s: MSE {metrics['reconstruction_mse']:.5f}, "
          f"PSNR {metrics['psnr_db']:.2f} dB, KL {metrics['kl_per_frame']:.2f} nats/frame, "
          f"{metrics['active_dimensions']}/{cfg.vae.z_size} active dimensions on {metrics['evaluated_on']} "
          f"frames -> {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
