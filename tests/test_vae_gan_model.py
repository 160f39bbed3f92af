"""Tests of vae_gan/model.py: V's shapes and API, each player's objective, the gradient penalty, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.vae import ConvVAE, build_decoder, build_encoder
from vae_gan.model import (
    _EVAL_GP_SEED,
    _EVAL_PRIOR_SEED,
    EQUILIBRIUM,
    VAEGAN,
    PlayerOptimizers,
    build_discriminator,
    build_vae_gan,
    critic_gradient_penalty,
    interpolation_weights,
)

Z = 32
BATCH = 4
PLAYERS = ("encoder", "decoder", "discriminator")
OWN_LOSS = {"encoder": "enc_loss", "decoder": "dec_loss", "discriminator": "disc_loss"}
METRICS = {"kl_loss", "feature_loss", "gan_d_loss", "gan_g_loss", "pixel_mse", "enc_loss", "dec_loss",
           "disc_loss"}


def structured_frames(n=BATCH, seed=0):
    """uint8 (n, 64, 64, 3): a coloured background with one bright rectangle per frame."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, 64, 64, 3), np.uint8)
    for i in range(n):
        frames[i] = rng.integers(0, 120, size=3, dtype=np.uint8)
        top, left = rng.integers(0, 40, size=2)
        frames[i, top : top + 20, left : left + 20] = rng.integers(150, 256, size=3, dtype=np.uint8)
    return frames


@pytest.fixture(scope="module")
def models():
    """One compiled model per objective, shared so each traces its train function once."""
    keras.utils.set_random_seed(0)
    out = {}
    for adversarial in ("gan", "wgan-gp"):
        model = VAEGAN(z_size=Z, adversarial=adversarial, critic_steps=2, seed=0)
        model.compile(*(keras.optimizers.Adam(1e-4) for _ in PLAYERS))
        out[adversarial] = model
    return out


def weights_of(model, player):
    return [w.numpy().copy() for w in model.player_weights(player)]


# --------------------------------------------------------------------------- architecture and API


def test_encoder_and_decoder_are_vs(models):
    model = models["gan"]
    # The paper's V: 755,744 + 3,592,803 parameters, and the very same layer layout as ConvVAE's.
    assert model.encoder.count_params() == 755_744 == build_encoder(Z).count_params()
    assert model.decoder.count_params() == 3_592_803 == build_decoder(Z).count_params()
    vae = ConvVAE(z_size=Z)
    for ours, theirs in ((model.encoder, vae.encoder), (model.decoder, vae.decoder)):
        assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]


def test_discriminator_shapes_and_dtypes(models):
    frames = structured_frames(3)
    features, logit = models["gan"].discriminator_features(frames)
    assert tuple(features.shape) == (3, 6, 6, 128) and tuple(logit.shape) == (3, 1)
    assert features.dtype == "float32" and logit.dtype == "float32"
    # Dis_l is the 3rd convolution's activation; the logit is computed from the full stack.
    disc = models["gan"].discriminator
    third = keras.Model(disc.inputs[0], disc.get_layer("disc_lrelu3").output)
    np.testing.assert_allclose(features, third(frames / 255.0), rtol=1e-5, atol=1e-6)
    assert [l.output.shape[1:3] for l in build_discriminator().layers if isinstance(l, keras.layers.Conv2D)] == [
        (31, 31), (14, 14), (6, 6), (2, 2)]


def test_player_weights_partition_the_model(models):
    model = models["gan"]
    ids = [{id(w) for w in model.player_weights(p)} for p in PLAYERS]
    assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set.union(*ids) == {id(w) for w in model.trainable_weights}
    with pytest.raises(ValueError, match="player"):
        model.player_weights("generator")


def test_encode_decode_api_matches_convvae(models):
    model, vae = models["gan"], ConvVAE(z_size=Z, seed=0)
    frames = structured_frames(5)
    for v in (model, vae):
        mu, logvar = v.encode(frames, chunk_size=2)
        assert isinstance(mu, np.ndarray) and mu.shape == logvar.shape == (5, Z) and mu.dtype == np.float32
        np.testing.assert_allclose(mu, v.encode(frames)[0], atol=1e-5)
        decoded = v.decode(mu, chunk_size=3)
        assert isinstance(decoded, np.ndarray) and decoded.shape == (5, 64, 64, 3) and decoded.dtype == np.float32
        called = keras.ops.convert_to_numpy(v(frames))
        assert called.shape == (5, 64, 64, 3) and called.dtype == np.float32
        assert 0.0 <= called.min() and called.max() <= 1.0
        empty_mu, _ = v.encode(np.zeros((0, 64, 64, 3), np.uint8))
        assert empty_mu.shape == (0, Z)
    with pytest.raises(ValueError, match="64, 64, 3"):
        model.encode(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(np.full((1, 64, 64, 3), 200.0, np.float32))
    with pytest.raises(ValueError, match="z must have shape"):
        model.decode(np.zeros((2, Z + 1), np.float32))


def test_bad_arguments_raise_value_error(models):
    with pytest.raises(ValueError, match="adversarial"):
        VAEGAN(adversarial="lsgan")
    with pytest.raises(ValueError, match="critic_steps"):
        VAEGAN(critic_steps=0)
    with pytest.raises(ValueError, match="gamma"):
        VAEGAN(gamma=-1.0)
    with pytest.raises(ValueError, match="equilibrium_margin"):
        VAEGAN(adversarial="wgan-gp", equilibrium_margin=0.4)
    with pytest.raises(ValueError, match="enc_optimizer"):
        models["gan"].compile(optimizer="adam")
    with pytest.raises(ValueError, match="own optimizer"):
        shared = keras.optimizers.Adam()
        VAEGAN(z_size=4).compile(shared, shared, shared)


# --------------------------------------------------------------------------- the players' objectives


def training_objectives(model, frames, state):
    """Each player's training loss with the noise that a train step starting from seed ``state`` draws.

    A train step draws eps and the prior samples first (then, for 'wgan-gp', the interpolation
    weights of its first critic step), so resetting the seed generator to ``state`` makes these
    the very losses whose gradients that step follows.
    """
    model.seed_generator.state.assign(state)
    x = tf.constant(frames.astype(np.float32) / 255.0)
    eps, z_prior = model._sample_noise(len(frames), training=True)
    losses = model._player_losses(x, eps, z_prior, training=True)
    if model.adversarial == "wgan-gp":
        losses["disc_loss"], _ = model._critic_losses(
            x, losses["reconstruction"], losses["prior_sample"], model.seed_generator)
    return {name: float(losses[name]) for name in OWN_LOSS.values()}


@pytest.mark.parametrize("adversarial", ["gan", "wgan-gp"])
def test_each_player_decreases_its_own_loss_with_the_others_frozen(models, adversarial):
    model = models[adversarial]
    frames = structured_frames(BATCH, seed=1)
    rates = {player: getattr(model.optimizer, player).learning_rate for player in PLAYERS}
    state = model.seed_generator.state.numpy()
    try:
        for player in PLAYERS:
            # A zero learning rate freezes a player without retracing the train function.
            for other, rate in rates.items():
                rate.assign(1e-4 if other == player else 0.0)
            frozen = {other: weights_of(model, other) for other in PLAYERS if other != player}
            before = training_objectives(model, frames, state)
            for _ in range(3):
                model.seed_generator.state.assign(state)  # the same noise every step: a fixed objective
                logs = model.train_on_batch(frames, return_dict=True)
            after = training_objectives(model, frames, state)
            assert set(logs) == METRICS and all(np.isfinite(v) for v in logs.values())
            own = OWN_LOSS[player]
            assert after[own] < before[own], f"{adversarial}: {player}'s {own} went {before[own]} -> {after[own]}"
            for other, values in frozen.items():
                for old, new in zip(values, weights_of(model, other)):
                    np.testing.assert_array_equal(old, new)
    finally:
        for rate in rates.values():
            rate.assign(1e-4)


@pytest.mark.parametrize("adversarial", ["gan", "wgan-gp"])
def test_loss_formulas_on_a_batch(models, adversarial):
    model = models[adversarial]
    frames = structured_frames(BATCH, seed=2)
    x = frames.astype(np.float32) / 255.0
    losses = model.evaluate_losses(frames)
    # Evaluation decodes the posterior mean and fixed prior samples.
    mu, logvar = model.encode(frames)
    reconstruction = model.decode(mu)
    prior = model.decode(keras.ops.convert_to_numpy(keras.random.normal((BATCH, Z), seed=_EVAL_PRIOR_SEED)))

    def features_and_logit(frames):
        return (keras.ops.convert_to_numpy(t).astype(np.float64) for t in model.discriminator_features(frames))

    f_real, l_real = features_and_logit(x)
    f_rec, l_rec = features_and_logit(reconstruction)
    _, l_prior = features_and_logit(prior)
    kl = (-0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar), axis=1)).astype(np.float64)
    feature = 0.5 * np.square(f_real - f_rec).reshape(BATCH, -1).sum(axis=1).mean()
    if adversarial == "gan":
        softplus = lambda t: np.logaddexp(0.0, t)  # noqa: E731
        gan_d = softplus(-l_real).mean() + 0.5 * (softplus(l_rec).mean() + softplus(l_prior).mean())
        gan_g = softplus(-l_rec).mean() + softplus(-l_prior).mean()
        disc = gan_d
    else:
        gan_d = 0.5 * (l_rec.mean() + l_prior.mean()) - l_real.mean()
        gan_g = -(l_rec.mean() + l_prior.mean())
        penalty = model.gradient_penalty(np.concatenate([x, x]), np.concatenate([reconstruction, prior]),
                                         weights_seed=_EVAL_GP_SEED)
        disc = gan_d + model.gp_weight * float(penalty)
    expected = {
        "kl_loss": kl.mean(),
        "feature_loss": feature,
        "gan_d_loss": gan_d,
        "gan_g_loss": gan_g,
        "pixel_mse": np.square(x - reconstruction).mean(),
        "enc_loss": np.maximum(kl, 0.5 * Z).mean() + feature,
        "dec_loss": model.gamma * feature + gan_g,
        "disc_loss": disc,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(losses[name], value, rtol=2e-4, atol=1e-5, err_msg=name)


def test_equilibrium_gates():
    model = VAEGAN(z_size=4, equilibrium_margin=0.4)

    def gates(real, fake):
        return [bool(g) for g in model._equilibrium_gates(tf.constant(real), tf.constant(fake))]

    # Returns (update_decoder, update_discriminator).
    assert gates(EQUILIBRIUM, EQUILIBRIUM) == [True, True]
    assert gates(0.1, 0.7) == [True, False]  # D far ahead on real frames: skip D.
    assert gates(0.7, 1.5) == [False, True]  # D far behind: skip the decoder.
    assert gates(0.1, 1.5) == [True, True]  # both would be skipped: train both, as the authors did.


# --------------------------------------------------------------------------- gradient penalty


def test_gradient_penalty_matches_full_finite_differences_in_float64():
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.standard_normal((3, 3, 2, 4)), tf.float64)
    dense = tf.constant(rng.standard_normal((5 * 5 * 4, 1)) * 0.3, tf.float64)

    def critic(x):  # a small smooth convolutional critic on (B, 7, 7, 2), in float64
        h = tf.tanh(tf.nn.conv2d(x, kernel, strides=1, padding="VALID"))
        return tf.matmul(tf.reshape(h, (-1, 5 * 5 * 4)), dense)

    real = rng.uniform(0, 1, (3, 7, 7, 2))
    fake = rng.uniform(0, 1, (3, 7, 7, 2))
    weights = np.array([0.2, 0.5, 0.9])
    penalty = float(critic_gradient_penalty(critic, tf.constant(real), tf.constant(fake), tf.constant(weights)))

    interpolates = weights[:, None, None, None] * real + (1 - weights[:, None, None, None]) * fake
    h = 1e-6
    norms = []
    for b in range(3):
        # Central differences along every coordinate, all perturbed copies in one critic call.
        basis = np.eye(7 * 7 * 2).reshape(-1, 7, 7, 2)
        up = critic(tf.constant(interpolates[b] + h * basis)).numpy()[:, 0]
        down = critic(tf.constant(interpolates[b] - h * basis)).numpy()[:, 0]
        norms.append(np.linalg.norm((up - down) / (2 * h)))
    expected = np.mean((np.array(norms) - 1.0) ** 2)
    assert expected > 1e-3  # the check is not trivially 0 = 0
    np.testing.assert_allclose(penalty, expected, rtol=1e-6)


def test_model_gradient_penalty_matches_directional_finite_differences(models):
    model = models["wgan-gp"]
    real = structured_frames(3, seed=3).astype(np.float32) / 255.0
    fake = model.decode(np.random.default_rng(3).standard_normal((3, Z)).astype(np.float32))
    penalty = float(model.gradient_penalty(real, fake, weights_seed=7))
    np.testing.assert_allclose(float(model.gradient_penalty(real, fake, weights_seed=7)), penalty, rtol=1e-6)

    w = keras.ops.convert_to_numpy(interpolation_weights(3, seed=7))[:, None, None, None]
    interpolates = tf.constant(w * real + (1 - w) * fake)
    with tf.GradientTape() as tape:
        tape.watch(interpolates)
        total = tf.reduce_sum(model.discriminator(interpolates)[1])
    direction = tape.gradient(total, interpolates).numpy()
    direction /= np.linalg.norm(direction.reshape(3, -1), axis=1)[:, None, None, None]
    # The critic is piecewise linear (LeakyReLU), so a central difference along the unit
    # gradient direction is the gradient's norm up to float32 rounding.
    h = 1e-2

    def critic(x):
        return model.discriminator(tf.constant(x, tf.float32))[1].numpy()[:, 0].astype(np.float64)

    at = interpolates.numpy()
    norms = (critic(at + h * direction) - critic(at - h * direction)) / (2 * h)
    np.testing.assert_allclose(penalty, np.mean((norms - 1.0) ** 2), rtol=2e-3)


# --------------------------------------------------------------------------- fit, evaluation, saving


@pytest.mark.parametrize("adversarial", ["gan", "wgan-gp"])
def test_fit_on_a_tf_data_dataset_of_uint8_frames_gives_finite_losses(models, adversarial):
    model = models[adversarial]
    frames = structured_frames(2 * BATCH, seed=4)
    dataset = tf.data.Dataset.from_tensor_slices((frames,)).batch(BATCH)
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False)
    assert set(history.history) == METRICS
    assert all(np.isfinite(values).all() for values in history.history.values())
    assert int(model.optimizer.iterations.numpy()) >= 4


def test_equilibrium_training_runs_and_uint8_and_float_give_the_same_test_loss():
    model = VAEGAN(z_size=Z, equilibrium_margin=0.4, pixel_weight=1.0, seed=0)
    model.compile(*(keras.optimizers.RMSprop(3e-4) for _ in PLAYERS))
    frames = structured_frames(BATCH, seed=5)
    logs = model.train_on_batch(frames, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    as_uint8 = model.test_on_batch(frames, return_dict=True)
    as_float = model.test_on_batch(frames.astype(np.float32) / 255.0, return_dict=True)
    assert set(as_uint8) == METRICS
    for name in METRICS:
        np.testing.assert_allclose(as_uint8[name], as_float[name], rtol=1e-5, err_msg=name)
    # test_step is repeatable: fixed prior samples, posterior means.
    np.testing.assert_allclose(model.test_on_batch(frames, return_dict=True)["dec_loss"], as_uint8["dec_loss"],
                               rtol=1e-6)
    # With pixel_weight 1 the pixel term is V's reconstruction loss: sum over the 12,288 pixels.
    losses = model.evaluate_losses(frames)
    np.testing.assert_allclose(
        losses["enc_loss"] - losses["feature_loss"],
        max(losses["kl_loss"], 0.5 * Z) + 64 * 64 * 3 * losses["pixel_mse"], rtol=1e-4)


def test_wgan_gp_uint8_and_float_give_the_same_losses(models):
    model = models["wgan-gp"]
    frames = structured_frames(BATCH, seed=6)
    as_uint8 = model.evaluate_losses(frames)
    as_float = model.evaluate_losses(frames.astype(np.float32) / 255.0)
    for name in METRICS:
        np.testing.assert_allclose(as_uint8[name], as_float[name], rtol=1e-5, err_msg=name)
    assert as_uint8["disc_loss"] > as_uint8["gan_d_loss"]  # the penalty is part of the critic's loss


def test_keras_and_weights_round_trip(models, tmp_path):
    model = models["wgan-gp"]
    frames = structured_frames(3, seed=7)
    mu, logvar = model.encode(frames)
    model.save(tmp_path / "vae_gan.keras")
    loaded = keras.models.load_model(tmp_path / "vae_gan.keras", compile=False)
    assert isinstance(loaded, VAEGAN)
    assert loaded.get_config() == model.get_config()
    mu2, logvar2 = loaded.encode(frames)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(logvar, logvar2)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded.discriminator_features(frames)[1]),
        keras.ops.convert_to_numpy(model.discriminator_features(frames)[1]))

    recompiled = keras.models.load_model(tmp_path / "vae_gan.keras")
    assert isinstance(recompiled.optimizer, PlayerOptimizers) and recompiled.optimizer.built
    assert type(recompiled.optimizer.discriminator) is type(model.optimizer.discriminator)

    model.save_weights(tmp_path / "vae_gan.weights.h5")
    fresh = VAEGAN.from_config(model.get_config())
    fresh.load_weights(tmp_path / "vae_gan.weights.h5")
    np.testing.assert_array_equal(fresh.encode(frames)[0], mu)


def test_build_vae_gan_from_config():
    import config

    cfg = config.make_config("smoke", {"vae_gan.adversarial": "wgan-gp", "vae_gan.critic_steps": 3,
                                       "vae.z_size": 8})
    model = build_vae_gan(cfg.vae, cfg.vae_gan)
    assert (model.z_size, model.adversarial, model.critic_steps, model.gamma) == (8, "wgan-gp", 3, cfg.vae_gan.gamma)
    adam = model.optimizer.discriminator
    assert isinstance(adam, keras.optimizers.Adam) and adam.beta_1 == 0.0 and adam.beta_2 == 0.9
    model.optimizer.build()
    assert model.optimizer.built and len(model.optimizer.variables) > 3
    gan = build_vae_gan(cfg.vae, config.make_config("smoke").vae_gan)
    assert isinstance(gan.optimizer.encoder, keras.optimizers.RMSprop)
    np.testing.assert_allclose(float(gan.optimizer.encoder.learning_rate), cfg.vae_gan.learning_rate)


@pytest.mark.parametrize("distributed", [False, True])
def test_a_skipped_update_leaves_the_weights_unchanged(distributed):
    # The equilibrium trick's conditional update, with and without a merge_call strategy.
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"]) if distributed else tf.distribute.get_strategy()
    with strategy.scope():
        model = VAEGAN(z_size=4, equilibrium_margin=0.4, seed=0)
        model.compile(*(keras.optimizers.SGD(0.1) for _ in PLAYERS))
        model.optimizer.build()
    x = tf.constant(structured_frames(2).astype(np.float32) / 255.0)

    def update(condition):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model.discriminator(x)[1])
        model._apply("discriminator", tape, loss, condition)

    step = tf.function(lambda condition: strategy.run(update, args=(condition,)))
    before = weights_of(model, "discriminator")
    step(tf.constant(False))
    for old, new in zip(before, weights_of(model, "discriminator")):
        np.testing.assert_array_equal(old, new)
    step(tf.constant(True))
    assert any(np.any(old != new) for old, new in zip(before, weights_of(model, "discriminator")))
