"""Where each stage's artifacts live under ``--data-dir``, and loading them with checks.

A stage that consumes an artifact loads it through here, so that a missing artifact says
which command makes it, and an artifact made with an incompatible config is refused
before TensorFlow fails on a shape deep inside a model.
"""

from __future__ import annotations

from pathlib import Path

import config
from worldmodels.storage import MissingDataError

ROLLOUTS = "rollouts"
SERIES = "series"
# The folder and file of each V; which one is used is ``vae.model``.
VISION = {"vae": ("vae", "vae.keras"), "vae_gan": ("vae_gan", "vae_gan.keras")}
RNN = ("rnn", "rnn.keras")

# Config fields an artifact's consumers depend on.
VISION_KEYS = ("vae.model", "vae.z_size")
RNN_KEYS = VISION_KEYS + ("rnn.hidden_units", "rnn.num_mixtures", "rnn.reward_head", "rnn.done_head")


def vision_dir(data_dir: Path, cfg: config.Config) -> Path:
    return Path(data_dir) / VISION[cfg.vae.model][0]


def vision_path(data_dir: Path, cfg: config.Config) -> Path:
    folder, name = VISION[cfg.vae.model]
    return Path(data_dir) / folder / name


def rnn_path(data_dir: Path) -> Path:
    return Path(data_dir) / RNN[0] / RNN[1]


def _check_artifact(path: Path, cfg: config.Config, keys, what: str, command: str) -> None:
    if not path.exists():
        raise MissingDataError(f"no {what} at {path}; make it first with: {command}")
    saved = path.parent / "config.json"
    if not saved.exists():
        raise MissingDataError(f"{what} at {path} has no config.json beside it; remake it with: {command}")
    config.check_compatible(config.load_config(saved), cfg, keys, f"{what} at {path}")


def load_vision(data_dir: Path, cfg: config.Config):
    """The trained V selected by ``vae.model`` (a model with ``encode``/``decode``)."""
    import keras

    import models.vae  # noqa: F401  (registers ConvVAE for deserialisation)

    if cfg.vae.model == "vae_gan":
        import vae_gan.model  # noqa: F401  (registers the VAE-GAN)
    path = vision_path(data_dir, cfg)
    script = "02_train_vae.py" + (" --set vae.model=vae_gan" if cfg.vae.model == "vae_gan" else "")
    _check_artifact(path, cfg, VISION_KEYS, f"V ({cfg.vae.model})", f"python {script}")
    return keras.models.load_model(path, compile=False)


def load_rnn(data_dir: Path, cfg: config.Config):
    """The trained M (MDN-RNN)."""
    import keras

    import models.mdn_rnn  # noqa: F401  (registers MDNRNN for deserialisation)

    path = rnn_path(data_dir)
    _check_artifact(path, cfg, RNN_KEYS, "M (MDN-RNN)", "python 04_train_rnn.py")
    return keras.models.load_model(path, compile=False)
