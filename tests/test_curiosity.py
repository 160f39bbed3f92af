"""Curiosity in 06_iterate's collection: the bonus is M's NLL of the observed transitions, and the choice it drives."""

from __future__ import annotations

import math

import numpy as np
import pytest

import config
from tests.conftest import assert_user_error, data_dir_with, read_csv, run_script
from worldmodels import artifacts, curiosity, storage

STEPS = 30


@pytest.fixture(scope="module")
def models(smoke_rnn):
    cfg = config.make_config("smoke")
    return artifacts.load_vision(smoke_rnn, cfg), artifacts.load_rnn(smoke_rnn, cfg)


def numpy_nll(rnn, z: np.ndarray, action: np.ndarray) -> np.ndarray:
    """M's NLL (T - 1,) of z[1:] given z[:-1], action[:-1], per latent dimension: the sequence network over the
    whole episode and the mixture density in numpy (log-sum-exp of the K weighted Gaussians)."""
    out = rnn(np.concatenate([z, action], axis=-1)[None].astype(np.float32), training=False)["mdn"][0, :-1]
    log_pi, mu, log_sigma = (np.asarray(x, np.float64) for x in rnn.split(out))  # (T - 1, Z, K)
    target = z[1:, :, None].astype(np.float64)
    log_normal = -0.5 * ((target - mu) / np.exp(log_sigma)) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)
    weighted = log_pi + log_normal
    top = weighted.max(axis=-1, keepdims=True)
    log_density = top[..., 0] + np.log(np.exp(weighted - top).sum(axis=-1))  # (T - 1, Z)
    return -log_density.mean(axis=-1)


def test_the_curiosity_bonus_equals_ms_nll_computed_separately(models):
    """The NLL the collector sums for each candidate is M's NLL of its recorded episode, recomputed here from
    the recorded frames and actions (z = V's mean + its std times the track's z noise, as the real world draws it)."""
    from models.controller import num_parameters
    from worldmodels.envpool import CarRacingPool
    from worldmodels.recording import NoisyWorld, RecordingPool
    from worldmodels.rollout import Z_NOISE_KEY, RealWorld

    vae, rnn = models
    track = 77
    params = np.random.default_rng(1).normal(0, 0.5, num_parameters(rnn.z_size, rnn.hidden_units))
    candidates = curiosity.variants(params, 1, 0.5, seed=3)
    episodes = []
    with CarRacingPool(2, STEPS, "serial") as pool:
        surprise = curiosity.SurpriseWorld(RealWorld(RecordingPool(pool, episodes.append), vae, rnn, "sample"))
        scores = curiosity.score(NoisyWorld(surprise, 0.1), surprise, candidates, track, STEPS)
    assert len(episodes) == 2 and all(len(ep["action"]) == STEPS for ep in episodes)
    for p, episode in enumerate(episodes):  # saved in row order: both end at the time limit
        mu, logvar = (x.numpy() for x in vae.encoder(episode["obs"].astype(np.float32) / 255.0, training=False))
        noise = np.random.default_rng([track, Z_NOISE_KEY])
        eps = np.stack([noise.standard_normal(rnn.z_size, dtype=np.float32) for _ in range(STEPS)])
        z = mu + np.exp(0.5 * logvar) * eps
        want = numpy_nll(rnn, z, episode["action"])
        assert scores["transitions"][p] == STEPS - 1  # the step that ends the episode has no recorded next frame
        np.testing.assert_allclose(scores["nll"][p], want.sum(), rtol=1e-4)
        assert scores["returns"][p] == pytest.approx(float(np.sum(episode["reward"], dtype=np.float64)), abs=1e-4)
    assert not np.isclose(scores["nll"][0], scores["nll"][1])  # other actions, other transitions


def test_variants_are_the_controller_and_seeded_perturbations():
    params = np.arange(5.0)
    got = curiosity.variants(params, 3, 0.1, seed=[0, 1, 2])
    assert got.shape == (4, 5)
    np.testing.assert_array_equal(got[0], params)
    np.testing.assert_array_equal(got, curiosity.variants(params, 3, 0.1, seed=[0, 1, 2]))
    assert not np.array_equal(got, curiosity.variants(params, 3, 0.1, seed=[0, 2, 2]))
    assert 0.05 < np.std(got[1:] - params) < 0.2


@pytest.fixture(scope="module")
def curious(smoke_rnn, tmp_path_factory):
    """One iteration of 06 with curiosity on (2 variants, beta 0.5, 20-step scoring episodes)."""
    data = data_dir_with(smoke_rnn, tmp_path_factory.mktemp("curious"), "rollouts", "vae", "series", "rnn")
    proc = run_script("06_iterate.py", "--set", "iterate.iterations=1", "--set", "iterate.curiosity_variants=2",
                      "--set", "iterate.curiosity=0.5", "--set", "iterate.curiosity_steps=20", data_dir=data)
    return data, proc


def test_an_iteration_collects_with_the_fittest_variant_and_reports_it(curious):
    data, proc = curious
    folder = data / "iterations" / "iter_001"
    with np.load(folder / "curiosity.npz") as saved:
        s = {key: saved[key] for key in saved.files}
    assert s["candidates"].shape[0] == 3 and not np.any(s["candidates"][0])  # no controller in the data dir: zeros
    np.testing.assert_allclose(s["fitness"], s["returns"] + 0.5 * s["nll"])
    chosen = int(np.argmax(s["fitness"]))
    assert int(s["chosen"]) == chosen and f"collecting with candidate {chosen}" in proc.stdout
    assert np.all(s["lengths"] == 20) and np.all(s["transitions"] == 19)
    row = read_csv(data / "iterations" / "iterations.csv")[0]
    nll = s["nll"][chosen] / 19
    assert int(row["curiosity_variant"]) == chosen and float(row["curiosity_return"]) == s["returns"][chosen]
    assert float(row["curiosity_nll"]) == pytest.approx(nll) and float(row["curiosity_bonus"]) == pytest.approx(0.5 * nll)
    assert int(row["curiosity_env_steps"]) == 60
    stage1 = sum(len(storage.load_episode(p, "series", keys=("reward",))["reward"])
                 for p in storage.list_episodes(data / "series"))
    assert int(row["real_env_steps"]) == stage1 + int(row["collect_steps"]) + int(row["eval_steps"]) + 60 \
        + int(row["steering_env_steps"])
    assert math.isnan(float(row["dream_real_rank_corr"]))  # one iteration: no order to compare


def test_a_resumed_iteration_collects_again_with_the_saved_choice(curious, smoke_rnn, tmp_path):
    """A lost episode is driven again by the chosen variant read from curiosity.npz: the same file comes back."""
    import shutil

    data, _ = curious
    copy = data_dir_with(smoke_rnn, tmp_path, "rollouts", "vae", "series", "rnn")
    shutil.copytree(data / "iterations", copy / "iterations")
    (copy / "iterations" / "iterations.csv").unlink()
    lost = sorted((copy / "iterations" / "iter_001" / "rollouts").glob("episode_*.npz"))[1]
    lost.unlink()
    run_script("06_iterate.py", "--set", "iterate.iterations=1", "--set", "iterate.curiosity_variants=2",
               "--set", "iterate.curiosity=0.5", "--set", "iterate.curiosity_steps=20", data_dir=copy)
    got = storage.load_episode(lost, "rollout")
    want = storage.load_episode(data / "iterations" / "iter_001" / "rollouts" / lost.name, "rollout")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_curiosity_without_variants_is_a_one_line_error(tmp_path):
    proc = run_script("06_iterate.py", "--set", "iterate.curiosity=0.5", data_dir=tmp_path, check=False)
    assert_user_error(proc, "iterate.curiosity_variants")
