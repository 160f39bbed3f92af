"""Tests of the toy 2-D VAE vs. VAE-GAN experiment (vae_gan/toy.py)."""

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from vae_gan import toy  # noqa: E402
from worldmodels.storage import read_json  # noqa: E402

# The seeded test-size run: 1,280 updates per model, ~10-20 s on 2 CPU cores. Measured
# across seeds 0-9 at this size, the VAE-GAN's mean log-density beat the VAE's in 10 of 10
# runs (VAE -46..-48, VAE-GAN -1..-28: at this size some seeds are still converging).
SMALL_RUN = dict(n_train=2000, epochs=80, seed=0)


# --------------------------------------------------------------------------- data


def test_make_toy_data_shape_dtype_and_determinism():
    a = toy.make_toy_data(500, seed=3)
    assert a.shape == (500, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, toy.make_toy_data(500, seed=3))
    assert not np.array_equal(a, toy.make_toy_data(500, seed=4))


def test_make_toy_data_factors_pick_the_line_and_position():
    points, z1, z2 = toy.make_toy_data(2000, seed=0, return_factors=True)
    assert set(np.unique(z1)) == {0, 1}
    # z1 alone decides the side of y = 0; z2 decides x up to the noise.
    np.testing.assert_array_equal(points[:, 1] > 0, z1 == 1)
    assert np.abs(points[:, 0] - toy.HALF_LENGTH * z2).max() < 6 * toy.NOISE_STD
    # The modes are separated: nothing of the data lies near the midline between the lines.
    assert np.abs(points[:, 1]).min() > toy.OFFSET / 2


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_make_toy_data_rejects_bad_n(bad):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        toy.make_toy_data(bad, seed=0)


def test_log_density_higher_on_data_than_between_modes():
    data = toy.make_toy_data(1000, seed=1)
    between = data.copy()
    between[:, 1] = 0.0  # the same x positions, moved onto the midline between the two lines
    log_data, log_between = toy.data_log_density(data), toy.data_log_density(between)
    assert log_data.shape == (1000,)
    assert np.all(np.isfinite(log_data)) and np.all(np.isfinite(log_between))
    assert np.all(log_data > log_between)
    assert np.median(log_data) > np.median(log_between) + 10


def test_log_density_integrates_to_one_and_stays_finite_far_away():
    # Riemann sum on a grid that holds all but a negligible tail of the mass.
    step = 0.004
    xs = np.arange(-2.4, 2.4, step) + step / 2
    ys = np.arange(-0.9, 0.9, step) + step / 2
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    mass = np.exp(toy.data_log_density(grid)).sum() * step * step
    assert mass == pytest.approx(1.0, abs=1e-3)
    far = np.array([[100.0, 0.0], [-100.0, 50.0], [0.0, -30.0], [2.0 + 30 * toy.NOISE_STD, 0.5]])
    log_far = toy.data_log_density(far)
    assert np.all(np.isfinite(log_far)) and np.all(log_far < -100)


def test_log_density_matches_a_histogram_of_the_generator():
    # An independent estimate of the density (histogram of a big sample) agrees on the data.
    sample = toy.make_toy_data(400_000, seed=11).astype(np.float64)
    edges_x, edges_y = np.linspace(-2.5, 2.5, 51), np.linspace(-0.8, 0.8, 33)
    hist, _, _ = np.histogram2d(sample[:, 0], sample[:, 1], bins=[edges_x, edges_y], density=True)
    centres = np.stack(np.meshgrid((edges_x[:-1] + edges_x[1:]) / 2, (edges_y[:-1] + edges_y[1:]) / 2,
                                   indexing="ij"), -1)
    # Compare bin averages of the analytic density (4x4 sub-grid per bin) with the histogram.
    dx, dy = edges_x[1] - edges_x[0], edges_y[1] - edges_y[0]
    offs = (np.arange(4) + 0.5) / 4 - 0.5
    sub = centres[:, :, None, None, :] + np.stack(np.meshgrid(offs * dx, offs * dy, indexing="ij"), -1)
    analytic = np.exp(toy.data_log_density(sub.reshape(-1, 2))).reshape(sub.shape[:-1]).mean(axis=(2, 3))
    busy = hist > 0.2 * hist.max()
    assert busy.sum() > 50
    np.testing.assert_allclose(hist[busy], analytic[busy], rtol=0.15)


def test_data_log_density_and_distance_validate_shapes():
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        toy.data_log_density(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="reference"):
        toy.distance_to_data(np.zeros((4, 2)), np.zeros(5))
    d = toy.distance_to_data(np.array([[0.0, 0.0], [3.0, 4.0]]), np.array([[0.0, -1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(d, [0.0, 5.0])


# --------------------------------------------------------------------------- VAE-GAN players


def _fixed_batch(model):
    x = keras.ops.convert_to_tensor(toy.make_toy_data(256, seed=5))
    eps, z_prior = model.sample_noise(256)
    return x, eps, z_prior


def _weights(model, player):
    return [v.numpy().copy() for v in getattr(model, player).trainable_variables]


@pytest.mark.parametrize("player", toy.PLAYERS)
def test_each_player_update_decreases_its_own_loss_with_others_frozen(player):
    keras.utils.set_random_seed(0)
    model = toy.ToyVAEGAN(seed=0)
    model.compile(*(keras.optimizers.Adam(1e-3) for _ in toy.PLAYERS))
    x, eps, z_prior = _fixed_batch(model)
    others = [p for p in toy.PLAYERS if p != player]
    frozen = {p: _weights(model, p) for p in others}
    before_mine = _weights(model, player)
    loss_name = toy.PLAYER_LOSS[player]

    before = float(model.compute_losses(x, eps, z_prior)[loss_name])
    for _ in range(5):
        model.player_step(player, x, eps, z_prior)
    after = float(model.compute_losses(x, eps, z_prior)[loss_name])

    assert np.isfinite(before) and after < before
    # Only this player's weights moved.
    assert any(not np.array_equal(a, b) for a, b in zip(before_mine, _weights(model, player)))
    for p in others:
        for a, b in zip(frozen[p], _weights(model, p)):
            np.testing.assert_array_equal(a, b)


def test_player_losses_are_the_papers_combinations():
    keras.utils.set_random_seed(1)
    model = toy.ToyVAEGAN(gamma=0.3, seed=1)
    x, eps, z_prior = _fixed_batch(model)
    losses = {k: float(v) for k, v in model.compute_losses(x, eps, z_prior).items()}
    assert losses["enc_loss"] == pytest.approx(losses["kl"] + losses["dis_l"], rel=1e-5)
    assert losses["dec_loss"] == pytest.approx(0.3 * losses["dis_l"] + losses["gan_g"], rel=1e-5)
    assert losses["disc_loss"] == pytest.approx(losses["gan_d"], rel=1e-5)
    # At initialisation the discriminator is near chance: 3 terms of about log 2 each.
    assert losses["gan_d"] == pytest.approx(3 * math.log(2), rel=0.2)


def test_loss_terms_match_an_independent_numpy_computation():
    keras.utils.set_random_seed(2)
    model = toy.ToyVAEGAN(gamma=0.7, seed=2)
    x, eps, z_prior = _fixed_batch(model)
    losses = {k: float(v) for k, v in model.compute_losses(x, eps, z_prior).items()}

    mu, logvar = (np.asarray(t, np.float64) for t in model.encoder(x))
    x_rec = model.decoder(mu + np.exp(0.5 * logvar) * np.asarray(eps))
    logit_real, feat_real = (np.asarray(t, np.float64) for t in model.discriminator(x))
    logit_rec, feat_rec = (np.asarray(t, np.float64) for t in model.discriminator(x_rec))
    logit_prior, _ = (np.asarray(t, np.float64) for t in model.discriminator(model.decoder(z_prior)))

    def log_sigmoid(t):
        return -np.logaddexp(0.0, -t)

    kl = np.mean(np.sum(0.5 * (mu**2 + np.exp(logvar) - 1 - logvar), axis=1))
    dis_l = np.mean(0.5 * np.sum((feat_real - feat_rec) ** 2, axis=1))
    # L_GAN = log D(x) + log(1 - D(x_rec)) + log(1 - D(x_prior)); 1 - sigmoid(t) = sigmoid(-t).
    l_gan = np.mean(log_sigmoid(logit_real) + log_sigmoid(-logit_rec) + log_sigmoid(-logit_prior))
    non_saturating = -np.mean(log_sigmoid(logit_rec) + log_sigmoid(logit_prior))
    assert losses["kl"] == pytest.approx(kl, rel=1e-4)
    assert losses["dis_l"] == pytest.approx(dis_l, rel=1e-4)
    assert losses["gan_d"] == pytest.approx(-l_gan, rel=1e-4)
    assert losses["gan_g"] == pytest.approx(non_saturating, rel=1e-4)
    assert losses["dec_loss"] == pytest.approx(0.7 * dis_l + non_saturating, rel=1e-4)


def test_gamma_only_changes_the_decoders_gradient():
    # Dis_l must not train the discriminator, and the GAN term must not reach the encoder.
    grads = {}
    for gamma in (1.0, 5.0):
        keras.utils.set_random_seed(3)
        model = toy.ToyVAEGAN(gamma=gamma, seed=3)
        x, eps, z_prior = _fixed_batch(model)
        _, grads[gamma] = model._gradients(x, eps, z_prior)
    for player in ("encoder", "discriminator"):
        for a, b in zip(grads[1.0][player], grads[5.0][player]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(np.asarray(a), np.asarray(b))
               for a, b in zip(grads[1.0]["decoder"], grads[5.0]["decoder"]))


def test_each_player_is_trained_by_its_own_loss_only():
    import tensorflow as tf

    keras.utils.set_random_seed(4)
    model = toy.ToyVAEGAN(gamma=1.0, seed=4)
    x, eps, z_prior = _fixed_batch(model)
    _, grads = model._gradients(x, eps, z_prior)
    with tf.GradientTape(persistent=True) as tape:
        t = model.compute_losses(x, eps, z_prior)
        # (player, the paper's objective for it, a term that must not reach it)
        cases = [("encoder", t["kl"] + t["dis_l"], t["gan_g"]),
                 ("decoder", t["dis_l"] + t["gan_g"], -t["gan_d"]),
                 ("discriminator", t["gan_d"], t["dis_l"])]
        # The sums must be formed inside the tape to be differentiable.
        cases = [(player, own, own + foreign) for player, own, foreign in cases]
    for player, own, own_plus_foreign in cases:
        variables = getattr(model, player).trainable_variables
        expected = tape.gradient(own, variables)
        leaked = tape.gradient(own_plus_foreign, variables)
        for got, want in zip(grads[player], expected):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
        # The foreign term does have a gradient here, so a leak would have been caught.
        assert any(not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)
                   for a, b in zip(expected, leaked))
    del tape


def test_bad_player_and_gamma_are_rejected():
    with pytest.raises(ValueError, match="gamma"):
        toy.ToyVAEGAN(gamma=-1.0)
    model = toy.ToyVAEGAN()
    with pytest.raises(ValueError, match="player must be one of"):
        model._player_variables("generator")


# --------------------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return out, toy.run_toy_experiment(out_dir=out, **SMALL_RUN)


def test_vaegan_reconstructions_lie_on_the_data_more_than_the_vaes(small_run):
    _, results = small_run
    vae, vaegan = results["vae"], results["vae_gan"]
    for m in (vae, vaegan):
        assert np.isfinite(m["mean_log_density"]) and np.isfinite(m["mean_distance_to_data"])
    assert vaegan["mean_log_density"] > vae["mean_log_density"]
    assert vaegan["mean_distance_to_data"] < vae["mean_distance_to_data"]
    # The held-out data itself is the ceiling of what reconstructions can score.
    assert results["data"]["mean_log_density"] > vae["mean_log_density"]


def test_figure_and_json_are_written(small_run):
    import matplotlib.image

    out, results = small_run
    png, js = out / "toy_vae_vs_vaegan.png", out / "toy_metrics.json"
    image = matplotlib.image.imread(png)
    assert image.shape[1] > 2 * image.shape[0]  # three panels side by side
    saved = read_json(js)
    assert saved["config"]["seed"] == SMALL_RUN["seed"]
    for key in ("data", "vae", "vae_gan"):
        assert saved[key]["mean_log_density"] == pytest.approx(results[key]["mean_log_density"])
    table = toy.format_table(results)
    assert "| VAE-GAN |" in table and f"{results['vae']['mean_log_density']:.2f}" in table


def test_run_toy_experiment_validates_arguments():
    with pytest.raises(ValueError, match="epochs"):
        toy.run_toy_experiment(n_train=10, epochs=0)
    with pytest.raises(ValueError, match="seed"):
        toy.run_toy_experiment(n_train=10, epochs=1, seed=-1)
    with pytest.raises(ValueError, match="decoder_std"):
        toy.run_toy_experiment(n_train=10, epochs=1, vae_decoder_std=0.0)


def test_main_writes_outputs_and_prints_a_markdown_table(tmp_path, capsys):
    results = toy.main(["--out", str(tmp_path), "--epochs", "1", "--n-train", "256", "--seed", "7"])
    printed = capsys.readouterr().out
    assert "| VAE |" in printed and "| VAE-GAN |" in printed
    assert (tmp_path / "toy_vae_vs_vaegan.png").is_file()
    assert read_json(tmp_path / "toy_metrics.json")["config"]["seed"] == 7 == results["config"]["seed"]
