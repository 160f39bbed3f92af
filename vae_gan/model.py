"""VAE-GAN (Larsen et al. 2016, "Autoencoding beyond pixels using a learned similarity metric") as V.

A drop-in replacement for :class:`models.vae.ConvVAE`: the encoder and decoder are V's own
(:func:`models.vae.build_encoder` / :func:`models.vae.build_decoder`, 755,744 + 3,592,803
parameters for Z = 32) and ``encode``/``decode``/``call`` are ConvVAE's, so stages 3-5 use
either model unchanged. Only the training objective differs: a discriminator D learns to tell
real frames from generated ones, and the reconstruction error is measured on D's features.

Shapes (B = batch, Z = ``z_size``):

* encoder: frames float32 (B, 64, 64, 3) in [0, 1] -> ``(mu, logvar)``, each (B, Z).
* decoder: z (B, Z) -> frames float32 (B, 64, 64, 3) in [0, 1].
* discriminator: frames float32 (B, 64, 64, 3) in [0, 1] -> ``(features, logit)``:
  Conv2D 32, 64, 128, 256 (kernel 4, stride 2, valid, LeakyReLU 0.2): 64 -> 31 -> 14 -> 6 -> 2,
  flatten 1024, Dense(1). ``features`` = Dis_l, the output of the 3rd convolution,
  (B, 6, 6, 128) = 4,608 values per frame; ``logit`` (B, 1) float32. 691,169 parameters.
  No batch normalisation: the gradient penalty of WGAN-GP is defined per sample.

Per frame, x a real frame, x~ = Dec(z), z ~ q(z | x) its reconstruction and x_p = Dec(z_p),
z_p ~ N(0, I) a sample from the prior (every loss below is a mean over the batch):

* ``kl_loss``: KL(q(z | x) || N(0, I)) in nats. The encoder minimises it floored at
  ``kl_tolerance * Z`` per frame, exactly as V does (0.5 * 32 = 16 nats by default; 0 disables).
* ``feature_loss`` (L_llike^Dis_l): 0.5 * sum over the 4,608 features of
  (Dis_l(x) - Dis_l(x~))^2, the negative log-likelihood of a Gaussian with unit variance on
  D's features without its constant (the authors' ``GaussianNegLogLikelihood``); it is in
  nats, on the same scale as the KL. Equivalently the mean over features times 2,304.
* ``pixel_mse``: mean over pixels of (x - x~)^2, reported always. The optional pixel term
  ``pixel_weight`` * sum over pixels of (x - x~)^2 (V's reconstruction loss) joins the encoder's
  and the decoder's losses; 0 by default, as in the paper. Many practical VAE-GANs add a small
  one for stability early in training, when D's features carry little information.
* 'gan' (Larsen et al.): with l = D's logit and softplus(t) = log(1 + e^t) (numerically
  stable, no log of a probability is ever taken):
  ``gan_d_loss`` = softplus(-l(x)) + 0.5 * (softplus(l(x~)) + softplus(l(x_p))), the binary
  cross-entropy of real against the generated frames, real and generated weighted equally as
  in the authors' code (``real_vs_gen_weight=0.5``);
  ``gan_g_loss`` = softplus(-l(x~)) + softplus(-l(x_p)), the *non-saturating* form
  -log D(x~) - log D(x_p) of the decoder's -L_GAN (the minimax form log(1 - D) gives the
  decoder no gradient while D rejects its frames easily, which is the case early on).
* 'wgan-gp' (Gulrajani et al. 2017): l is an unbounded critic score;
  ``gan_d_loss`` = 0.5 * (l(x~) + l(x_p)) - l(x), the critic's estimate of minus the
  Wasserstein distance between the data and the even mixture of reconstructions and prior
  samples; ``gan_g_loss`` = -(l(x~) + l(x_p)); the critic adds ``gp_weight`` times the gradient
  penalty (:meth:`VAEGAN.gradient_penalty`) on interpolates between real and generated frames.

The three players minimise (each with its own optimizer and only its own weights):

* encoder: ``enc_loss`` = max(KL, kl_tolerance * Z) + feature_loss (+ pixel term);
* decoder: ``dec_loss`` = gamma * feature_loss + gan_g_loss (+ pixel term);
* discriminator: ``disc_loss`` = gan_d_loss (+ gp_weight * gradient penalty for 'wgan-gp').

'gan' updates the three players simultaneously from one forward pass, as the authors did.
'wgan-gp' first updates the critic ``critic_steps`` times on the batch (against the same
generated frames, with fresh interpolation weights each time; the generator does not change
in between), then updates the encoder and decoder once against the updated critic.
The authors' equilibrium trick (``equilibrium_margin``, 'gan' only, off by default) skips
D's update when D is far ahead and the decoder's when D is far behind.

``model.optimizer`` is a :class:`PlayerOptimizers` that holds the three optimizers and behaves
like one optimizer where code expects ``model.optimizer`` (``variables``, ``iterations``,
``build``), so ``worldmodels.training`` checkpoints and resumes a VAE-GAN as it does V.
Under ``mixed_float16`` each optimizer is a LossScaleOptimizer and D's outputs are float32;
the penalty's inner gradient (with respect to the frames) is not loss-scaled, which is fine
for its O(1) norms but untested on a GPU.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from models.vae import (
    DEFAULT_KL_TOLERANCE,
    DEFAULT_Z_SIZE,
    FRAME_SHAPE,
    ConvVAE,
    _check_z_size,
    _frames_from_data,
    build_decoder,
    build_encoder,
    to_float_frames,
    vae_loss,
)

ADVERSARIAL_OBJECTIVES = ("gan", "wgan-gp")
METRIC_NAMES = (
    "kl_loss", "feature_loss", "gan_d_loss", "gan_g_loss", "pixel_mse", "enc_loss", "dec_loss", "disc_loss",
)
DEFAULT_GAMMA = 1e-2
DEFAULT_GP_WEIGHT = 10.0
DEFAULT_CRITIC_STEPS = 5
# The authors' equilibrium: D's binary cross-entropy on real and on generated frames is kept
# within ``margin`` of 0.68 nats (about log 2, where D cannot tell them apart); they used 0.4.
EQUILIBRIUM = 0.68
AUTHORS_EQUILIBRIUM_MARGIN = 0.4

# (filters, kernel), stride 2: the encoder's layout, so D sees the frame at the same scales.
_DISCRIMINATOR_CONVS = ((32, 4), (64, 4), (128, 4), (256, 4))
# Dis_l is the output of this convolution (1-based): (B, 6, 6, 128), between the edge-level
# first layers and the nearly global last one, as the authors took a middle layer.
FEATURE_LAYER = 3
# Fixed seeds of test_step's prior samples and interpolation weights, so held-out losses are
# repeatable from one evaluation to the next.
_EVAL_PRIOR_SEED = 1234
_EVAL_GP_SEED = 4321
# Added under the square root of the gradient norm, so the penalty has a finite gradient
# where the critic's gradient vanishes (sqrt has an infinite slope at 0).
_NORM_EPSILON = 1e-12
_PLAYERS = ("encoder", "decoder", "discriminator")
_PLAYER_LOSSES = {"encoder": "enc_loss", "decoder": "dec_loss", "discriminator": "disc_loss"}
_COMPILE_ARGUMENTS = {"enc_optimizer": "encoder", "dec_optimizer": "decoder", "disc_optimizer": "discriminator"}


def build_discriminator():
    """D: frames float32 (B, 64, 64, 3) in [0, 1] -> ``[features (B, 6, 6, 128), logit (B, 1)]``.

    ``features`` is Dis_l, the LeakyReLU output of the 3rd convolution; ``logit`` is the
    Dense(1) output, a logit of "real" for 'gan' and a critic score for 'wgan-gp'. Both
    outputs are float32 under a ``mixed_float16`` policy. 691,169 parameters.
    """
    frames = keras.Input(shape=FRAME_SHAPE, dtype="float32", name="frames")
    x = frames
    features = None
    for index, (filters, kernel) in enumerate(_DISCRIMINATOR_CONVS, start=1):
        x = layers.Conv2D(filters, kernel, strides=2, padding="valid", name=f"disc_conv{index}")(x)
        x = layers.LeakyReLU(negative_slope=0.2, name=f"disc_lrelu{index}")(x)
        if index == FEATURE_LAYER:
            features = layers.Activation("linear", dtype="float32", name="disc_features")(x)
    x = layers.Flatten(name="disc_flatten")(x)
    logit = layers.Dense(1, dtype="float32", name="disc_logit")(x)
    return keras.Model(frames, [features, logit], name="discriminator")


def interpolation_weights(batch_size, seed=None):
    """Uniform(0, 1) mixing weights (batch_size,) float32 for the gradient penalty's interpolates.

    ``seed``: an int (the same weights on every call), a ``keras.random.SeedGenerator``, or None.
    """
    return keras.random.uniform((batch_size,), dtype="float32", seed=seed)


def critic_gradient_penalty(critic, real, fake, weights):
    """WGAN-GP's penalty mean_b (||grad_x critic(x_b)||_2 - 1)^2 at x_b = w_b real_b + (1 - w_b) fake_b.

    Args:
        critic: callable (B, ...) -> (B, 1) or (B,) scores, one score per sample that depends
            on that sample only (no batch normalisation), so the gradient of the summed scores
            with respect to x_b is the gradient of the b-th score.
        real, fake: tensors of one shape (B, ...) and one floating dtype.
        weights: (B,) mixing weights in [0, 1] (see :func:`interpolation_weights`).

    Returns:
        A scalar of ``real``'s dtype. Call it inside a ``GradientTape`` to differentiate it with
        respect to the critic's weights (the inner gradient is recorded, double backprop).
    """
    real = tf.convert_to_tensor(real)
    fake = tf.cast(fake, real.dtype)
    if real.shape.rank is not None and fake.shape.rank is not None and real.shape != fake.shape:
        raise ValueError(f"real and fake must have one shape, got {real.shape} and {fake.shape}.")
    weights = tf.cast(tf.reshape(weights, [-1] + [1] * (real.shape.rank - 1)), real.dtype)
    interpolates = weights * real + (1.0 - weights) * fake
    with tf.GradientTape() as tape:
        tape.watch(interpolates)
        scores = tf.cast(critic(interpolates), real.dtype)
        total = tf.reduce_sum(scores)
    gradients = tape.gradient(total, interpolates)
    squared = tf.reduce_sum(tf.square(gradients), axis=list(range(1, real.shape.rank)))
    norms = tf.sqrt(squared + _NORM_EPSILON)
    return tf.reduce_mean(tf.square(norms - 1.0))


def default_optimizer(adversarial, learning_rate=None):
    """The suggested optimizer of one player for an objective.

    'gan': RMSprop(``learning_rate``, default 3e-4), the authors' choice. 'wgan-gp':
    Adam(``learning_rate``, default 1e-4, beta_1 0, beta_2 0.9), Gulrajani et al.'s choice.
    """
    _check_adversarial(adversarial)
    if adversarial == "gan":
        return keras.optimizers.RMSprop(3e-4 if learning_rate is None else learning_rate)
    return keras.optimizers.Adam(1e-4 if learning_rate is None else learning_rate, beta_1=0.0, beta_2=0.9)


def _check_adversarial(adversarial):
    if adversarial not in ADVERSARIAL_OBJECTIVES:
        raise ValueError(f"adversarial must be one of {ADVERSARIAL_OBJECTIVES}, got {adversarial!r}.")


def _non_negative(name, value):
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not number or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
    return float(value)


class PlayerOptimizers:
    """The encoder's, decoder's and discriminator's optimizers, usable where ``model.optimizer`` is expected.

    Code written for a single optimizer (Keras' ``fit``, ``worldmodels.training``'s checkpoints)
    uses ``built``, ``build``, ``variables`` and ``iterations``; here they cover all three.
    ``iterations`` is the encoder optimizer's counter: the encoder is updated exactly once per
    training step whatever the objective (the critic is updated ``critic_steps`` times and the
    equilibrium trick skips decoder or discriminator updates).
    """

    def __init__(self, model, encoder, decoder, discriminator):
        self.model = model
        self.encoder = encoder
        self.decoder = decoder
        self.discriminator = discriminator

    def items(self):
        """``[(player name, optimizer)]`` in the order encoder, decoder, discriminator."""
        return [(name, getattr(self, name)) for name in _PLAYERS]

    @property
    def built(self):
        return all(optimizer.built for _, optimizer in self.items())

    def build(self, variables=None):
        """Create each optimizer's slots for its own player's weights (``variables`` is ignored)."""
        for name, optimizer in self.items():
            if not optimizer.built:
                optimizer.build(self.model.player_weights(name))

    @property
    def variables(self):
        return [v for _, optimizer in self.items() for v in optimizer.variables]

    @property
    def iterations(self):
        return self.encoder.iterations


@keras.saving.register_keras_serializable(package="worldmodels")
class VAEGAN(keras.Model):
    """V's encoder and decoder trained as a VAE-GAN, with V's ``encode``/``decode``/``call`` API.

    Trainable with ``model.fit(dataset_of_frames)`` (or ``train_on_batch``) after
    ``compile(enc_optimizer=..., dec_optimizer=..., disc_optimizer=...)``; frames (B, 64, 64, 3)
    as uint8 or float in [0, 1], alone or first in a tuple. ``train_step`` samples z with the
    reparameterisation trick; ``test_step`` decodes the posterior mean and uses fixed prior
    samples and interpolation weights, so held-out numbers are repeatable. Metrics:
    ``kl_loss``, ``feature_loss``, ``gan_d_loss``, ``gan_g_loss``, ``pixel_mse``, ``enc_loss``,
    ``dec_loss``, ``disc_loss`` (see the module docstring); there is no single ``loss``.

    Args:
        z_size, kl_tolerance, seed: as for ``ConvVAE`` (use ``vae.z_size``, ``vae.kl_tolerance``).
        gamma: weight of ``feature_loss`` in the decoder's loss (paper: 1e-2).
        adversarial: 'gan' or 'wgan-gp'.
        gp_weight: lambda of the gradient penalty ('wgan-gp' only).
        critic_steps: critic updates per encoder/decoder update ('wgan-gp' only).
        pixel_weight: weight of V's pixel reconstruction loss in the encoder's and decoder's
            losses (0 = the paper's pure feature-wise reconstruction).
        equilibrium_margin: None (off) or the authors' margin (0.4): skip D's update while its
            cross-entropy on real or generated frames is below 0.68 - margin, and the decoder's
            while it is above 0.68 + margin ('gan' only).
    """

    def __init__(
        self,
        z_size=DEFAULT_Z_SIZE,
        kl_tolerance=DEFAULT_KL_TOLERANCE,
        gamma=DEFAULT_GAMMA,
        adversarial="gan",
        gp_weight=DEFAULT_GP_WEIGHT,
        critic_steps=DEFAULT_CRITIC_STEPS,
        pixel_weight=0.0,
        equilibrium_margin=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.z_size = _check_z_size(z_size)
        self.kl_tolerance = _non_negative("kl_tolerance", kl_tolerance)
        self.gamma = _non_negative("gamma", gamma)
        _check_adversarial(adversarial)
        self.adversarial = adversarial
        self.gp_weight = _non_negative("gp_weight", gp_weight)
        if isinstance(critic_steps, bool) or not isinstance(critic_steps, (int, np.integer)) or critic_steps < 1:
            raise ValueError(f"critic_steps must be a positive integer, got {critic_steps!r}.")
        self.critic_steps = int(critic_steps)
        self.pixel_weight = _non_negative("pixel_weight", pixel_weight)
        if equilibrium_margin is not None:
            equilibrium_margin = _non_negative("equilibrium_margin", equilibrium_margin)
            if adversarial != "gan":
                raise ValueError("equilibrium_margin applies to adversarial='gan' only; use None for 'wgan-gp'.")
        self.equilibrium_margin = equilibrium_margin
        self.seed = seed
        self.encoder = build_encoder(self.z_size)
        self.decoder = build_decoder(self.z_size)
        self.discriminator = build_discriminator()
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in METRIC_NAMES}
        # All variables exist once the Functional sub-models are built (as for ConvVAE).
        self.built = True

    # V's inference API, shared rather than copied: these use only encoder, decoder and z_size.
    call = ConvVAE.call
    encode = ConvVAE.encode
    decode = ConvVAE.decode
    _chunked = ConvVAE._chunked

    @property
    def metrics(self):
        # Listing the trackers here lets Keras reset them at the start of every epoch.
        return list(self._trackers.values())

    def player_weights(self, player):
        """Trainable weights of 'encoder', 'decoder' or 'discriminator'."""
        if player not in _PLAYERS:
            raise ValueError(f"player must be one of {_PLAYERS}, got {player!r}.")
        return getattr(self, player).trainable_weights

    def discriminator_features(self, frames, training=False):
        """``(features_l, logit)``: (B, 64, 64, 3) uint8/float -> float32 (B, 6, 6, 128), (B, 1)."""
        features, logit = self.discriminator(to_float_frames(frames), training=training)
        return features, logit

    def gradient_penalty(self, real, fake, weights_seed=None):
        """WGAN-GP penalty of this model's critic (no ``gp_weight``): a float32 scalar.

        Args:
            real, fake: (B, 64, 64, 3) uint8 or float frames in [0, 1].
            weights_seed: seed of the (B,) interpolation weights drawn by
                :func:`interpolation_weights`: an int for repeatable weights, a
                ``SeedGenerator``, or None for the model's own generator.
        """
        real, fake = to_float_frames(real), to_float_frames(fake)
        if tuple(real.shape) != tuple(fake.shape):
            raise ValueError(
                f"real and fake must have one shape, got {tuple(real.shape)} and {tuple(fake.shape)}."
            )
        seed = self.seed_generator if weights_seed is None else weights_seed
        weights = interpolation_weights(ops.shape(real)[0], seed)
        return critic_gradient_penalty(
            lambda x: self.discriminator(x, training=True)[1], real, fake, weights
        )

    # ------------------------------------------------------------------ compiling

    def compile(self, enc_optimizer=None, dec_optimizer=None, disc_optimizer=None, **kwargs):
        """One optimizer per player; a missing one is :func:`default_optimizer` of the objective.

        Other keyword arguments (``run_eagerly``, ``jit_compile``, ``steps_per_execution``) go
        to ``keras.Model.compile``. Under the ``mixed_float16`` policy each optimizer is wrapped
        in a ``LossScaleOptimizer``. Call inside ``strategy.scope()`` when distributing.
        """
        for name in ("optimizer", "loss", "metrics"):
            if name in kwargs:
                raise ValueError(
                    f"VAEGAN.compile takes no {name!r}: pass enc_optimizer, dec_optimizer and "
                    "disc_optimizer; the losses are the model's own."
                )
        optimizers = []
        for optimizer in (enc_optimizer, dec_optimizer, disc_optimizer):
            optimizer = keras.optimizers.get(optimizer) or default_optimizer(self.adversarial)
            if self.dtype_policy.name == "mixed_float16" and not isinstance(
                optimizer, keras.optimizers.LossScaleOptimizer
            ):
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            optimizers.append(optimizer)
        if len({id(o) for o in optimizers}) != 3:
            raise ValueError("each player needs its own optimizer instance (their slots differ).")
        super().compile(optimizer=None, **kwargs)
        self.optimizer = PlayerOptimizers(self, *optimizers)

    def get_compile_config(self):
        # The three optimizers, so that load_model(..., compile=True) rebuilds them.
        if not isinstance(getattr(self, "optimizer", None), PlayerOptimizers):
            return {}
        return {argument: keras.optimizers.serialize(getattr(self.optimizer, player))
                for argument, player in _COMPILE_ARGUMENTS.items()}

    def compile_from_config(self, config):
        if config:
            self.compile(**{argument: keras.optimizers.deserialize(value) for argument, value in config.items()})
            self.optimizer.build()

    # ------------------------------------------------------------------ losses

    def _sample_noise(self, batch_size, training):
        """``(eps, z_prior)``, each (B, Z) float32: fresh in training, fixed for evaluation."""
        shape = (batch_size, self.z_size)
        if training:
            eps = keras.random.normal(shape, dtype="float32", seed=self.seed_generator)
            z_prior = keras.random.normal(shape, dtype="float32", seed=self.seed_generator)
            return eps, z_prior
        # The posterior mean (eps = 0) and one fixed set of prior samples.
        z_prior = keras.random.normal(shape, dtype="float32", seed=_EVAL_PRIOR_SEED)
        return ops.zeros(shape, dtype="float32"), z_prior

    def _generate(self, x, eps, z_prior, training):
        """``(mu, logvar, reconstruction, prior_sample)`` of float frames x; z = mu + sigma * eps."""
        mu, logvar = self.encoder(x, training=training)
        z = mu + ops.exp(0.5 * logvar) * eps
        reconstruction = self.decoder(z, training=training)
        prior_sample = self.decoder(z_prior, training=training)
        return mu, logvar, reconstruction, prior_sample

    def _adversarial(self, logit_real, logit_reconstruction, logit_prior):
        """``(gan_d_loss, gan_g_loss, real_cost, fake_cost)`` from D's (B, 1) logits (module docstring)."""
        if self.adversarial == "gan":
            real_cost = ops.mean(ops.softplus(-logit_real))
            fake_cost = 0.5 * (
                ops.mean(ops.softplus(logit_reconstruction)) + ops.mean(ops.softplus(logit_prior))
            )
            d_loss = real_cost + fake_cost
            g_loss = ops.mean(ops.softplus(-logit_reconstruction)) + ops.mean(ops.softplus(-logit_prior))
            return d_loss, g_loss, real_cost, fake_cost
        fake_score = ops.mean(logit_reconstruction) + ops.mean(logit_prior)
        d_loss = 0.5 * fake_score - ops.mean(logit_real)
        return d_loss, -fake_score, None, None

    def _player_losses(self, x, eps, z_prior, training):
        """Every loss of one forward pass (a dict of float32 scalars), without the gradient penalty."""
        mu, logvar, reconstruction, prior_sample = self._generate(x, eps, z_prior, training)
        batch = ops.shape(x)[0]
        # One call of D on the three batches: one pass over D's layers instead of three.
        features, logits = self.discriminator(ops.concatenate([x, reconstruction, prior_sample], axis=0),
                                              training=training)
        features = ops.cast(features, "float32")
        feature_real, feature_reconstruction = features[:batch], features[batch: 2 * batch]
        logit_real, logit_reconstruction, logit_prior = (
            logits[:batch], logits[batch: 2 * batch], logits[2 * batch:]
        )

        # V's loss with the frames as their own reconstruction is exactly V's floored KL term
        # (its pixel term is 0), so the floor is the same code as V's.
        floored_kl, _, kl = vae_loss(x, x, mu, logvar, self.kl_tolerance)
        feature_loss = 0.5 * ops.mean(ops.sum(ops.square(feature_real - feature_reconstruction), axis=(1, 2, 3)))
        pixel_sum = ops.mean(ops.sum(ops.square(x - reconstruction), axis=(1, 2, 3)))
        d_loss, g_loss, real_cost, fake_cost = self._adversarial(logit_real, logit_reconstruction, logit_prior)
        pixel_term = self.pixel_weight * pixel_sum
        return {
            "kl_loss": kl,
            "feature_loss": feature_loss,
            "gan_d_loss": d_loss,
            "gan_g_loss": g_loss,
            "pixel_mse": pixel_sum / float(np.prod(FRAME_SHAPE)),
            "enc_loss": floored_kl + feature_loss + pixel_term,
            "dec_loss": self.gamma * feature_loss + g_loss + pixel_term,
            "disc_loss": d_loss,
            "real_cost": real_cost,
            "fake_cost": fake_cost,
            "reconstruction": reconstruction,
            "prior_sample": prior_sample,
        }

    def _critic_losses(self, x, reconstruction, prior_sample, gp_seed):
        """``(disc_loss, gan_d_loss)`` of the 'wgan-gp' critic against fixed generated frames."""
        _, logits = self.discriminator(ops.concatenate([x, reconstruction, prior_sample], axis=0), training=True)
        batch = ops.shape(x)[0]
        d_loss, _, _, _ = self._adversarial(logits[:batch], logits[batch: 2 * batch], logits[2 * batch:])
        penalty = self.gradient_penalty(
            ops.concatenate([x, x], axis=0), ops.concatenate([reconstruction, prior_sample], axis=0), gp_seed
        )
        return d_loss + self.gp_weight * penalty, d_loss

    # ------------------------------------------------------------------ training

    def _scaled(self, player, loss):
        """``loss`` as ``player``'s optimizer differentiates it; call inside the tape.

        Under tf.distribute the replicas' gradients are summed, so each replica scales its loss
        by 1 / replicas to get the gradient of the global-batch mean (as ConvVAE does), and a
        LossScaleOptimizer (mixed precision) multiplies it by its loss scale.
        """
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return getattr(self.optimizer, player).scale_loss(loss / float(replicas))

    def _apply(self, player, tape, scaled_loss, condition=None):
        """One update of ``player`` down the gradient of its loss, skipped where ``condition`` is False."""
        optimizer = getattr(self.optimizer, player)
        weights = self.player_weights(player)
        gradients = tape.gradient(scaled_loss, weights)
        if condition is None:
            optimizer.apply_gradients(zip(gradients, weights))
        elif tf.__internal__.distribute.strategy_supports_no_merge_call():

            def update():
                optimizer.apply_gradients(zip(gradients, weights))  # both branches return nothing

            ops.cond(condition, update, lambda: None)
        else:
            # A strategy that synchronises updates with merge_call (MirroredStrategy) refuses a
            # cond around apply_gradients in replica context, so the cond goes in cross-replica
            # context, as keras' LossScaleOptimizer does to skip non-finite steps.
            def cross_replica(distribution, gradients, condition):
                def update():
                    distribution.extended.call_for_each_replica(
                        lambda g: optimizer.apply_gradients(zip(g, weights)), args=(gradients,))

                # Every replica holds the same all-reduced condition: take the first one's.
                ops.cond(distribution.experimental_local_results(condition)[0], update, lambda: None)

            tf.distribute.get_replica_context().merge_call(cross_replica, args=(gradients, condition))

    def _equilibrium_gates(self, real_cost, fake_cost):
        """``(update_decoder, update_discriminator)`` booleans of the authors' equilibrium rule."""
        low, high = EQUILIBRIUM - self.equilibrium_margin, EQUILIBRIUM + self.equilibrium_margin
        # The decision must be the same on every replica: take the global batch's costs.
        context = tf.distribute.get_replica_context()
        if context is not None:
            real_cost, fake_cost = context.all_reduce(tf.distribute.ReduceOp.MEAN, [real_cost, fake_cost])
        update_disc = tf.logical_not(tf.logical_or(real_cost < low, fake_cost < low))
        update_dec = tf.logical_not(tf.logical_or(real_cost > high, fake_cost > high))
        # If both would be skipped, train both (as the authors did).
        neither = tf.logical_not(tf.logical_or(update_disc, update_dec))
        return tf.logical_or(update_dec, neither), tf.logical_or(update_disc, neither)

    def _update_metrics(self, losses):
        for name, tracker in self._trackers.items():
            tracker.update_state(losses[name])
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def train_step(self, data):
        x = to_float_frames(_frames_from_data(data))
        eps, z_prior = self._sample_noise(ops.shape(x)[0], training=True)
        if self.adversarial == "gan":
            with tf.GradientTape(persistent=True) as tape:
                losses = self._player_losses(x, eps, z_prior, training=True)
                scaled = {player: self._scaled(player, losses[name]) for player, name in _PLAYER_LOSSES.items()}
            update_dec = update_disc = None
            if self.equilibrium_margin is not None:
                update_dec, update_disc = self._equilibrium_gates(losses["real_cost"], losses["fake_cost"])
            self._apply("encoder", tape, scaled["encoder"])
            self._apply("decoder", tape, scaled["decoder"], update_dec)
            self._apply("discriminator", tape, scaled["discriminator"], update_disc)
            del tape
            return self._update_metrics(losses)

        # 'wgan-gp': the critic first, against generated frames that stay fixed while it learns.
        _, _, reconstruction, prior_sample = self._generate(x, eps, z_prior, training=True)
        reconstruction, prior_sample = ops.stop_gradient(reconstruction), ops.stop_gradient(prior_sample)
        for _ in range(self.critic_steps):
            with tf.GradientTape() as tape:
                disc_loss, d_loss = self._critic_losses(x, reconstruction, prior_sample, self.seed_generator)
                scaled_disc_loss = self._scaled("discriminator", disc_loss)
            self._apply("discriminator", tape, scaled_disc_loss)
        # Then the encoder and decoder against the updated critic, on the same noise.
        with tf.GradientTape(persistent=True) as tape:
            losses = self._player_losses(x, eps, z_prior, training=True)
            scaled = {player: self._scaled(player, losses[_PLAYER_LOSSES[player]])
                      for player in ("encoder", "decoder")}
        self._apply("encoder", tape, scaled["encoder"])
        self._apply("decoder", tape, scaled["decoder"])
        del tape
        # D's numbers are those of the last critic step (before its update), so that
        # disc_loss - gan_d_loss is gp_weight times the penalty it was trained on.
        losses.update(disc_loss=disc_loss, gan_d_loss=d_loss)
        return self._update_metrics(losses)

    def _evaluation_losses(self, x):
        """All losses of float frames x at the posterior mean, with fixed prior samples and GP weights."""
        eps, z_prior = self._sample_noise(ops.shape(x)[0], training=False)
        losses = self._player_losses(x, eps, z_prior, training=False)
        if self.adversarial == "wgan-gp":
            losses["disc_loss"], _ = self._critic_losses(
                x, losses["reconstruction"], losses["prior_sample"], _EVAL_GP_SEED
            )
        return losses

    def test_step(self, data):
        return self._update_metrics(self._evaluation_losses(to_float_frames(_frames_from_data(data))))

    def evaluate_losses(self, frames):
        """``test_step``'s losses on frames (B, 64, 64, 3) uint8/float: ``{name: float}``, metrics untouched."""
        shape = getattr(frames, "shape", None) or np.shape(frames)
        if len(shape) != 4 or tuple(shape[1:]) != FRAME_SHAPE:
            raise ValueError(f"frames must have shape (batch, 64, 64, 3), got {tuple(shape)}.")
        losses = self._evaluation_losses(ops.convert_to_tensor(to_float_frames(frames)))
        return {name: float(ops.convert_to_numpy(losses[name])) for name in self._trackers}

    # ------------------------------------------------------------------ saving

    def get_config(self):
        config = super().get_config()
        config.update(
            z_size=self.z_size, kl_tolerance=self.kl_tolerance, gamma=self.gamma, adversarial=self.adversarial,
            gp_weight=self.gp_weight, critic_steps=self.critic_steps, pixel_weight=self.pixel_weight,
            equilibrium_margin=self.equilibrium_margin, seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_vae_gan(cfg_vae, cfg_vae_gan, pixel_weight=0.0, equilibrium_margin=None):
    """A compiled :class:`VAEGAN` from ``config.VAEConfig`` and ``config.VAEGANConfig``.

    z_size, kl_tolerance and seed come from ``cfg_vae``; gamma, adversarial, gp_weight and
    critic_steps from ``cfg_vae_gan``. Optimizers: 'gan' -> three RMSprop(``learning_rate``);
    'wgan-gp' -> three Adam(1e-4, beta_1 0, beta_2 0.9) (``learning_rate`` is RMSprop's).
    Call inside ``strategy.scope()`` when distributing.
    """
    model = VAEGAN(
        z_size=cfg_vae.z_size, kl_tolerance=cfg_vae.kl_tolerance, seed=cfg_vae.seed,
        gamma=cfg_vae_gan.gamma, adversarial=cfg_vae_gan.adversarial, gp_weight=cfg_vae_gan.gp_weight,
        critic_steps=cfg_vae_gan.critic_steps, pixel_weight=pixel_weight, equilibrium_margin=equilibrium_margin,
    )
    rate = cfg_vae_gan.learning_rate if cfg_vae_gan.adversarial == "gan" else None
    model.compile(*(default_optimizer(cfg_vae_gan.adversarial, rate) for _ in _PLAYERS))
    return model
