"""Toy 2-D experiment: a plain VAE against a VAE-GAN (Larsen et al. 2016) with a 1-D latent.

The data
--------
Every point comes from two generative factors::

    z1 ~ Bernoulli(1/2)          which of two parallel horizontal lines (y = -OFFSET or +OFFSET)
    z2 ~ Uniform(-1, 1)          the position along that line (x = HALF_LENGTH * z2)
    point = (HALF_LENGTH * z2, OFFSET * (2 * z1 - 1)) + NOISE_STD * N(0, I_2)

The two lines are far apart compared with the noise, so the data has two separated modes
and nothing lies between them. A 1-D latent cannot hold both factors as separate coordinates:
a model has to squeeze "which line" and "where on it" into one number. The true density is
known in closed form (a uniform segment blurred by Gaussian noise, times a two-component
Gaussian mixture across the lines), see :func:`data_log_density`.

The expected picture (from the seed report): a VAE trained with a squared-error
(Gaussian) reconstruction loss encodes the wide factor (x) and averages the narrow one (y),
so its reconstructions fall between the lines where the data has almost no mass; the
VAE-GAN's decoder must fool a discriminator, so its reconstructions land on the lines.

What decides the VAE's behaviour is its fixed decoder std ``sigma``. Averaging the two lines
costs OFFSET^2 / (2 sigma^2) nats per point, telling them apart costs about log 2 nats of
KL, so the VAE averages when sigma > OFFSET / sqrt(2 log 2) ~ 0.42. We use sigma^2 = 1/2 (the
loss is then the plain sum of squared errors, as in the World Models VAE) and the VAE
lands between the lines; measured with 2,000 points and 200 epochs, sigma = 0.4 and 0.5 also
average, while sigma = 0.3, 0.2 and 0.05 give a VAE whose reconstructions lie on the lines
as well. The VAE-GAN has no such knob: its decoder is judged by the discriminator.

Training tricks: none were needed. With Adam 1e-3 for all three players, simultaneous
updates, and the non-saturating decoder loss below, the VAE-GAN trained stably on every
seed we tried, so the authors' equilibrium skipping is not implemented.

The models (all MLPs with 2 hidden layers of 128 units; latent size 1)
-----------------------------------------------------------------------
* encoder: (B, 2) -> mu (B, 1), logvar (B, 1)
* decoder: (B, 1) -> x (B, 2)
* discriminator: (B, 2) -> logit (B, 1), features of hidden layer l (B, 128)

:class:`ToyVAE` minimises ``sum((x - x_rec)^2) / (2 * decoder_std^2) + KL``.
:class:`ToyVAEGAN` has three players, each with its own optimiser (Larsen et al. eq. 9-10):

* encoder:       ``KL + Dis_l``
* decoder:       ``gamma * Dis_l - GAN``
* discriminator: ``GAN`` (real vs. reconstruction vs. decoded prior sample)

where ``Dis_l = 0.5 * sum_features (D_l(x) - D_l(x_rec))^2`` (a unit-variance Gaussian
likelihood in the discriminator's feature space). For the decoder's ``-GAN`` term we use the
usual non-saturating form ``-log D(x_rec) - log D(x_prior)`` instead of
``log(1 - D(x_rec)) + log(1 - D(x_prior))``: both have the same fixed point, but the
saturating form gives the decoder no gradient while the discriminator is winning.

Run ``python -m vae_gan.toy --out data/toy --epochs N --seed S`` for the figure and metrics.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

import keras
from keras import layers, ops

# Geometry of the two lines; NOISE_STD << OFFSET keeps the modes well separated.
HALF_LENGTH = 2.0
OFFSET = 0.5
NOISE_STD = 0.05

LATENT_DIM = 1
HIDDEN_UNITS = 128

# Axes limits shared by all panels of the figure.
PLOT_LIMITS = ((-2.6, 2.6), (-1.2, 1.2))


# --------------------------------------------------------------------------- data


def make_toy_data(n: int, seed: int, return_factors: bool = False):
    """Sample ``n`` points of the two-line distribution.

    Returns (n, 2) float32 points; with ``return_factors`` also z1 (n,) int64 in {0, 1} and
    z2 (n,) float32 in [-1, 1]. The same ``(n, seed)`` always gives the same points.
    """
    n = _check_positive_int(n, "n")
    rng = np.random.default_rng(seed)
    z1 = rng.integers(0, 2, size=n)
    z2 = rng.uniform(-1.0, 1.0, size=n)
    clean = np.stack([HALF_LENGTH * z2, OFFSET * (2.0 * z1 - 1.0)], axis=1)
    points = (clean + NOISE_STD * rng.standard_normal((n, 2))).astype(np.float32)
    if return_factors:
        return points, z1.astype(np.int64), z2.astype(np.float32)
    return points


def _log_ndtr(t: np.ndarray) -> np.ndarray:
    """log Phi(t) for the standard normal CDF, accurate far into the lower tail; (n,) -> (n,)."""
    t = np.asarray(t, dtype=np.float64)
    out = np.empty_like(t)
    # erfc underflows below about -37 sigma, so the far tail uses the asymptotic series
    # Phi(-s) ~ phi(s) / s * (1 - 1/s^2 + 3/s^4 - 15/s^6), accurate to ~1e-9 for s >= 20.
    far = t < -20.0
    near = ~far
    erfc = np.vectorize(math.erfc, otypes=[np.float64])
    out[near] = np.log(0.5 * erfc(-t[near] / math.sqrt(2.0)))
    s = -t[far]
    out[far] = (-0.5 * s**2 - np.log(s) - 0.5 * math.log(2.0 * math.pi)
                + np.log1p(-1.0 / s**2 + 3.0 / s**4 - 15.0 / s**6))
    return out


def data_log_density(points) -> np.ndarray:
    """Exact log-density of the true data distribution at ``points`` (n, 2) -> (n,) float64.

    p(x, y) = p(x) * p(y) with
    p(x) = [Phi((x + L) / s) - Phi((x - L) / s)] / (2 L)   (uniform on [-L, L] blurred by noise)
    p(y) = 0.5 N(y; -OFFSET, s^2) + 0.5 N(y; +OFFSET, s^2).
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {points.shape}")
    x, y = points[:, 0], points[:, 1]
    s = NOISE_STD
    # Phi(b) - Phi(a) loses all precision when both are near 1 (x >> L); the density is
    # symmetric in x, so evaluate at -|x| where both CDFs sit in the accurate lower tail.
    ax = -np.abs(x)
    log_hi = _log_ndtr((ax + HALF_LENGTH) / s)
    log_lo = _log_ndtr((ax - HALF_LENGTH) / s)
    log_px = log_hi + np.log1p(-np.exp(log_lo - log_hi)) - math.log(2.0 * HALF_LENGTH)
    log_norm = -0.5 * math.log(2.0 * math.pi * s**2)
    comps = np.stack([log_norm - 0.5 * ((y - m) / s) ** 2 for m in (-OFFSET, OFFSET)], axis=1)
    log_py = np.logaddexp(comps[:, 0], comps[:, 1]) + math.log(0.5)
    return log_px + log_py


def distance_to_data(points, reference) -> np.ndarray:
    """Euclidean distance of each of ``points`` (n, 2) to its nearest ``reference`` point (m, 2) -> (n,)."""
    points = np.asarray(points, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    for name, arr in (("points", points), ("reference", reference)):
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"{name} must have shape (n, 2), got {arr.shape}")
    out = np.empty(len(points))
    # Chunks keep the (chunk, m) distance matrix at a few tens of MB for m ~ 20,000.
    for start in range(0, len(points), 256):
        chunk = points[start:start + 256]
        d2 = ((chunk[:, None, :] - reference[None, :, :]) ** 2).sum(-1)
        out[start:start + 256] = np.sqrt(d2.min(axis=1))
    return out


# --------------------------------------------------------------------------- networks


def build_encoder(hidden: int = HIDDEN_UNITS, latent_dim: int = LATENT_DIM) -> keras.Model:
    """MLP encoder: x (B, 2) -> [mu (B, latent_dim), logvar (B, latent_dim)]."""
    x = keras.Input((2,), name="x")
    h = layers.Dense(hidden, activation="relu", name="enc_h1")(x)
    h = layers.Dense(hidden, activation="relu", name="enc_h2")(h)
    mu = layers.Dense(latent_dim, name="mu")(h)
    logvar = layers.Dense(latent_dim, name="logvar")(h)
    return keras.Model(x, [mu, logvar], name="encoder")


def build_decoder(hidden: int = HIDDEN_UNITS, latent_dim: int = LATENT_DIM) -> keras.Model:
    """MLP decoder: z (B, latent_dim) -> x (B, 2) (the mean of a Gaussian)."""
    z = keras.Input((latent_dim,), name="z")
    h = layers.Dense(hidden, activation="relu", name="dec_h1")(z)
    h = layers.Dense(hidden, activation="relu", name="dec_h2")(h)
    x = layers.Dense(2, name="x_mean")(h)
    return keras.Model(z, x, name="decoder")


def build_discriminator(hidden: int = HIDDEN_UNITS, feature_layer: int = 2) -> keras.Model:
    """MLP discriminator: x (B, 2) -> [logit (B, 1), hidden-layer-l features (B, hidden)].

    ``feature_layer`` (1 or 2) picks the hidden layer whose activations define Dis_l.
    """
    if feature_layer not in (1, 2):
        raise ValueError(f"feature_layer must be 1 or 2, got {feature_layer!r}")
    x = keras.Input((2,), name="x")
    h1 = layers.Dense(hidden, activation="leaky_relu", name="dis_h1")(x)
    h2 = layers.Dense(hidden, activation="leaky_relu", name="dis_h2")(h1)
    logit = layers.Dense(1, name="logit")(h2)
    return keras.Model(x, [logit, h1 if feature_layer == 1 else h2], name="discriminator")


def _kl(mu, logvar):
    """KL(q(z|x) || N(0, I)) per example: (B, Z), (B, Z) -> (B,)."""
    return 0.5 * ops.sum(ops.square(mu) + ops.exp(logvar) - 1.0 - logvar, axis=-1)


def _bce_logits(logits, target: float):
    """Binary cross-entropy of logits (B, 1) against a constant target; -> (B,)."""
    logits = ops.squeeze(logits, -1)
    # max(l, 0) - l * t + log(1 + exp(-|l|)) is the overflow-free form of the BCE.
    return ops.relu(logits) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))


# --------------------------------------------------------------------------- models


class _ToyAutoencoder(keras.Model):
    """What both toy models share: an ``encoder`` and ``decoder`` (set by the subclass) and a dict of ``trackers``."""

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, x):
        """Deterministic reconstruction through the posterior mean: (B, 2) -> (B, 2)."""
        mu, _ = self.encoder(x)
        return self.decoder(mu)


@keras.saving.register_keras_serializable(package="worldmodels")
class ToyVAE(_ToyAutoencoder):
    """VAE with a Gaussian decoder of fixed std ``decoder_std``; x (B, 2) -> reconstruction (B, 2).

    Loss per example: ``sum((x - x_rec)^2) / (2 decoder_std^2) + KL`` (the constant of the
    Gaussian log-likelihood dropped). The default std sqrt(1/2) makes the reconstruction
    term the plain sum of squared errors, as in the World Models VAE.
    """

    def __init__(self, decoder_std: float = math.sqrt(0.5), seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not decoder_std > 0:
            raise ValueError(f"decoder_std must be > 0, got {decoder_std!r}")
        self.decoder_std = float(decoder_std)
        self.seed = int(seed)
        self.encoder = build_encoder()
        self.decoder = build_decoder()
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        self.trackers = {k: keras.metrics.Mean(name=k) for k in ("loss", "recon", "kl")}

    def compute_losses(self, x, eps):
        """Loss terms for a batch x (B, 2) and reparameterisation noise eps (B, 1) -> dict of scalars."""
        mu, logvar = self.encoder(x)
        x_rec = self.decoder(mu + ops.exp(0.5 * logvar) * eps)
        recon = ops.mean(ops.sum(ops.square(x - x_rec), axis=-1)) / (2.0 * self.decoder_std**2)
        kl = ops.mean(_kl(mu, logvar))
        return {"loss": recon + kl, "recon": recon, "kl": kl}

    def train_step(self, data):
        import tensorflow as tf  # GradientTape: the custom step is written for the TF backend.

        x = data[0] if isinstance(data, tuple) else data
        eps = keras.random.normal(ops.shape(x)[:1] + (LATENT_DIM,), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            losses = self.compute_losses(x, eps)
        grads = tape.gradient(losses["loss"], self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        for k, v in losses.items():
            self.trackers[k].update_state(v)
        return {k: t.result() for k, t in self.trackers.items()}

    def get_config(self):
        return {**super().get_config(), "decoder_std": self.decoder_std, "seed": self.seed}


PLAYERS = ("encoder", "decoder", "discriminator")
# Each player minimises exactly one of the loss terms returned by ToyVAEGAN.compute_losses.
PLAYER_LOSS = {"encoder": "enc_loss", "decoder": "dec_loss", "discriminator": "disc_loss"}


@keras.saving.register_keras_serializable(package="worldmodels")
class ToyVAEGAN(_ToyAutoencoder):
    """VAE-GAN of Larsen et al. (2016) for 2-D points; x (B, 2) -> reconstruction (B, 2).

    Three players with separate optimisers (see the module docstring for the losses):
    encoder ``KL + Dis_l``, decoder ``gamma * Dis_l - GAN``, discriminator ``GAN``. Each
    player's gradient comes only from its own loss, so Dis_l never trains the discriminator
    and the GAN term never reaches the encoder (the paper's "limiting error signals").
    """

    def __init__(self, gamma: float = 1.0, feature_layer: int = 2, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.feature_layer = int(feature_layer)
        self.seed = int(seed)
        self.encoder = build_encoder()
        self.decoder = build_decoder()
        self.discriminator = build_discriminator(feature_layer=self.feature_layer)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        names = ("enc_loss", "dec_loss", "disc_loss", "kl", "dis_l", "gan_g", "gan_d")
        self.trackers = {k: keras.metrics.Mean(name=k) for k in names}

    def compile(self, encoder_optimizer=None, decoder_optimizer=None, discriminator_optimizer=None,
                **kwargs):
        """Attach one optimiser per player (default: RMSprop 3e-4 each, the authors' choice)."""
        super().compile(**kwargs)
        self.player_optimizers = {
            "encoder": encoder_optimizer or keras.optimizers.RMSprop(3e-4),
            "decoder": decoder_optimizer or keras.optimizers.RMSprop(3e-4),
            "discriminator": discriminator_optimizer or keras.optimizers.RMSprop(3e-4),
        }
        # Building the slots now keeps variable creation out of the traced train step.
        for player, opt in self.player_optimizers.items():
            opt.build(self._player_variables(player))

    def _player_variables(self, player: str):
        if player not in PLAYERS:
            raise ValueError(f"player must be one of {PLAYERS}, got {player!r}")
        return getattr(self, player).trainable_variables

    def sample_noise(self, batch_size):
        """Reparameterisation noise eps (B, 1) and prior samples z_p (B, 1) for one step."""
        shape = (batch_size, LATENT_DIM)
        return (keras.random.normal(shape, seed=self.seed_generator),
                keras.random.normal(shape, seed=self.seed_generator))

    def compute_losses(self, x, eps, z_prior):
        """All loss terms for x (B, 2), eps (B, 1), z_prior (B, 1) -> dict of scalars.

        ``enc_loss``, ``dec_loss`` and ``disc_loss`` are the three players' objectives.
        """
        mu, logvar = self.encoder(x)
        x_rec = self.decoder(mu + ops.exp(0.5 * logvar) * eps)
        x_prior = self.decoder(z_prior)
        logit_real, feat_real = self.discriminator(x)
        logit_rec, feat_rec = self.discriminator(x_rec)
        logit_prior, _ = self.discriminator(x_prior)

        kl = ops.mean(_kl(mu, logvar))
        dis_l = ops.mean(0.5 * ops.sum(ops.square(feat_real - feat_rec), axis=-1))
        # -L_GAN of the paper: the discriminator's cross-entropy on all three kinds of input.
        gan_d = ops.mean(_bce_logits(logit_real, 1.0) + _bce_logits(logit_rec, 0.0)
                         + _bce_logits(logit_prior, 0.0))
        # Non-saturating version of the decoder's -L_GAN (see the module docstring).
        gan_g = ops.mean(_bce_logits(logit_rec, 1.0) + _bce_logits(logit_prior, 1.0))
        return {"enc_loss": kl + dis_l, "dec_loss": self.gamma * dis_l + gan_g, "disc_loss": gan_d,
                "kl": kl, "dis_l": dis_l, "gan_g": gan_g, "gan_d": gan_d}

    def _gradients(self, x, eps, z_prior):
        """Losses and, for each player, the gradient of its own loss w.r.t. its own variables."""
        import tensorflow as tf  # GradientTape: the custom step is written for the TF backend.

        with tf.GradientTape(persistent=True) as tape:
            losses = self.compute_losses(x, eps, z_prior)
        grads = {p: tape.gradient(losses[PLAYER_LOSS[p]], self._player_variables(p)) for p in PLAYERS}
        del tape
        return losses, grads

    def player_step(self, player: str, x, eps, z_prior):
        """Update only ``player`` (others frozen) on a fixed batch; returns the losses before the step."""
        losses, grads = self._gradients(x, eps, z_prior)
        self.player_optimizers[player].apply_gradients(zip(grads[player], self._player_variables(player)))
        return losses

    def train_step(self, data):
        x = data[0] if isinstance(data, tuple) else data
        eps, z_prior = self.sample_noise(ops.shape(x)[0])
        # All three gradients are taken at the same parameters, then applied (simultaneous play).
        losses, grads = self._gradients(x, eps, z_prior)
        for player in PLAYERS:
            self.player_optimizers[player].apply_gradients(zip(grads[player], self._player_variables(player)))
        for k, v in losses.items():
            self.trackers[k].update_state(v)
        return {k: t.result() for k, t in self.trackers.items()}

    def get_config(self):
        return {**super().get_config(), "gamma": self.gamma, "feature_layer": self.feature_layer,
                "seed": self.seed}


# --------------------------------------------------------------------------- experiment


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _score(recon: np.ndarray, held_out: np.ndarray, reference: np.ndarray) -> dict:
    """Metrics of reconstructions (n, 2) of ``held_out`` (n, 2) against a dense ``reference`` sample."""
    log_p = data_log_density(recon)
    return {
        "mean_log_density": float(log_p.mean()),
        "median_log_density": float(np.median(log_p)),
        "mean_distance_to_data": float(distance_to_data(recon, reference).mean()),
        "reconstruction_mse": float(((recon - held_out) ** 2).sum(-1).mean()),
    }


def run_toy_experiment(n_train: int = 4000, epochs: int = 200, seed: int = 0, out_dir=None,
                       n_test: int = 500, batch_size: int = 128, gamma: float = 1.0,
                       learning_rate: float = 1e-3, vae_decoder_std: float = math.sqrt(0.5)) -> dict:
    """Train a VAE and a VAE-GAN on the same data and seed; score their held-out reconstructions.

    Returns ``{"config": ..., "data": {...}, "vae": {...}, "vae_gan": {...}}`` where each model's
    entry has ``mean_log_density`` (true-data log-density of its reconstructions, higher = on the
    data), ``median_log_density``, ``mean_distance_to_data`` (to the nearest of 20,000 true
    points), ``reconstruction_mse`` and ``train_seconds``; ``data`` scores the held-out points
    themselves as the reference. With ``out_dir`` also writes ``toy_vae_vs_vaegan.png`` and
    ``toy_metrics.json`` there.
    """
    n_train = _check_positive_int(n_train, "n_train")
    epochs = _check_positive_int(epochs, "epochs")
    n_test = _check_positive_int(n_test, "n_test")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    # Disjoint generator seeds for training, held-out and reference samples.
    x_train = make_toy_data(n_train, seed)
    x_test = make_toy_data(n_test, seed + 1_000_003)
    reference = make_toy_data(20_000, seed + 2_000_003)

    results = {"config": {"n_train": n_train, "epochs": epochs, "seed": seed, "n_test": n_test,
                          "batch_size": batch_size, "gamma": gamma, "learning_rate": learning_rate,
                          "vae_decoder_std": vae_decoder_std},
               "data": _score(x_test, x_test, reference)}
    recons = {}
    for name in ("vae", "vae_gan"):
        # The same seed before each model gives both the same initial encoder and decoder weights.
        keras.utils.set_random_seed(seed)
        if name == "vae":
            model = ToyVAE(decoder_std=vae_decoder_std, seed=seed)
            model.compile(optimizer=keras.optimizers.Adam(learning_rate), steps_per_execution=16)
        else:
            model = ToyVAEGAN(gamma=gamma, seed=seed)
            model.compile(*(keras.optimizers.Adam(learning_rate) for _ in PLAYERS), steps_per_execution=16)
        start = time.perf_counter()
        history = model.fit(x_train, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
        seconds = time.perf_counter() - start
        recons[name] = np.asarray(model.predict(x_test, batch_size=1024, verbose=0), dtype=np.float64)
        results[name] = {**_score(recons[name], x_test, reference), "train_seconds": seconds,
                         "final_epoch_losses": {k: float(v[-1]) for k, v in history.history.items()}}

    if out_dir is not None:
        from worldmodels.storage import atomic_write_json

        out_dir = Path(out_dir)
        save_figure(out_dir / "toy_vae_vs_vaegan.png", x_test, recons, results)
        atomic_write_json(out_dir / "toy_metrics.json", results)
    return results


def save_figure(path, data: np.ndarray, recons: dict, results: dict) -> Path:
    """Three panels side by side (data, VAE and VAE-GAN reconstructions) on the same axes."""
    # A bare Figure renders PNGs with the Agg canvas without touching pyplot's global backend.
    from matplotlib.figure import Figure

    from worldmodels import storage

    panels = [("data (held-out)", data, results["data"]), ("VAE reconstructions", recons["vae"], results["vae"]),
              ("VAE-GAN reconstructions", recons["vae_gan"], results["vae_gan"])]
    fig = Figure(figsize=(15, 4.2))
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    for ax, (title, pts, m) in zip(axes, panels):
        # The true data in light grey under every panel shows where reconstructions should be.
        ax.scatter(data[:, 0], data[:, 1], s=4, c="lightgrey")
        ax.scatter(pts[:, 0], pts[:, 1], s=5, c="tab:blue")
        ax.set_title(f"{title}\nmean log p_data = {m['mean_log_density']:.1f}, "
                     f"dist = {m['mean_distance_to_data']:.3f}", fontsize=10)
        ax.set_xlim(*PLOT_LIMITS[0])
        ax.set_ylim(*PLOT_LIMITS[1])
    return storage.save_figure(fig, path, dpi=100)


def format_table(results: dict) -> str:
    """A small markdown table of the metrics returned by :func:`run_toy_experiment`."""
    rows = ["| reconstructions | mean log p_data | median log p_data | mean dist. to data | recon. MSE |",
            "| --- | --- | --- | --- | --- |"]
    for key, label in (("data", "held-out data itself"), ("vae", "VAE"), ("vae_gan", "VAE-GAN")):
        m = results[key]
        rows.append(f"| {label} | {m['mean_log_density']:.2f} | {m['median_log_density']:.2f} "
                    f"| {m['mean_distance_to_data']:.4f} | {m['reconstruction_mse']:.4f} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/toy", help="folder for the figure and metrics JSON")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--gamma", type=float, default=1.0, help="weight of Dis_l in the decoder loss")
    parser.add_argument("--vae-decoder-std", type=float, default=math.sqrt(0.5),
                        help="fixed std of the plain VAE's Gaussian decoder (see the module docstring)")
    args = parser.parse_args(argv)
    if args.epochs <= 0 or args.n_train <= 0:
        parser.error("--epochs and --n-train must be positive")
    results = run_toy_experiment(n_train=args.n_train, epochs=args.epochs, seed=args.seed,
                                 out_dir=args.out, gamma=args.gamma, vae_decoder_std=args.vae_decoder_std)
    print(format_table(results))
    print(f"\nwrote {Path(args.out) / 'toy_vae_vs_vaegan.png'} and {Path(args.out) / 'toy_metrics.json'}")
    return results


if __name__ == "__main__":
    main()
