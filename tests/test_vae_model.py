"""Tests of models/vae.py: the paper's architecture, the KL floor, dtypes, saving, training."""

import keras
import numpy as np
import pytest

from models.vae import (
    Conv2DTransposeFrom1x1,
    ConvVAE,
    active_dimensions,
    build_decoder,
    build_encoder,
    kl_per_dimension,
    parameter_counts,
    reconstruction_metrics,
    to_float_frames,
    vae_loss,
)

Z = 32


def structured_frames(n=8, seed=0):
    """uint8 (n, 64, 64, 3): a coloured background with one bright rectangle per frame."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, 64, 64, 3), np.uint8)
    for i in range(n):
        frames[i] = rng.integers(0, 120, size=3, dtype=np.uint8)
        top, left = rng.integers(0, 40, size=2)
        frames[i, top : top + 20, left : left + 20] = rng.integers(150, 256, size=3, dtype=np.uint8)
    return frames


@pytest.fixture(scope="module")
def model():
    return ConvVAE(z_size=Z, seed=1)


def numpy_vae_loss(frames, recon, mu, logvar, kl_tolerance):
    """Independent numpy version of the paper's loss (float64)."""
    x = frames.astype(np.float64) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float64)
    recon_b = np.square(x - recon).reshape(len(x), -1).sum(axis=1)
    kl_b = -0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar), axis=1)
    loss = np.mean(recon_b + np.maximum(kl_b, kl_tolerance * mu.shape[1]))
    return loss, recon_b.mean(), kl_b.mean()


# --------------------------------------------------------------------------- architecture


def test_parameter_counts_match_the_paper():
    assert build_encoder(32).count_params() == 755_744
    assert build_decoder(32).count_params() == 3_592_803
    assert parameter_counts(32) == {"encoder": 755_744, "decoder": 3_592_803, "total": 4_348_547}


def test_intermediate_spatial_sizes(model):
    enc = [l.output.shape[1:3] for l in model.encoder.layers if isinstance(l, keras.layers.Conv2D)]
    dec = [
        l.output.shape[1:3] for l in model.decoder.layers if isinstance(l, keras.layers.Conv2DTranspose)
    ]
    assert enc == [(31, 31), (14, 14), (6, 6), (2, 2)]
    assert dec == [(5, 5), (13, 13), (30, 30), (64, 64)]


def test_output_shapes_and_ranges(model):
    frames = structured_frames(3)
    mu, logvar = model.encoder(to_float_frames(frames))
    assert tuple(mu.shape) == (3, Z) and tuple(logvar.shape) == (3, Z)
    decoded = keras.ops.convert_to_numpy(model.decoder(mu))
    assert decoded.shape == (3, 64, 64, 3)
    reconstruction = keras.ops.convert_to_numpy(model(frames))
    assert reconstruction.shape == (3, 64, 64, 3) and reconstruction.dtype == np.float32
    assert reconstruction.min() >= 0.0 and reconstruction.max() <= 1.0
    # call() reconstructs from the posterior mean, so it equals decoding mu.
    np.testing.assert_allclose(reconstruction, decoded, atol=1e-6)


def test_encode_decode_are_chunked_and_numpy(model):
    frames = structured_frames(5)
    mu_all, logvar_all = model.encode(frames)
    mu_chunked, logvar_chunked = model.encode(frames, chunk_size=2)
    assert isinstance(mu_all, np.ndarray) and mu_all.shape == (5, Z) and mu_all.dtype == np.float32
    np.testing.assert_allclose(mu_chunked, mu_all, atol=1e-5)
    np.testing.assert_allclose(logvar_chunked, logvar_all, atol=1e-5)
    decoded = model.decode(mu_all, chunk_size=3)
    assert decoded.shape == (5, 64, 64, 3) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, model.decode(mu_all), atol=1e-6)


def test_bad_inputs_raise_value_error(model):
    with pytest.raises(ValueError, match="64, 64, 3"):
        model.encode(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(np.full((1, 64, 64, 3), 200.0, np.float32))
    with pytest.raises(ValueError, match="uint8"):
        to_float_frames(np.zeros((1, 64, 64, 3), np.int64))
    with pytest.raises(ValueError, match="z must have shape"):
        model.decode(np.zeros((2, Z + 1), np.float32))
    with pytest.raises(ValueError, match="z_size"):
        ConvVAE(z_size=0)


def test_to_float_frames():
    frames = np.array([[0, 51, 255]], np.uint8)
    np.testing.assert_array_equal(to_float_frames(frames), np.array([[0.0, 0.2, 1.0]], np.float32))
    floats = np.array([0.25, 0.5], np.float64)
    assert to_float_frames(floats).dtype == np.float32
    tensor = to_float_frames(keras.ops.convert_to_tensor(frames))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(tensor), [[0.0, 0.2, 1.0]], atol=1e-7)


# --------------------------------------------------------------------------- loss


@pytest.mark.parametrize("kl_tolerance", [0.5, 0.0, 0.25])
@pytest.mark.parametrize("mu_scale", [0.0, 0.3, 2.0])
def test_vae_loss_matches_numpy(kl_tolerance, mu_scale):
    rng = np.random.default_rng(3)
    frames = structured_frames(4, seed=3)
    recon = rng.uniform(0, 1, size=frames.shape).astype(np.float32)
    mu = (mu_scale * rng.standard_normal((4, Z))).astype(np.float32)
    logvar = (0.1 * rng.standard_normal((4, Z))).astype(np.float32)
    got = [float(v) for v in vae_loss(frames, recon, mu, logvar, kl_tolerance)]
    np.testing.assert_allclose(got, numpy_vae_loss(frames, recon, mu, logvar, kl_tolerance), rtol=1e-5)


def test_kl_floor_below_above_and_disabled():
    frames = structured_frames(2).astype(np.float32) / 255.0
    recon = np.full_like(frames, 0.5)
    recon_loss = np.square(frames - recon).reshape(2, -1).sum(axis=1).mean()
    logvar = np.zeros((2, Z), np.float32)

    # Below the floor: mu = 0.5 everywhere gives KL = 0.5 * 32 * 0.25 = 4 nats < 16.
    small_mu = np.full((2, Z), 0.5, np.float32)
    loss, rec, kl = (float(v) for v in vae_loss(frames, recon, small_mu, logvar, 0.5))
    assert kl < 0.5 * Z
    np.testing.assert_allclose(rec, recon_loss, rtol=1e-6)
    np.testing.assert_allclose(loss, recon_loss + 0.5 * Z, rtol=1e-6)
    # kl_tolerance = 0 disables the floor.
    loss0, _, kl0 = (float(v) for v in vae_loss(frames, recon, small_mu, logvar, 0.0))
    np.testing.assert_allclose(loss0, recon_loss + kl0, rtol=1e-6)
    assert loss0 < loss

    # Above the floor (mu = 2: KL = 64 nats) the floor changes nothing.
    big_mu = np.full((2, Z), 2.0, np.float32)
    loss_floor, _, kl_big = (float(v) for v in vae_loss(frames, recon, big_mu, logvar, 0.5))
    loss_free, _, _ = (float(v) for v in vae_loss(frames, recon, big_mu, logvar, 0.0))
    assert kl_big > 0.5 * Z
    np.testing.assert_allclose(loss_floor, loss_free, rtol=1e-6)
    np.testing.assert_allclose(loss_floor, recon_loss + kl_big, rtol=1e-6)


def test_kl_floor_is_applied_per_frame_before_the_mean():
    # One frame far below the floor (KL 0) and one above it (KL 64): the batch-mean KL (32) is
    # above the floor, so floor-after-mean would give recon + 32; per frame it is recon + (16 + 64) / 2.
    frames = np.zeros((2, 64, 64, 3), np.float32)
    recon = np.zeros_like(frames)
    mu = np.stack([np.zeros(Z), np.full(Z, 2.0)]).astype(np.float32)
    logvar = np.zeros((2, Z), np.float32)
    loss, rec, kl = (float(v) for v in vae_loss(frames, recon, mu, logvar, 0.5))
    kl_frames = 0.5 * np.sum(mu**2, axis=1)
    assert rec == 0.0
    np.testing.assert_allclose(kl, kl_frames.mean(), rtol=1e-6)
    np.testing.assert_allclose(loss, np.maximum(kl_frames, 0.5 * Z).mean(), rtol=1e-6)
    assert loss > kl


def test_uint8_and_float_frames_give_the_same_loss(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    frames = structured_frames(4)
    as_uint8 = model.test_on_batch(frames, return_dict=True)
    as_float = model.test_on_batch(frames.astype(np.float32) / 255.0, return_dict=True)
    assert set(as_uint8) == {"loss", "reconstruction_loss", "kl_loss"}
    for key in as_uint8:
        np.testing.assert_allclose(as_uint8[key], as_float[key], rtol=1e-5)


# --------------------------------------------------------------------------- training and saving


def test_train_steps_reduce_the_loss():
    keras.utils.set_random_seed(0)
    vae = ConvVAE(z_size=Z, seed=0)
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    frames = structured_frames(8)
    before = vae.evaluate(frames, batch_size=8, verbose=0, return_dict=True)
    history = vae.fit(frames, batch_size=8, epochs=6, verbose=0)
    after = vae.evaluate(frames, batch_size=8, verbose=0, return_dict=True)
    assert set(history.history) == {"loss", "reconstruction_loss", "kl_loss"}
    assert after["loss"] < 0.9 * before["loss"]


def test_fit_accepts_a_tf_data_dataset_of_uint8_tuples():
    import tensorflow as tf

    vae = ConvVAE(z_size=8, seed=0)
    vae.compile(optimizer=keras.optimizers.Adam(1e-4))
    frames = structured_frames(4)
    dataset = tf.data.Dataset.from_tensor_slices((frames,)).batch(2)
    history = vae.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_save_and_load_round_trip(tmp_path):
    vae = ConvVAE(z_size=Z, kl_tolerance=0.25, seed=2)
    vae.compile(optimizer=keras.optimizers.Adam(1e-3))
    frames = structured_frames(4)
    vae.fit(frames, batch_size=4, epochs=1, verbose=0)
    mu, logvar = vae.encode(frames)
    decoded = vae.decode(mu)

    path = tmp_path / "vae.keras"
    vae.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, ConvVAE)
    assert loaded.z_size == Z and loaded.kl_tolerance == 0.25
    loaded_mu, loaded_logvar = loaded.encode(frames)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_logvar, logvar)
    np.testing.assert_array_equal(loaded.decode(mu), decoded)

    weights = tmp_path / "vae.weights.h5"
    vae.save_weights(weights)
    fresh = ConvVAE(z_size=Z, seed=99)
    assert not np.allclose(fresh.encode(frames)[0], mu)
    fresh.load_weights(weights)
    np.testing.assert_array_equal(fresh.encode(frames)[0], mu)
    np.testing.assert_array_equal(fresh.decode(mu), decoded)


def test_mixed_precision_builds_trains_and_outputs_float32():
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        vae = ConvVAE(z_size=8, seed=0)
        assert vae.encoder.get_layer("enc_conv1").compute_dtype == "float16"
        vae.compile(optimizer=keras.optimizers.Adam(1e-4))
        assert isinstance(vae.optimizer, keras.optimizers.LossScaleOptimizer)
        frames = structured_frames(2)
        logs = vae.train_on_batch(frames, return_dict=True)
        assert all(np.isfinite(v) for v in logs.values())
        mu, logvar = vae.encoder(to_float_frames(frames))
        assert mu.dtype == "float32" and logvar.dtype == "float32"
        assert vae(frames).dtype == "float32"
        assert vae.decode(vae.encode(frames)[0]).dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.mixed_precision.global_policy().name == "float32"


# --------------------------------------------------------------------------- numpy metrics


def test_reconstruction_metrics_by_hand():
    originals = np.zeros((2, 2, 2, 1), np.float32)
    reconstructions = originals.copy()
    reconstructions[0] = 0.1  # frame MSE 0.01 -> 20 dB
    reconstructions[1, 0, 0, 0] = 0.2  # frame MSE 0.04 / 4 = 0.01 -> 20 dB
    metrics = reconstruction_metrics(originals, reconstructions)
    np.testing.assert_allclose(metrics["mse"], 0.01, rtol=1e-6)
    np.testing.assert_allclose(metrics["psnr"], 20.0, rtol=1e-6)

    # PSNR is the mean of per-frame PSNRs, not the PSNR of the mean MSE.
    reconstructions[1] = 0.0
    reconstructions[1, 0, 0, 0] = 1.0  # frame MSE 0.25 -> 10 log10(4) dB
    metrics = reconstruction_metrics(originals, reconstructions)
    np.testing.assert_allclose(metrics["mse"], (0.01 + 0.25) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["psnr"], (20.0 + 10 * np.log10(4.0)) / 2, rtol=1e-6)
    assert reconstruction_metrics(originals, originals)["psnr"] > 90.0

    as_uint8 = reconstruction_metrics(np.zeros((1, 2, 2, 1), np.uint8), np.full((1, 2, 2, 1), 255, np.uint8))
    np.testing.assert_allclose([as_uint8["mse"], as_uint8["psnr"]], [1.0, 0.0], atol=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        reconstruction_metrics(originals, originals[:1])


def test_kl_per_dimension_by_hand():
    mu = np.array([[0.0, 1.0, 2.0], [0.0, -1.0, 0.0]])
    logvar = np.array([[0.0, 0.0, np.log(2.0)], [0.0, 0.0, 0.0]])
    expected = [0.0, 0.5, (0.5 * (4.0 + 2.0 - 1.0 - np.log(2.0)) + 0.0) / 2]
    np.testing.assert_allclose(kl_per_dimension(mu, logvar), expected, rtol=1e-9)
    # Summed over dimensions it is the per-frame KL of the loss.
    kl_frames = -0.5 * np.sum(1 + logvar - mu**2 - np.exp(logvar), axis=1)
    np.testing.assert_allclose(kl_per_dimension(mu, logvar).sum(), kl_frames.mean(), rtol=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        kl_per_dimension(mu, logvar[:, :2])


def test_active_dimensions_by_hand():
    mu = np.array(
        [
            [0.0, 5.0, 0.00, 1.0],
            [1.0, 5.0, 0.05, -1.0],
            [0.0, 5.0, 0.00, 1.0],
            [1.0, 5.0, 0.05, -1.0],
        ]
    )
    # Variances over frames: 0.25, 0 (constant, however large), 0.000625, 1.
    assert active_dimensions(mu) == 2
    assert active_dimensions(mu, threshold=0.0005) == 3
    assert active_dimensions(mu, threshold=2.0) == 0
    with pytest.raises(ValueError, match=r"\(N, Z\)"):
        active_dimensions(mu[0])


# --------------------------------------------------------------------------- the 1x1 transposed convolution
@pytest.mark.parametrize("activation", [None, "relu"])
def test_conv_transpose_from_1x1_equals_keras_conv_transpose_with_gradients(activation):
    """Same weights -> same outputs and same gradients as keras' Conv2DTranspose, on a 1x1 input and a larger one."""
    import tensorflow as tf

    rng = np.random.default_rng(21)
    for shape in [(3, 1, 1, 16), (2, 3, 3, 16)]:  # the fast path, and the fallback to the parent
        x = tf.constant(rng.normal(size=shape).astype(np.float32))
        plain = keras.layers.Conv2DTranspose(8, 5, strides=2, padding="valid", activation=activation)
        fast = Conv2DTransposeFrom1x1(8, 5, strides=2, padding="valid", activation=activation)
        plain.build(shape)
        fast.build(shape)
        fast.kernel.assign(plain.kernel)
        fast.bias.assign(rng.normal(size=8).astype(np.float32))
        plain.bias.assign(fast.bias)
        grads = []
        for layer in (plain, fast):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
                loss = tf.reduce_sum(y * tf.cos(y))
            grads.append((y, *tape.gradient(loss, [x, layer.kernel, layer.bias])))
        for a, b in zip(*grads):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_decoder_uses_the_1x1_layer_and_it_round_trips_through_keras_files(tmp_path):
    decoder = ConvVAE(z_size=8, seed=0).decoder
    assert isinstance(decoder.get_layer("dec_deconv1"), Conv2DTransposeFrom1x1)
    path = tmp_path / "decoder.keras"
    decoder.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.get_layer("dec_deconv1"), Conv2DTransposeFrom1x1)
    z = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    np.testing.assert_array_equal(loaded(z), decoder(z))
