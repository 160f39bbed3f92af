"""Tests for M (models/mdn_rnn.py): shapes, mixture maths, temperature, masking, step, saving, the action head."""

import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.mdn_rnn import (
    LOG_SIGMA_MAX,
    LOG_SIGMA_MIN,
    MDNRNN,
    baseline_nlls,
    build_mdn_rnn,
    gaussian_nll,
    mixture_log_prob,
    mixture_nll,
    sample_mixture,
    scheduled_inputs,
    split_mixture,
)

# A small M keeps the model tests fast; the shapes of the paper's model are checked separately.
SMALL = dict(z_size=4, action_size=3, hidden_units=16, num_mixtures=3)


def make_batch(rng, lengths, total_length, z_size=4, action_size=3, pad_value=0.0):
    """Episodes of the given lengths padded at the end to ``total_length``; padding filled with ``pad_value``."""
    batch_size = len(lengths)
    batch = {
        "mu": rng.normal(size=(batch_size, total_length, z_size)),
        "logvar": rng.uniform(-3.0, -1.0, size=(batch_size, total_length, z_size)),
        "action": rng.uniform(-1.0, 1.0, size=(batch_size, total_length, action_size)),
        "reward": rng.normal(size=(batch_size, total_length)),
        "done": np.zeros((batch_size, total_length)),
        "mask": np.zeros((batch_size, total_length)),
    }
    for i, length in enumerate(lengths):
        batch["done"][i, length - 1] = 1.0
        batch["mask"][i, :length] = 1.0
        for key in ("mu", "logvar", "action", "reward", "done"):
            batch[key][i, length:] = pad_value
    return {key: value.astype(np.float32) for key, value in batch.items()}


def pad(batch, total_length, rng):
    """The same episodes padded further with garbage (including NaN and huge values)."""
    out = {}
    for key, value in batch.items():
        extra = total_length - value.shape[1]
        fill = rng.normal(scale=1e3, size=(value.shape[0], extra) + value.shape[2:]).astype(np.float32)
        if key == "mask":
            fill[:] = 0.0
        else:
            fill.reshape(-1)[0] = np.nan
        out[key] = np.concatenate([value, fill], axis=1)
    return out


def losses_np(model, batch):
    return {key: float(value) for key, value in model.compute_losses(batch).items()}


@pytest.fixture(scope="module")
def small_model():
    return MDNRNN(**SMALL, seed=0)


# --------------------------------------------------------------------------- shapes
def test_parameter_counts_match_the_paper():
    net = build_mdn_rnn(z_size=32, action_size=3)
    paper_part = net.get_layer("lstm").count_params() + net.get_layer("mdn").count_params()
    assert net.get_layer("lstm").count_params() == 299_008
    assert net.get_layer("mdn").count_params() == 123_360
    assert paper_part == 422_368
    assert net.get_layer("reward").count_params() == 257
    assert net.get_layer("done").count_params() == 257
    assert net.count_params() == 422_368 + 2 * 257
    assert build_mdn_rnn(reward_head=False, done_head=False).count_params() == 422_368
    outputs = net(np.zeros((2, 7, 35), np.float32))
    assert tuple(outputs["mdn"].shape) == (2, 7, 480)
    assert tuple(outputs["reward"].shape) == (2, 7)
    assert tuple(outputs["done"].shape) == (2, 7)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="dropout"):
        build_mdn_rnn(dropout=1.0)
    with pytest.raises(ValueError, match="z_size"):
        build_mdn_rnn(z_size=0)
    with pytest.raises(ValueError, match="last axis"):
        split_mixture(np.zeros((2, 479), np.float32), 32, 5)


# --------------------------------------------------------------------------- mixture maths
def test_split_mixture_bounds_normalisation_and_gradients():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(64, 3 * 5 * 32)) * 10.0 ** rng.integers(-2, 31, size=(64, 1))
    y = tf.constant(y, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(y)
        log_pi, mu, log_sigma = split_mixture(y, 32, 5)
        total = tf.reduce_sum(log_sigma)
    for tensor in (log_pi, mu, log_sigma):
        assert tuple(tensor.shape) == (64, 32, 5)
        assert np.isfinite(tensor.numpy()).all()
    assert log_sigma.numpy().min() >= LOG_SIGMA_MIN and log_sigma.numpy().max() <= LOG_SIGMA_MAX
    np.testing.assert_allclose(tf.reduce_logsumexp(log_pi, axis=-1).numpy(), 0.0, atol=1e-5)
    assert np.isfinite(tape.gradient(total, y).numpy()).all()

    # Raw 0 means sigma 1 (the prior's scale); past the bounds the gradient is small but alive.
    raw = tf.Variable([[0.0, -40.0, 40.0]])
    with tf.GradientTape() as tape:
        _, _, log_sigma = split_mixture(tf.concat([tf.zeros((1, 6)), raw], axis=-1), 1, 3)
    np.testing.assert_allclose(log_sigma.numpy()[0, 0, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(log_sigma.numpy()[0, 0, 1:], [LOG_SIGMA_MIN, LOG_SIGMA_MAX], atol=1e-6)
    assert (tape.jacobian(log_sigma, raw).numpy().reshape(3, 3).diagonal() > 0).all()


def brute_force_log_prob(x, log_pi, mu, log_sigma):
    """log sum_k pi_k N(x; mu_k, sigma_k) the naive way in float64 (-inf where the sum underflows)."""
    sigma = np.exp(log_sigma)
    density = np.exp(log_pi) * np.exp(-0.5 * ((x[..., None] - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    with np.errstate(divide="ignore"):
        return np.log(density.sum(axis=-1))


def test_mixture_log_prob_matches_brute_force_density():
    rng = np.random.default_rng(2)
    representable = underflowed = 0
    for _ in range(150):
        n, z, k = rng.integers(1, 6), rng.integers(1, 5), rng.integers(1, 7)
        logits = rng.normal(size=(n, z, k)) * rng.choice([0.1, 3.0, 50.0])
        log_pi = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        mu = rng.normal(size=(n, z, k)) * rng.choice([0.1, 1.0, 100.0])
        log_sigma = rng.uniform(LOG_SIGMA_MIN, LOG_SIGMA_MAX, size=(n, z, k))
        log_sigma[rng.random(size=log_sigma.shape) < 0.2] = LOG_SIGMA_MIN  # the extremes themselves
        log_sigma[rng.random(size=log_sigma.shape) < 0.2] = LOG_SIGMA_MAX
        x = mu[..., 0] + rng.normal(size=(n, z)) * rng.choice([0.01, 1.0, 30.0, 1e3])

        expected = brute_force_log_prob(x, log_pi, mu, log_sigma)
        got64 = mixture_log_prob(x, log_pi, mu, log_sigma).numpy()
        assert np.isfinite(got64).all()
        ok = np.isfinite(expected)
        representable += ok.sum()
        underflowed += (~ok).sum()
        np.testing.assert_allclose(got64[ok], expected[ok], rtol=1e-9, atol=1e-9)
        # Where the naive sum underflows, log-sum-exp lies between the best component and it + log K.
        best = np.max(log_pi - 0.5 * ((x[..., None] - mu) / np.exp(log_sigma)) ** 2 - log_sigma
                      - 0.5 * np.log(2 * np.pi), axis=-1)
        assert (got64 >= best - 1e-9 * np.abs(best)).all()
        assert (got64 <= best + np.log(k) + 1e-9 * np.abs(best)).all()

        # float32 (the training dtype): finite, and as exact as float32 allows for the same
        # (rounded) inputs; rounding the inputs themselves is not the function's error.
        inputs32 = [a.astype(np.float32) for a in (x, log_pi, mu, log_sigma)]
        got32 = mixture_log_prob(*inputs32).numpy()
        reference = mixture_log_prob(*(a.astype(np.float64) for a in inputs32)).numpy()
        assert got32.dtype == np.float32 and np.isfinite(got32).all()
        np.testing.assert_allclose(got32, reference, rtol=1e-5, atol=1e-4)
    assert representable > 100 and underflowed > 100  # both regimes were exercised


def test_mixture_nll_is_a_masked_mean_and_ignores_nan_in_masked_steps():
    rng = np.random.default_rng(3)
    log_pi = np.log(np.full((2, 5, 3, 2), 0.5))
    mu, log_sigma = rng.normal(size=(2, 5, 3, 2)), rng.uniform(-1, 1, size=(2, 5, 3, 2))
    x = rng.normal(size=(2, 5, 3))
    mask = np.ones((2, 5))
    mask[1, 3:] = 0
    log_prob = brute_force_log_prob(x, log_pi, mu, log_sigma)
    np.testing.assert_allclose(float(mixture_nll(x, log_pi, mu, log_sigma)), -log_prob.mean(), rtol=1e-9)
    expected = -log_prob[mask.astype(bool)].mean()
    x[1, 4] = np.nan
    mu[1, 3] = np.inf
    np.testing.assert_allclose(float(mixture_nll(x, log_pi, mu, log_sigma, mask)), expected, rtol=1e-9)
    np.testing.assert_allclose(float(mixture_nll(x, log_pi, mu, log_sigma, mask.astype(bool))), expected,
                               rtol=1e-9)
    assert float(mixture_nll(x, log_pi, mu, log_sigma, np.zeros((2, 5)))) == 0.0


# --------------------------------------------------------------------------- sampling and temperature
def mixture_parameters():
    log_pi = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.4, 0.35, 0.25]]))
    mu = np.array([[-2.0, 1.0, 3.0], [0.0, -1.5, 2.5], [1.0, -3.0, 0.5]])
    log_sigma = np.log(np.array([[0.5, 1.0, 0.3], [0.2, 0.8, 1.2], [1.0, 0.4, 0.6]]))
    return log_pi[None], mu[None], log_sigma[None]  # (1, Z=3, K=3)


def tempered_moments(log_pi, mu, log_sigma, tau):
    """Analytic mean, variance and 4th central moment of the tempered mixture (numpy, per dimension)."""
    logits = log_pi / tau
    pi = np.exp(logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True))
    var_k = np.exp(2 * log_sigma) * tau
    mean = (pi * mu).sum(-1)
    var = (pi * (var_k + mu**2)).sum(-1) - mean**2
    d = mu - mean[..., None]
    m4 = (pi * (d**4 + 6 * d**2 * var_k + 3 * var_k**2)).sum(-1)
    return mean, var, m4


def test_temperature_must_be_positive():
    log_pi, mu, log_sigma = mixture_parameters()
    for bad in (0.0, -1.0, float("nan"), np.array([1.0, 2.0])):
        with pytest.raises(ValueError, match="temperature"):
            sample_mixture(log_pi, mu, log_sigma, bad, seed=[1, 2])


def test_low_temperature_concentrates_on_the_most_likely_mean():
    log_pi, mu, log_sigma = (np.repeat(a, 2000, axis=0).astype(np.float32) for a in mixture_parameters())
    tau = 1e-3
    z = sample_mixture(log_pi, mu, log_sigma, tau, seed=[4, 5]).numpy()
    best = np.take_along_axis(mu, log_pi.argmax(-1)[..., None], -1)[..., 0]
    best_sigma = np.exp(np.take_along_axis(log_sigma, log_pi.argmax(-1)[..., None], -1)[..., 0])
    assert np.all(np.abs(z - best) < 6 * best_sigma * math.sqrt(tau))


@pytest.mark.parametrize("tau", [0.5, 1.0, 1.7])
def test_sample_moments_match_the_tempered_mixture(tau):
    n = 40_000
    params = mixture_parameters()
    log_pi, mu, log_sigma = (np.repeat(a, n, axis=0) for a in params)
    z = sample_mixture(log_pi, mu, log_sigma, tau, generator=tf.random.Generator.from_seed(6)).numpy()
    mean, var, m4 = tempered_moments(*(a[0] for a in params), tau)
    mean_se, var_se = np.sqrt(var / n), np.sqrt((m4 - var**2) / n)
    assert np.all(np.abs(z.mean(0) - mean) < 5 * mean_se)
    assert np.all(np.abs(z.var(0) - var) < 5 * var_se)
    if tau != 1.0:  # the test can tell tempered from untempered sampling
        mean1, var1, _ = tempered_moments(*(a[0] for a in params), 1.0)
        assert np.any(np.abs(var1 - var) > 10 * var_se) or np.any(np.abs(mean1 - mean) > 10 * mean_se)


def test_sampling_is_deterministic_and_per_row_seeds_match_single_rows():
    log_pi, mu, log_sigma = (np.repeat(a, 4, axis=0).astype(np.float32) for a in mixture_parameters())
    a = sample_mixture(log_pi, mu, log_sigma, 1.0, seed=[7, 8]).numpy()
    b = sample_mixture(log_pi, mu, log_sigma, 1.0, seed=[7, 8]).numpy()
    c = sample_mixture(log_pi, mu, log_sigma, 1.0, seed=[7, 9]).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g1, g2 = tf.random.Generator.from_seed(11), tf.random.Generator.from_seed(11)
    np.testing.assert_array_equal(sample_mixture(log_pi, mu, log_sigma, 1.0, generator=g1).numpy(),
                                  sample_mixture(log_pi, mu, log_sigma, 1.0, generator=g2).numpy())

    seeds = np.array([[1, 2], [3, 4], [5, 6], [7, 8]], np.int32)
    batched = sample_mixture(log_pi, mu, log_sigma, 1.3, seed=seeds).numpy()
    singles = [sample_mixture(log_pi[i:i + 1], mu[i:i + 1], log_sigma[i:i + 1], 1.3, seed=seeds[i:i + 1]).numpy()
               for i in range(4)]
    np.testing.assert_array_equal(batched, np.concatenate(singles))
    assert len({tuple(row) for row in batched}) == 4  # different seeds give different rows


# --------------------------------------------------------------------------- losses and masking
def test_padding_never_changes_the_loss(small_model):
    rng = np.random.default_rng(8)
    batch = make_batch(rng, lengths=[5, 8, 3], total_length=8)
    reference = losses_np(small_model, batch)
    longer = losses_np(small_model, pad(batch, 13, rng))
    for key in reference:
        np.testing.assert_allclose(longer[key], reference[key], rtol=1e-5, err_msg=key)
    assert all(np.isfinite(v) for v in reference.values())

    # Nor the gradients (NaN in padding must not reach the weights through 0 * NaN).
    def gradients(batch):
        with tf.GradientTape() as tape:
            loss = small_model.compute_losses(batch)["loss"]
        return [g.numpy() for g in tape.gradient(loss, small_model.trainable_variables)]
    for short, long in zip(gradients(batch), gradients(pad(batch, 13, rng))):
        np.testing.assert_allclose(long, short, rtol=1e-4, atol=1e-7)

    # Via Keras' own evaluate as well (test_step).
    small_model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0))
    evaluated = small_model.evaluate(pad(batch, 11, rng), batch_size=3, verbose=0, return_dict=True)
    np.testing.assert_allclose(evaluated["loss"], reference["loss"], rtol=1e-5)

    # Each padded episode scores like the same episode on its own, unpadded.
    single = {key: value[2:3, :3] for key, value in batch.items()}
    alone = losses_np(small_model, single)
    padded = losses_np(small_model, {key: value[2:3] for key, value in batch.items()})
    for key in alone:
        np.testing.assert_allclose(padded[key], alone[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("lengths, total", [([6], 9), ([9], 9)])
def test_the_z_loss_at_the_last_real_step_is_masked(small_model, lengths, total):
    rng = np.random.default_rng(9)
    batch = make_batch(rng, lengths=lengths, total_length=total)
    last = lengths[0] - 1
    reference = losses_np(small_model, batch)

    # The action of the last real step only feeds the prediction of a frame that does not
    # exist, so the z loss must ignore it - the reward and done losses must not.
    changed = {key: value.copy() for key, value in batch.items()}
    changed["action"][0, last] += 0.7
    after = losses_np(small_model, changed)
    np.testing.assert_allclose(after["z_nll"], reference["z_nll"], rtol=1e-6)
    assert abs(after["reward_mse"] - reference["reward_mse"]) > 1e-6
    assert abs(after["done_bce"] - reference["done_bce"]) > 1e-6

    # The last real frame is still a target (of the step before it): the mask is not too wide.
    changed = {key: value.copy() for key, value in batch.items()}
    changed["mu"][0, last] += 0.5
    assert abs(losses_np(small_model, changed)["z_nll"] - reference["z_nll"]) > 1e-6


def test_loss_weights_combine_the_parts(small_model):
    batch = make_batch(np.random.default_rng(10), lengths=[4, 6], total_length=6)
    parts = losses_np(small_model, batch)
    expected = parts["z_nll"] + parts["reward_mse"] + 10.0 * parts["done_bce"]
    np.testing.assert_allclose(parts["loss"], expected, rtol=1e-6)
    no_heads = MDNRNN(**SMALL, reward_head=False, done_head=False)
    out = losses_np(no_heads, {k: v for k, v in batch.items() if k not in ("reward", "done")})
    assert set(out) == {"loss", "z_nll"} and out["loss"] == out["z_nll"]
    with pytest.raises(ValueError, match="missing"):
        small_model.compute_losses({k: v for k, v in batch.items() if k != "reward"})
    with pytest.raises(ValueError, match="mu must have shape"):
        small_model.compute_losses({**batch, "mu": batch["mu"][..., :3]})


def test_training_reduces_the_loss_and_resamples_z():
    rng = np.random.default_rng(11)
    batch = make_batch(rng, lengths=[10, 7, 10, 4], total_length=10)
    model = MDNRNN(**SMALL, seed=1)
    first = model.compute_losses(batch, sample_z=True)["loss"]
    second = model.compute_losses(batch, sample_z=True)["loss"]
    assert float(first) != float(second)  # a fresh eps each time
    model.compile(optimizer=keras.optimizers.Adam(1e-2, clipnorm=1.0))
    before = model.evaluate(batch, batch_size=4, verbose=0, return_dict=True)
    history = model.fit(batch, batch_size=4, epochs=40, verbose=0, shuffle=False).history
    after = model.evaluate(batch, batch_size=4, verbose=0, return_dict=True)
    assert set(history) >= {"loss", "z_nll", "reward_mse", "done_bce"}
    assert after["loss"] < 0.7 * before["loss"]
    assert after["z_nll"] < before["z_nll"]


def test_extreme_inputs_give_finite_loss_and_gradients():
    model = MDNRNN(**SMALL, seed=2)
    mdn = model.net.get_layer("mdn")
    mdn.kernel.assign(mdn.kernel * 1e4)  # raw mixture outputs in the thousands
    rng = np.random.default_rng(12)
    batch = make_batch(rng, lengths=[8, 5], total_length=8)
    batch["mu"] *= 1e3
    batch["reward"] *= 100.0
    with tf.GradientTape() as tape:
        losses = model.compute_losses(batch, sample_z=True, training=True)
    gradients = tape.gradient(losses["loss"], model.trainable_variables)
    assert all(np.isfinite(float(v)) for v in losses.values())
    assert all(np.isfinite(g.numpy()).all() for g in gradients)


# --------------------------------------------------------------------------- inference step
def run_steps(model, z, action, mask=None):
    state = model.initial_state(z.shape[0])
    outputs = []
    for t in range(z.shape[1]):
        out = model.step(z[:, t], action[:, t], state, mask)
        state = out["state"]
        outputs.append(out)
    return outputs


def test_step_matches_the_sequence_model_and_batches_match_single_runs():
    model = MDNRNN(z_size=32, action_size=3, seed=3)  # the paper's sizes
    rng = np.random.default_rng(13)
    z = rng.normal(size=(3, 5, 32)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(3, 5, 3)).astype(np.float32)
    sequence = model(np.concatenate([z, action], -1))
    log_pi, mu, log_sigma = model.split(sequence["mdn"])
    steps = run_steps(model, z, action)
    for t, out in enumerate(steps):
        np.testing.assert_allclose(out["log_pi"], log_pi[:, t], atol=1e-5)
        np.testing.assert_allclose(out["mu"], mu[:, t], atol=1e-5)
        np.testing.assert_allclose(out["log_sigma"], log_sigma[:, t], atol=1e-5)
        np.testing.assert_allclose(out["reward"], sequence["reward"][:, t], atol=1e-5)
        np.testing.assert_allclose(out["done_prob"], tf.sigmoid(sequence["done"][:, t]), atol=1e-6)
    for i in range(3):
        single = run_steps(model, z[i:i + 1], action[i:i + 1])
        for key in ("log_pi", "mu", "log_sigma", "reward", "done_prob"):
            np.testing.assert_allclose(single[-1][key][0], steps[-1][key][i], atol=1e-5)
        np.testing.assert_allclose(single[-1]["state"][0][0], steps[-1]["state"][0][i], atol=1e-5)
    assert model._compiled_step.experimental_get_tracing_count() == 1  # one trace for B = 3 and B = 1
    with pytest.raises(ValueError, match="action must have shape"):
        model.step(z[:, 0], action[:2, 0], model.initial_state(3))


def test_dropout_masks_are_per_sequence_and_drive_the_step():
    model = MDNRNN(**SMALL, dropout=0.5, seed=4)
    rng = np.random.default_rng(14)
    z = rng.normal(size=(2, 4, 4)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(2, 4, 3)).astype(np.float32)

    # Training: the dropout layer zeroes the same units at every step of a sequence.
    dropped = keras.Model(model.net.input, model.net.get_layer("dropout").output)
    features = dropped(np.concatenate([z, action], -1), training=True).numpy()
    zeros = features == 0.0
    assert zeros.any() and (zeros == zeros[:, :1]).all()

    mask = model.sample_dropout_mask(2, seed=[1, 2]).numpy()
    np.testing.assert_array_equal(mask, model.sample_dropout_mask(2, seed=[1, 2]).numpy())
    assert set(np.unique(mask)) <= {0.0, 2.0} and 0.0 in mask and 2.0 in mask
    plain = run_steps(model, z, action)
    with_ones = run_steps(model, z, action, np.ones((2, 16), np.float32))
    with_mask = run_steps(model, z, action, mask)
    np.testing.assert_allclose(plain[-1]["mu"], with_ones[-1]["mu"], atol=1e-6)
    assert not np.allclose(plain[-1]["mu"], with_mask[-1]["mu"], atol=1e-3)
    # The mask acts on the heads only, never on the recurrent state.
    np.testing.assert_allclose(plain[-1]["state"][1], with_mask[-1]["state"][1], atol=1e-6)
    assert (MDNRNN(**SMALL).sample_dropout_mask(3).numpy() == 1.0).all()


# --------------------------------------------------------------------------- saving
def test_keras_and_weights_round_trip(tmp_path):
    rng = np.random.default_rng(15)
    batch = make_batch(rng, lengths=[6, 4], total_length=6)
    model = MDNRNN(**SMALL, dropout=0.1, done_weight=5.0, seed=5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0))
    model.fit(batch, batch_size=2, epochs=2, verbose=0)
    reference = losses_np(model, batch)

    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded, MDNRNN) and loaded.get_config() == model.get_config()
    assert losses_np(loaded, batch) == pytest.approx(reference, rel=1e-6)
    step = loaded.step(batch["mu"][:, 0], batch["action"][:, 0], loaded.initial_state(2))
    ref_step = model.step(batch["mu"][:, 0], batch["action"][:, 0], model.initial_state(2))
    np.testing.assert_allclose(step["mu"], ref_step["mu"], atol=1e-6)
    loaded.fit(batch, batch_size=2, epochs=1, verbose=0)  # the optimizer state came along

    model.save_weights(tmp_path / "m.weights.h5")
    fresh = MDNRNN.from_config(model.get_config())
    assert losses_np(fresh, batch) != pytest.approx(reference, rel=1e-6)
    fresh.load_weights(tmp_path / "m.weights.h5")
    assert losses_np(fresh, batch) == pytest.approx(reference, rel=1e-6)


# --------------------------------------------------------------------------- baselines
def test_gaussian_nll_is_the_log_density():
    x, mean, var = np.array([0.3, -2.0]), np.array([0.0, 1.0]), np.array([0.5, 4.0])
    density = np.exp(-((x - mean) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)
    np.testing.assert_allclose(gaussian_nll(x, mean, var), -np.log(density), rtol=1e-12)
    with pytest.raises(ValueError, match="var"):
        gaussian_nll(x, mean, np.array([1.0, 0.0]))


def test_baselines_on_hand_made_series():
    # Dimension 0 climbs by 1 each step, dimension 1 is constant (a collapsed latent).
    train = [np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])]
    heldout = [np.array([[10.0, 5.0], [11.0, 5.0], [12.0, 5.0]]), np.array([[0.0, 5.0]])]
    got = baseline_nlls(train, heldout)
    floor = math.exp(2 * LOG_SIGMA_MIN)
    # persistence: noise variance 1 on dim 0 and the floor on dim 1; both held-out moves are exact.
    expected_persistence = np.mean([gaussian_nll(1.0, 0.0, 1.0), gaussian_nll(0.0, 0.0, floor)])
    # unconditional: dim 0 mean 1.5 variance 1.25; dim 1 mean 5 variance floored.
    targets = np.array([11.0, 12.0])
    expected_unconditional = np.mean(
        np.concatenate([gaussian_nll(targets, 1.5, 1.25), gaussian_nll(np.full(2, 5.0), 5.0, floor)]))
    assert got["persistence"] == pytest.approx(expected_persistence, rel=1e-12)
    assert got["unconditional"] == pytest.approx(expected_unconditional, rel=1e-12)
    assert got["persistence"] < got["unconditional"]
    per_dimension = baseline_nlls(train, heldout, per_dimension=True)
    assert per_dimension["persistence"].shape == (2,)
    for name, value in got.items():
        assert np.mean(per_dimension[name]) == pytest.approx(value, rel=1e-12)
    assert per_dimension["persistence"][0] == pytest.approx(gaussian_nll(1.0, 0.0, 1.0), rel=1e-12)
    with pytest.raises(ValueError, match="no episode with 2"):
        baseline_nlls([np.zeros((1, 2))], heldout)
    with pytest.raises(ValueError, match="empty"):
        baseline_nlls(train, [])


def test_baseline_units_match_mixture_nll():
    rng = np.random.default_rng(16)
    train = [np.cumsum(rng.normal(scale=0.3, size=(50, 3)), axis=0) for _ in range(4)]
    heldout = [np.cumsum(rng.normal(scale=0.3, size=(40, 3)), axis=0) for _ in range(2)]
    deltas = np.concatenate([np.diff(a, axis=0) for a in train])
    noise_var = np.mean(deltas**2, axis=0)
    # The persistence baseline is a one-component mixture centred on z_t.
    previous = np.concatenate([a[:-1] for a in heldout])[:, :, None]
    target = np.concatenate([a[1:] for a in heldout])
    log_sigma = np.broadcast_to(0.5 * np.log(noise_var)[:, None], previous.shape)
    nll = float(mixture_nll(target, np.zeros_like(previous), previous, log_sigma))
    assert baseline_nlls(train, heldout)["persistence"] == pytest.approx(nll, rel=1e-9)


def test_mixed_precision_trains_with_float32_heads_and_float32_step():
    """Under mixed_float16 the LSTM computes in float16 but the NLL, reward and state stay float32."""
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model = MDNRNN(**SMALL, seed=5)
        assert model.net.get_layer("lstm").compute_dtype == "float16"
        assert model.net.get_layer("mdn").compute_dtype == "float32"
        model.compile(optimizer=keras.optimizers.Adam(1e-2, clipnorm=1.0))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        batch = make_batch(np.random.default_rng(15), lengths=[6, 4], total_length=6)
        before = model.evaluate(batch, batch_size=2, verbose=0, return_dict=True)
        model.fit(batch, batch_size=2, epochs=30, verbose=0, shuffle=False)
        after = model.evaluate(batch, batch_size=2, verbose=0, return_dict=True)
        assert all(np.isfinite(v) for v in after.values())
        assert after["loss"] < before["loss"]
        out = model.step(batch["mu"][:, 0], batch["action"][:, 0], model.initial_state(2))
        assert out["mu"].dtype == tf.float32 and out["state"][0].dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras.mixed_precision.global_policy().name == "float32"


# --------------------------------------------------------------------------- the action head (rnn.action_head)
OLD_M = Path(__file__).parent / "data" / "old_mdn_rnn.keras"  # made before the head existed: tests/data/README.md


def with_shared_weights(source, **kwargs):
    """An M with ``source``'s sizes and kwargs, whose LSTM and z/reward/done heads hold ``source``'s weights."""
    model = MDNRNN(**SMALL, seed=1, **kwargs)
    for name in ("lstm", "mdn", "reward", "done"):
        model.net.get_layer(name).set_weights(source.net.get_layer(name).get_weights())
    return model


def test_action_head_adds_h_times_a_plus_a_parameters_last():
    with_head = build_mdn_rnn(z_size=32, action_size=3, action_head=True)
    without = build_mdn_rnn(z_size=32, action_size=3)
    assert with_head.get_layer("action").count_params() == 256 * 3 + 3 == 771
    assert with_head.count_params() == 422_368 + 2 * 257 + 771 == 423_653
    assert without.count_params() == 422_368 + 2 * 257
    assert build_mdn_rnn(z_size=4, hidden_units=16, num_mixtures=3, action_head=True).count_params() == (
        4 * 16 * (4 + 3 + 16 + 1) + (16 + 1) * 3 * 3 * 4 + 2 * 17 + 16 * 3 + 3)
    # Without the head the weights are the old network's, in the old order; the head only adds its own.
    old_paths = ["lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel", "lstm/lstm_cell/bias", "done/kernel",
                 "done/bias", "reward/kernel", "reward/bias", "mdn/kernel", "mdn/bias"]
    assert [w.path for w in without.weights] == old_paths
    assert sorted(w.path for w in with_head.weights) == sorted(old_paths + ["action/kernel", "action/bias"])
    outputs = with_head(np.zeros((2, 7, 35), np.float32))
    assert tuple(outputs["action"].shape) == (2, 7, 3) and "action" not in without(np.zeros((1, 2, 35)))
    with pytest.raises(ValueError, match="action_weight"):
        MDNRNN(**SMALL, action_head=True, action_weight=-1.0)


def numpy_forward(model, inputs):
    """M's per-step outputs in float64 numpy from its weights: an independent LSTM (gates i, f, c, o) and heads."""
    kernel, recurrent, bias = (w.astype(np.float64) for w in model.net.get_layer("lstm").get_weights())
    batch, steps, _ = inputs.shape
    h = np.zeros((batch, model.hidden_units))
    c = np.zeros_like(h)
    features = []
    for t in range(steps):
        gates = inputs[:, t] @ kernel + h @ recurrent + bias
        i, f, g, o = np.split(gates, 4, axis=-1)
        sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        features.append(h)
    features = np.stack(features, axis=1)

    def dense(name):
        weight, b = model.net.get_layer(name).get_weights()
        return features @ weight.astype(np.float64) + b

    return {"mdn": dense("mdn"), "reward": dense("reward")[..., 0], "done": dense("done")[..., 0],
            **({"action": dense("action")} if model.action_head else {})}


def numpy_split(y, z_size, k):
    """split_mixture in numpy: logits, means and softly bounded log sigmas (..., Z, K)."""
    logits, mu, raw = np.split(y.reshape(y.shape[:-1] + (z_size, 3 * k)), 3, axis=-1)
    log_pi = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    frac = -LOG_SIGMA_MIN / (LOG_SIGMA_MAX - LOG_SIGMA_MIN)
    sigmoid = 1.0 / (1.0 + np.exp(-(raw + np.log(frac / (1.0 - frac)))))
    return log_pi, mu, LOG_SIGMA_MIN + (LOG_SIGMA_MAX - LOG_SIGMA_MIN) * sigmoid


def test_loss_with_the_action_head_equals_a_brute_force_numpy_computation():
    rng = np.random.default_rng(20)
    model = MDNRNN(**SMALL, action_head=True, action_weight=0.5, seed=7)
    head = model.net.get_layer("action")
    head.set_weights([w + rng.normal(scale=0.3, size=w.shape) for w in head.get_weights()])
    # Episodes of 4, 7 and 1 frames; garbage (NaN, 1e3) after each end.
    batch = pad(make_batch(rng, lengths=[4, 7, 1], total_length=7), 9, rng)
    got = losses_np(model, batch)

    mask = batch["mask"] > 0
    clean = {k: np.where(mask[..., None] if batch[k].ndim == 3 else mask, batch[k], 0.0).astype(np.float64)
             for k in ("mu", "action", "reward", "done")}
    out = numpy_forward(model, np.concatenate([clean["mu"], clean["action"]], axis=-1))
    pairs = mask[:, :-1] & mask[:, 1:]
    log_prob = brute_force_log_prob(clean["mu"][:, 1:], *numpy_split(out["mdn"][:, :-1], 4, 3))
    logit, label = out["done"], clean["done"]
    expected = {
        "z_nll": -log_prob[pairs].mean(),
        "reward_mse": np.square(out["reward"] - clean["reward"])[mask].mean(),
        "done_bce": (np.maximum(logit, 0) - logit * label + np.log1p(np.exp(-np.abs(logit))))[mask].mean(),
        # The target of step t is the next step's action; the last real step has none.
        "action_mse": np.square(out["action"][:, :-1] - clean["action"][:, 1:]).mean(axis=-1)[pairs].mean(),
    }
    expected["loss"] = (expected["z_nll"] + expected["reward_mse"] + 10.0 * expected["done_bce"]
                        + 0.5 * expected["action_mse"])
    assert pairs.sum() == 3 + 6 + 0
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-5, err_msg=key)
    assert expected["action_mse"] > 0.01  # the head's term is not a negligible part of the check


def test_the_action_loss_is_masked_at_episode_ends():
    rng = np.random.default_rng(21)
    model = MDNRNN(**SMALL, action_head=True, seed=8)
    batch = make_batch(rng, lengths=[5, 8], total_length=8)
    reference = losses_np(model, batch)
    # Nothing after an episode's end counts, not even NaN.
    np.testing.assert_allclose(losses_np(model, pad(batch, 12, rng))["action_mse"], reference["action_mse"], rtol=1e-6)
    # The last real action is a target (of the step before it): the mask is not too narrow.
    changed = {key: value.copy() for key, value in batch.items()}
    changed["action"][0, 4] += 0.5
    assert abs(losses_np(model, changed)["action_mse"] - reference["action_mse"]) > 1e-4
    # A one-frame episode has no target: it adds nothing, and alone it scores 0 (no NaN).
    single = make_batch(rng, lengths=[1], total_length=8)
    assert losses_np(model, single)["action_mse"] == 0.0
    both = {key: np.concatenate([batch[key][:1], single[key]]) for key in batch}
    np.testing.assert_allclose(losses_np(model, both)["action_mse"],
                               losses_np(model, {key: v[:1] for key, v in batch.items()})["action_mse"], rtol=1e-6)


def test_the_head_changes_no_other_output_and_adds_only_its_weighted_term():
    rng = np.random.default_rng(22)
    off = MDNRNN(**SMALL, seed=9)
    on = with_shared_weights(off, action_head=True, action_weight=2.0)
    batch = make_batch(rng, lengths=[6, 3], total_length=6)
    a, b = losses_np(off, batch), losses_np(on, batch)
    for key in ("z_nll", "reward_mse", "done_bce"):
        assert a[key] == b[key], key
    np.testing.assert_allclose(b["loss"], a["loss"] + 2.0 * b["action_mse"], rtol=1e-6)
    state = off.initial_state(2)
    step_off = off.step(batch["mu"][:, 0], batch["action"][:, 0], state)
    step_on = on.step(batch["mu"][:, 0], batch["action"][:, 0], state)
    assert "action" not in step_off and tuple(step_on["action"].shape) == (2, 3)
    for key in ("log_pi", "mu", "log_sigma", "reward", "done_prob"):
        np.testing.assert_array_equal(step_on[key], step_off[key], err_msg=key)
    sequence = on(np.concatenate([batch["mu"], batch["action"]], -1))
    np.testing.assert_allclose(step_on["action"], sequence["action"][:, 0], atol=1e-6)
    on.compile(optimizer=keras.optimizers.Adam(1e-2, clipnorm=1.0))
    history = on.fit(batch, batch_size=2, epochs=30, verbose=0, shuffle=False).history
    assert "action_mse" in history and history["action_mse"][-1] < history["action_mse"][0]


def test_an_old_m_without_the_head_loads_and_gives_the_same_outputs(tmp_path):
    """tests/data/old_mdn_rnn.keras was trained and saved by M's code before the action head existed."""
    with np.load(OLD_M.with_name("old_mdn_rnn_outputs.npz")) as data:
        old = {key: data[key] for key in data.files}
    model = keras.models.load_model(OLD_M, compile=False)
    assert isinstance(model, MDNRNN) and not model.action_head
    assert "action_head" not in model.get_config() and "action_weight" not in model.get_config()
    batch = {key: old[key] for key in ("mu", "logvar", "action", "reward", "done", "mask")}
    sequence = model(np.concatenate([batch["mu"], batch["action"]], -1))
    assert set(sequence) == {"mdn", "reward", "done"}
    for key, value in sequence.items():
        np.testing.assert_allclose(value, old[f"seq_{key}"], atol=1e-6, err_msg=key)
    step = model.step(batch["mu"][:, 0], batch["action"][:, 0], model.initial_state(2))
    for key in ("log_pi", "mu", "log_sigma", "reward", "done_prob"):
        np.testing.assert_allclose(step[key], old[f"step_{key}"], atol=1e-6, err_msg=key)
    np.testing.assert_allclose(step["state"][0], old["step_h"], atol=1e-6)
    losses = losses_np(model, batch)
    assert set(losses) == {key[len("loss_"):] for key in old if key.startswith("loss_")}
    for key, value in losses.items():
        np.testing.assert_allclose(value, old[f"loss_{key}"], rtol=1e-6, err_msg=key)
    # Its weights fit a new M built from its config, and saving it again keeps the old config.
    fresh = MDNRNN.from_config(model.get_config())
    fresh.set_weights(model.get_weights())
    np.testing.assert_allclose(fresh(np.concatenate([batch["mu"], batch["action"]], -1))["mdn"], old["seq_mdn"],
                               atol=1e-6)
    model.save(tmp_path / "again.keras")
    assert keras.models.load_model(tmp_path / "again.keras").get_config() == model.get_config()


def test_keras_round_trip_with_the_action_head(tmp_path):
    batch = make_batch(np.random.default_rng(23), lengths=[6, 4], total_length=6)
    model = MDNRNN(**SMALL, action_head=True, action_weight=0.3, seed=10)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.action_head and loaded.action_weight == 0.3 and loaded.get_config() == model.get_config()
    assert losses_np(loaded, batch) == pytest.approx(losses_np(model, batch), rel=1e-6)


# --------------------------------------------------------------------------- scheduled sampling (rnn.scheduled_sampling)
def test_scheduled_inputs_keep_the_first_z_and_replace_exactly_where_asked():
    z = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    imagined = -np.ones((2, 3, 3), np.float32)
    replace = np.array([[True, False, True], [False, False, False]])
    mixed = scheduled_inputs(z, imagined, replace).numpy()
    np.testing.assert_array_equal(mixed[:, 0], z[:, 0])
    np.testing.assert_array_equal(mixed[0, 1], -1.0)
    np.testing.assert_array_equal(mixed[0, 2], z[0, 2])
    np.testing.assert_array_equal(mixed[0, 3], -1.0)
    np.testing.assert_array_equal(mixed[1], z[1])


def test_scheduled_sampling_trains_on_ms_own_draws_and_validates_teacher_forced(small_model, monkeypatch):
    """The training loss is the loss of the network fed the mixed inputs (checked against an independent numpy
    forward pass), against the real targets; without ``training`` the inputs stay the real z."""
    rng = np.random.default_rng(3)
    batch = make_batch(rng, [6, 4], 6)
    model = with_shared_weights(small_model, scheduled_sampling=1.0)
    imagined = rng.normal(size=(2, 5, 4)).astype(np.float32)
    replace = np.array([[True, False, True, True, True], [True, True, True, False, False]])
    monkeypatch.setattr(model, "_imagine", lambda z, action, pairs: (tf.constant(imagined), tf.constant(replace)))
    trained = {k: float(v) for k, v in model.compute_losses(batch, training=True).items()}
    keep = batch["mask"] > 0
    inputs = scheduled_inputs(batch["mu"], imagined, replace).numpy()
    out = numpy_forward(model, np.concatenate([inputs, batch["action"]], axis=-1).astype(np.float64))
    reward_mse = np.sum(np.where(keep, (out["reward"] - batch["reward"]) ** 2, 0.0)) / keep.sum()
    np.testing.assert_allclose(trained["reward_mse"], reward_mse, rtol=1e-4)
    log_pi, mu, log_sigma = model.split(tf.constant(out["mdn"][:, :-1], tf.float32))
    nll = float(mixture_nll(batch["mu"][:, 1:], log_pi, mu, log_sigma, keep[:, :-1] & keep[:, 1:]))
    np.testing.assert_allclose(trained["z_nll"], nll, rtol=1e-4)
    # Validation and a model without the option see the real z: the same losses.
    assert losses_np(model, batch) == pytest.approx(losses_np(small_model, batch), rel=1e-6)
    assert trained["reward_mse"] != pytest.approx(losses_np(small_model, batch)["reward_mse"], rel=1e-3)


def test_scheduled_sampling_replaces_a_share_p_of_real_pairs_with_draws_from_ms_prediction():
    """``_imagine``: with M's z head fixed to one narrow component at c, every draw lies near c, and the
    replaced share of the real pairs is p (never a padded one)."""
    model = MDNRNN(**SMALL, seed=5, scheduled_sampling=0.3)
    kernel, bias = model.net.get_layer("mdn").get_weights()
    z_size, k = SMALL["z_size"], SMALL["num_mixtures"]
    raw = np.zeros((z_size, 3, k), np.float32)  # per z dimension: K logits, K means, K raw log sigmas
    raw[:, 1] = 0.7
    raw[:, 2] = -100.0  # the soft bound's floor: sigma = exp(LOG_SIGMA_MIN)
    model.net.get_layer("mdn").set_weights([np.zeros_like(kernel), raw.reshape(bias.shape)])
    log_pi, mu, log_sigma = model.split(model.net(np.zeros((1, 1, z_size + 3), np.float32))["mdn"])
    assert np.allclose(mu.numpy(), 0.7) and np.allclose(log_sigma.numpy(), LOG_SIGMA_MIN, atol=1e-4)
    rng = np.random.default_rng(0)
    batch = make_batch(rng, [200, 120, 200, 50], 200)
    z, action = tf.constant(batch["mu"]), tf.constant(batch["action"])
    keep = batch["mask"] > 0
    pairs = tf.constant(keep[:, :-1] & keep[:, 1:])
    imagined, replace = model._imagine(z, action, pairs)
    assert tuple(imagined.shape) == (4, 199, z_size) and tuple(replace.shape) == (4, 199)
    assert np.abs(imagined.numpy() - 0.7).max() < 6 * math.exp(LOG_SIGMA_MIN)
    replace = replace.numpy()
    assert not replace[~pairs.numpy()].any()
    share = replace[pairs.numpy()].mean()
    n = int(pairs.numpy().sum())
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), share


def test_scheduled_sampling_is_saved_only_when_on_and_checked():
    assert "scheduled_sampling" not in MDNRNN(**SMALL).get_config()
    config_on = MDNRNN(**SMALL, scheduled_sampling=0.3).get_config()
    assert config_on["scheduled_sampling"] == 0.3
    assert MDNRNN.from_config(config_on).scheduled_sampling == 0.3
    with pytest.raises(ValueError, match="scheduled_sampling"):
        MDNRNN(**SMALL, scheduled_sampling=1.5)
