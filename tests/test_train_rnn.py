"""04_train_rnn.py and worldmodels/sequences.py: windows, padding, exact resume, metrics, the notebook, clear errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import config
from tests.conftest import REPO, assert_user_error, check_notebook, run_script
from worldmodels import sequences, storage
from worldmodels.metrics import informative_comparison

SCRIPT = "04_train_rnn.py"
SMOKE = config.make_config("smoke")


# --------------------------------------------------------------------------- helpers


def write_series(folder: Path, lengths, z_size: int = 4, seed: int = 0) -> list[Path]:
    """Series files whose frame t of episode i has mu[t, :2] = (i, t): every frame is identifiable.

    The last frame of every other episode is a "done", so both classes of the done head appear.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for i, length in enumerate(lengths):
        mu = rng.normal(size=(length, z_size)).astype(np.float32)
        mu[:, 0], mu[:, 1] = i, np.arange(length)
        done = np.zeros(length, bool)
        done[-1] = i % 2 == 1
        arrays = {"mu": mu, "logvar": rng.uniform(-3, -1, (length, z_size)).astype(np.float32),
                  "action": rng.uniform(-1, 1, (length, 3)).astype(np.float32),
                  "reward": rng.normal(size=length).astype(np.float32), "done": done, "seed": np.int64(i)}
        paths.append(storage.save_episode(folder / storage.episode_name(i), arrays, "series"))
    return paths


def windows_of(dataset) -> list[dict[str, np.ndarray]]:
    """Unbatch a dataset of window batches into one dict of numpy arrays per window."""
    out = []
    for batch in dataset:
        batch = {k: v.numpy() for k, v in batch.items()}
        out += [{k: v[i] for k, v in batch.items()} for i in range(len(batch["mask"]))]
    return out


def window_ids(windows) -> list[tuple[int, int]]:
    return [(int(w["episode"]), int(w["start"])) for w in windows]


def small_model(z_size=4):
    from models.mdn_rnn import MDNRNN

    return MDNRNN(z_size=z_size, hidden_units=8, num_mixtures=2, seed=0)


LENGTHS = [1, 2, 6, 7, 13]


@pytest.fixture(scope="module")
def series_paths(tmp_path_factory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("series"), LENGTHS)


# --------------------------------------------------------------------------- windows


def test_windows_cover_every_transition_once_and_never_mix_episodes(series_paths):
    length = 3  # transitions per window: windows of 4 frames
    windows = windows_of(sequences.sequence_dataset(series_paths, length, batch_size=3, shuffle=False))
    assert len(windows) == sequences.count_windows(LENGTHS, length)
    transitions, frames = [], set()
    for w in windows:
        valid = int(w["mask"].sum())
        episode, start = int(w["episode"]), int(w["start"])
        assert w["mu"].shape == (length + 1, 4) and w["action"].shape == (length + 1, 3)
        # Real frames are a prefix, all from the window's own episode, consecutive from its start.
        np.testing.assert_array_equal(w["mask"], np.arange(length + 1) < valid)
        assert valid == min(length + 1, LENGTHS[episode] - start)
        np.testing.assert_array_equal(w["mu"][:valid, 0], episode)
        np.testing.assert_array_equal(w["mu"][:valid, 1], start + np.arange(valid))
        # Padding is zeros, whatever the key.
        for key in ("mu", "logvar", "action", "reward", "done"):
            assert not np.any(w[key][valid:]), key
        transitions += [(episode, start + t) for t in range(valid - 1)]
        frames |= {(episode, start + t) for t in range(valid)}
    expected = [(i, t) for i, n in enumerate(LENGTHS) for t in range(n - 1)]
    assert sorted(transitions) == expected  # each transition exactly once
    assert frames == {(i, t) for i, n in enumerate(LENGTHS) for t in range(n)}


def test_the_same_seed_and_epoch_give_the_same_batches_and_epochs_differ(series_paths):
    def epoch(e, seed=0):
        ds = sequences.sequence_dataset(series_paths, 3, batch_size=2, seed=seed, epoch=e, episodes_in_flight=2)
        return window_ids(windows_of(ds))

    first = epoch(0)
    every = sorted(window_ids(windows_of(sequences.sequence_dataset(series_paths, 3, 2, shuffle=False))))
    assert sorted(first) == every and len(set(first)) == len(first)
    # What an exact resume relies on: the same (seed, epoch) gives the same order, batch for batch.
    assert epoch(0) == first
    assert epoch(1) != first and sorted(epoch(1)) == every
    assert epoch(0, seed=1) != first
    # repeat=True keeps going past one pass (training asks for a chunk of steps, not passes).
    repeated = sequences.sequence_dataset(series_paths, 3, batch_size=2, repeat=True, drop_remainder=True)
    ids = window_ids(windows_of(repeated.take(3 * len(every))))
    assert len(ids) == 6 * len(every) and set(ids) == set(every)


def test_series_headers_are_checked_before_streaming(series_paths, tmp_path):
    assert sequences.check_series(series_paths, z_size=4) == LENGTHS
    with pytest.raises(config.ConfigError, match="4-d latents but vae.z_size is 32"):
        sequences.check_series(series_paths, z_size=32)
    broken = tmp_path / series_paths[2].name
    broken.write_bytes(series_paths[2].read_bytes()[:300])
    with pytest.raises(storage.CorruptFileError, match=broken.name):
        sequences.check_series([broken])


def test_padding_never_changes_the_loss(series_paths):
    """One 13-frame episode as a full window, and padded at the end into a window 3 times as long."""
    model = small_model()
    episode = series_paths[LENGTHS.index(13)]
    exact = next(iter(sequences.sequence_dataset([episode], 12, batch_size=1, shuffle=False)))
    padded = next(iter(sequences.sequence_dataset([episode], 40, batch_size=1, shuffle=False)))
    assert exact["mask"].numpy().all() and padded["mask"].numpy().sum() == 13
    a, b = model.compute_losses(exact), model.compute_losses(padded)
    assert set(a) == {"loss", "z_nll", "reward_mse", "done_bce"}
    for key in a:
        np.testing.assert_allclose(float(a[key]), float(b[key]), rtol=1e-5, err_msg=key)
    # A padded batch of two episodes counts exactly the real steps of each.
    pair = next(iter(sequences.sequence_dataset(series_paths[2:4], 40, batch_size=2, shuffle=False)))
    assert pair["mask"].numpy().sum(axis=1).tolist() == LENGTHS[2:4]
    # The streamed evaluation agrees with the model's own loss on the same window (z = mu).
    evaluated = sequences.evaluate_model(model, [episode], 40, batch_size=1)
    assert evaluated["transitions"] == 12 and evaluated["steps"] == 13
    np.testing.assert_allclose(evaluated["z_nll"], float(a["z_nll"]), rtol=1e-5)
    np.testing.assert_allclose(evaluated["reward_mse"], float(a["reward_mse"]), rtol=1e-5)


def test_evaluation_scores_every_transition_and_frame_once(series_paths):
    model = small_model()
    total_transitions, total_frames = sum(n - 1 for n in LENGTHS), sum(LENGTHS)
    for length in (2, 5, 40):
        result = sequences.evaluate_model(model, series_paths, length, batch_size=3)
        assert (result["transitions"], result["steps"]) == (total_transitions, total_frames), length
        assert len(result["z_nll_per_dimension"]) == 4
        assert result["z_nll"] == pytest.approx(np.mean(result["z_nll_per_dimension"]))
        assert result["done_positives"] == sum(i % 2 for i in range(len(LENGTHS)))
        assert 0.0 <= result["done_auc"] <= 1.0 and 0.0 <= result["done_accuracy"] <= 1.0
    # Sampled z: deterministic for a seed, different from z = mu.
    sampled = [sequences.evaluate_model(model, series_paths, 5, 3, sample_seed=s)["z_nll"] for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert sampled[0] != sequences.evaluate_model(model, series_paths, 5, 3)["z_nll"]


def test_the_action_head_is_scored_on_every_transition_once_against_its_baselines(series_paths):
    from models.mdn_rnn import MDNRNN

    model = MDNRNN(z_size=4, hidden_units=8, num_mixtures=2, seed=0, action_head=True)
    assert "action_mse" not in sequences.evaluate_model(small_model(), series_paths, 5, 3)
    actions = [storage.load_episode(p, "series")["action"].astype(np.float64) for p in series_paths]
    persistence = np.concatenate([np.square(a[1:] - a[:-1]) for a in actions]).mean()
    mean = np.array([0.1, 0.5, 0.2])
    train_mean = np.concatenate([np.square(a[1:] - mean) for a in actions]).mean()
    results = [sequences.evaluate_model(model, series_paths, length, batch_size=3, action_mean=mean)
               for length in (2, 5, 40)]
    for result in results:
        assert result["action_mse_persistence"] == pytest.approx(persistence, rel=1e-9)
        assert result["action_mse_train_mean"] == pytest.approx(train_mean, rel=1e-9)
        assert result["action_mse"] == pytest.approx(np.mean(result["action_mse_per_component"]))
    assert results[0]["action_mse"] != pytest.approx(persistence, rel=1e-3)
    # The streamed metric is the model's own action loss on the same window (M restarts at each window).
    episode = series_paths[LENGTHS.index(13)]
    window = next(iter(sequences.sequence_dataset([episode], 12, batch_size=1, shuffle=False)))
    np.testing.assert_allclose(sequences.evaluate_model(model, [episode], 40, 1)["action_mse"],
                               float(model.compute_losses(window)["action_mse"]), rtol=1e-5)


def test_latent_noise_is_the_same_for_a_window_and_its_episode():
    long = sequences.latent_noise(3, "episode_000007.npz", 50, 4)
    np.testing.assert_array_equal(sequences.latent_noise(3, "episode_000007.npz", 20, 4), long[:20])
    assert not np.array_equal(sequences.latent_noise(3, "episode_000008.npz", 50, 4), long)


def test_roc_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    labels = rng.random(60) < 0.3
    scores = np.round(rng.random(60) + 0.3 * labels, 1)  # rounding makes ties
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None]))
    assert sequences.roc_auc(labels, scores) == pytest.approx(pairwise)
    assert sequences.roc_auc([0, 0, 1], [0.1, 0.2, 0.9]) == 1.0
    assert sequences.roc_auc([0, 0, 0], [0.1, 0.2, 0.9]) is None
    assert sequences.roc_auc([1, 1], [0.1, 0.2]) is None


def test_epochs_are_chunks_of_steps_that_add_up_to_the_requested_steps():
    for steps in (1, 4, 40, 42, 97, 100, 1000, 4000):
        for windows, batch in ((0, 2), (1, 2), (7, 2), (190, 16), (9500, 100)):
            per_epoch, epochs = sequences.plan_epochs(steps, windows, batch)
            assert 1 <= per_epoch <= steps
            assert per_epoch >= min(steps, sequences.MIN_STEPS_PER_EPOCH) or per_epoch * epochs == steps
            assert steps <= per_epoch * epochs < steps + epochs
            if steps in (4, 40, 1000, 4000):  # numbers with many divisors are met exactly
                assert per_epoch * epochs == steps, (steps, windows, batch)


# --------------------------------------------------------------------------- 04_train_rnn.py end to end


def test_artifacts_and_metrics(smoke_rnn):
    from models.mdn_rnn import baseline_nlls
    from worldmodels import artifacts

    rnn = smoke_rnn / "rnn"
    for name in ("rnn.keras", "config.json", "split.json", "metrics.json", "checkpoint/checkpoint.npz",
                 "checkpoint/training_state.json"):
        assert (rnn / name).is_file(), name
    cfg = config.load_config(rnn / "config.json")
    assert cfg == SMOKE
    metrics = json.loads((rnn / "metrics.json").read_text())
    assert metrics["steps"] == cfg.rnn.steps and metrics["evaluated_on"] == "heldout"
    for key in ("z_nll", "z_nll_sampled", "reward_mse", "done_accuracy", "train_loss", "heldout_loss"):
        assert math.isfinite(metrics[key]), key
    assert len(metrics["z_nll_per_dimension"]) == cfg.vae.z_size
    assert metrics["z_nll"] == pytest.approx(np.mean(metrics["z_nll_per_dimension"]))
    assert 0 <= metrics["done_accuracy"] <= 1
    if metrics["done_auc"] is None:
        assert metrics["done_positives"] == 0 and "no positive done label" in metrics["done_auc_note"]
    else:
        assert 0 <= metrics["done_auc"] <= 1
    for kind in ("mu", "sampled"):
        assert set(metrics["baselines"][kind]) == {"persistence", "unconditional"}
        assert all(math.isfinite(v) for v in metrics["baselines"][kind].values())
    assert metrics["beats_baselines"] == (metrics["z_nll"] < min(metrics["baselines"]["mu"].values()))
    assert metrics["beats_baselines_sampled"] == (
        metrics["z_nll_sampled"] < min(metrics["baselines"]["sampled"].values()))

    split = json.loads((rnn / "split.json").read_text())
    series = {p.name: storage.load_episode(p, "series") for p in storage.list_episodes(smoke_rnn / "series")}
    heldout = [series[n]["mu"] for n in split["heldout"]]
    assert metrics["evaluated_transitions"] == sum(len(mu) - 1 for mu in heldout)
    # The baselines are baseline_nlls on the same episodes, and the saved M reproduces its metrics.
    direct = baseline_nlls([series[n]["mu"] for n in split["train"]], heldout)
    for name, value in direct.items():
        assert metrics["baselines"]["mu"][name] == pytest.approx(value, rel=1e-6)
    model = artifacts.load_rnn(smoke_rnn, cfg)
    heldout_paths = [smoke_rnn / "series" / n for n in split["heldout"]]
    again = sequences.evaluate_model(model, heldout_paths, cfg.rnn.sequence_length, cfg.rnn.batch_size)
    assert again["z_nll"] == pytest.approx(metrics["z_nll"], rel=1e-5)
    # The held-out loss logged after the last epoch (model.evaluate, z = mu) is the same number:
    # the smoke held-out windows fit in one batch, so the batch mean is the mean over transitions.
    history = json.loads((rnn / "checkpoint" / "training_state.json").read_text())["history"]
    assert history[-1]["heldout_z_nll"] == pytest.approx(metrics["z_nll"], rel=1e-4)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_log = EventAccumulator(str(rnn / "logs" / "train"), size_guidance={"tensors": 0}).Reload()
    heldout_log = EventAccumulator(str(rnn / "logs" / "heldout"), size_guidance={"tensors": 0}).Reload()
    assert {"loss", "z_nll", "reward_mse", "done_bce", "learning_rate"} <= set(train_log.Tags()["tensors"])
    assert {"loss", "z_nll"} <= set(heldout_log.Tags()["tensors"])
    assert heldout_log.Tensors("z_nll")[-1].step == cfg.rnn.steps


def test_informative_comparison_uses_only_dimensions_with_kl():
    base = {"kl_per_dimension": [2.0, 0.01, 0.9],
            "mu_per_dimension": {"persistence": [1.0, -9.0, 3.0], "unconditional": [2.0, -9.0, 4.0]}}
    got = informative_comparison([0.5, 1.4, 2.5], base)
    assert got["informative_dimensions"] == [0, 2]
    assert got["z_nll_informative"] == pytest.approx(1.5)
    assert got["baselines_informative"] == pytest.approx({"persistence": 2.0, "unconditional": 3.0})
    assert got["beats_baselines_informative"] is True
    assert informative_comparison([0.5, 1.4, 2.5], {**base, "kl_per_dimension": [0, 0, 0]})[
        "z_nll_informative"] is None


def test_reevaluate_recomputes_the_metrics_of_a_finished_run(smoke_rnn, tmp_path):
    for name in ("series", "vae", "rnn"):
        shutil.copytree(smoke_rnn / name, tmp_path / name)
    before = json.loads((tmp_path / "rnn" / "metrics.json").read_text())
    proc = run_script(SCRIPT, "--reevaluate", data_dir=tmp_path)
    assert "z NLL, z = mu" in proc.stdout
    after = json.loads((tmp_path / "rnn" / "metrics.json").read_text())
    assert after["z_nll"] == pytest.approx(before["z_nll"], rel=1e-5)
    assert after["baselines"]["mu"] == pytest.approx(before["baselines"]["mu"], rel=1e-9)
    assert len(after["baselines"]["kl_per_dimension"]) == SMOKE.vae.z_size
    assert np.mean(after["baselines"]["mu_per_dimension"]["persistence"]) == pytest.approx(
        after["baselines"]["mu"]["persistence"], rel=1e-9)
    assert "beats_baselines_informative" in after


def test_split_is_vs_split(smoke_rnn):
    """M is validated on the episodes V was validated on, never on frames V trained on."""
    rnn_split = json.loads((smoke_rnn / "rnn" / "split.json").read_text())
    vae_split = json.loads((smoke_rnn / "vae" / "split.json").read_text())
    assert rnn_split["heldout"] and rnn_split["heldout"] == vae_split["heldout"]
    assert rnn_split["train"] == vae_split["train"]


def test_rerun_of_a_finished_run_is_a_noop(smoke_rnn):
    rnn = smoke_rnn / "rnn"
    files = [rnn / "rnn.keras", rnn / "metrics.json", rnn / "checkpoint" / "checkpoint.npz"]
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    start = time.perf_counter()
    proc = run_script(SCRIPT, data_dir=smoke_rnn)
    assert "already trained" in proc.stdout and "z NLL, z = mu" in proc.stdout and "persistence" in proc.stdout
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    # Nothing is imported or trained: far less than the TensorFlow import alone.
    assert time.perf_counter() - start < 4


def test_sigkill_mid_epoch_then_rerun_continues_where_it_stopped(tmp_path, smoke_rnn):
    from worldmodels import training

    shutil.copytree(smoke_rnn / "series", tmp_path / "series")
    # Windows of 9 transitions cut each 60-frame episode into 7, so an epoch has several steps.
    extra = ["--set", "rnn.steps=42", "--set", "rnn.sequence_length=9", "--checkpoint-every", "1"]
    cmd = [sys.executable, str(REPO / SCRIPT), "--preset", "smoke", "--data-dir", str(tmp_path), *extra]
    checkpoint = tmp_path / "rnn" / "checkpoint"
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads((checkpoint / "training_state.json").read_text())["step"] >= 4:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = training.load_state(checkpoint)
    assert saved is not None and saved["epoch"] < saved["epochs"] and saved["step"] > 0, \
        "the kill should land mid-epoch"
    assert not (tmp_path / "rnn" / "metrics.json").exists()

    rerun = run_script(SCRIPT, *extra, data_dir=tmp_path)
    steps, epochs = saved["steps_per_epoch"], saved["epochs"]
    assert steps * epochs == 42 and epochs > 1
    assert f"resuming at epoch {saved['epoch'] + 1}/{epochs}, step {saved['step']}/{steps}" in rerun.stdout
    state = training.load_state(checkpoint)
    last = state["sessions"][-1]
    assert (last["start_epoch"], last["start_step"]) == (saved["epoch"], saved["step"])
    # No update was repeated: the resumed session did exactly the updates the checkpoint lacked.
    assert last["start_iterations"] == saved["iterations"] == saved["epoch"] * steps + saved["step"]
    assert state["iterations"] == 42 == last["start_iterations"] + last["steps_trained"]
    assert [h["epoch"] for h in state["history"]] == list(range(1, epochs + 1))
    assert json.loads((tmp_path / "rnn" / "metrics.json").read_text())["steps"] == 42


def test_notebook_executes_and_is_committed_without_outputs(smoke_rnn):
    check_notebook(REPO / "notebooks" / "check_04_rnn.ipynb", smoke_rnn)


def test_missing_or_empty_series_folder_is_a_clear_error(tmp_path):
    proc = run_script(SCRIPT, data_dir=tmp_path, check=False)
    assert_user_error(proc, tmp_path / "series", "03_generate_rnn_data.py")
    (tmp_path / "series").mkdir()
    proc = run_script(SCRIPT, data_dir=tmp_path, check=False)
    assert_user_error(proc, tmp_path / "series", "holds no series")


def test_incompatible_series_or_rnn_folder_is_refused(tmp_path, smoke_rnn):
    shutil.copytree(smoke_rnn / "series", tmp_path / "series")
    proc = run_script(SCRIPT, "--set", "vae.z_size=16", data_dir=tmp_path, check=False)
    assert_user_error(proc, tmp_path / "series", "vae.z_size: artifact has 32, current config has 16")
    # An rnn/ folder of another M is not continued with a different network.
    (tmp_path / "rnn").mkdir()
    shutil.copy(smoke_rnn / "rnn" / "config.json", tmp_path / "rnn" / "config.json")
    proc = run_script(SCRIPT, "--set", "rnn.hidden_units=64", data_dir=tmp_path, check=False)
    assert_user_error(proc, tmp_path / "rnn", "rnn.hidden_units: artifact has 256, current config has 64")
    assert not (tmp_path / "rnn" / "checkpoint").exists()


def test_old_rnn_config_without_the_action_head_loads_as_off(smoke_rnn, tmp_path):
    from worldmodels import artifacts

    saved = json.loads((smoke_rnn / "rnn" / "config.json").read_text())
    for key in ("action_head", "action_weight"):
        saved["rnn"].pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = config.load_config(tmp_path / "config.json")
    assert old == SMOKE and old.rnn.action_head is False
    config.check_compatible(old, SMOKE, artifacts.RNN_KEYS, "M")
    with pytest.raises(config.ConfigError, match="rnn.action_head: artifact has False, current config has True"):
        config.check_compatible(old, config.make_config("smoke", {"rnn.action_head": "true"}), artifacts.RNN_KEYS, "M")


def test_stage_4_with_the_action_head_writes_the_action_metric(smoke_rnn, tmp_path):
    from worldmodels import artifacts

    shutil.copytree(smoke_rnn / "series", tmp_path / "series")
    proc = run_script(SCRIPT, "--set", "rnn.action_head=true", "--set", "rnn.action_weight=0.5", data_dir=tmp_path)
    assert "next action MSE" in proc.stdout and "a_t+1 = a_t" in proc.stdout
    cfg = config.load_config(tmp_path / "rnn" / "config.json")
    assert cfg.rnn.action_head and cfg.rnn.action_weight == 0.5
    metrics = json.loads((tmp_path / "rnn" / "metrics.json").read_text())
    for key in ("action_mse", "action_mse_persistence", "action_mse_train_mean"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0, key
    assert len(metrics["action_mse_per_component"]) == 3
    assert metrics["beats_action_baselines"] == (
        metrics["action_mse"] < min(metrics["action_mse_persistence"], metrics["action_mse_train_mean"]))
    assert metrics["fingerprint"]["rnn.action_weight"] == 0.5
    # The smoke run without the head has none of these, and its fingerprint is the one from before the option.
    plain = json.loads((smoke_rnn / "rnn" / "metrics.json").read_text())
    assert not any(key.startswith(("action", "beats_action")) for key in plain)
    assert "rnn.action_weight" not in plain["fingerprint"]
    model = artifacts.load_rnn(tmp_path, cfg)
    assert model.action_head and model.action_weight == 0.5
    history = json.loads((tmp_path / "rnn" / "checkpoint" / "training_state.json").read_text())["history"]
    assert "action_mse" in history[-1] and "heldout_action_mse" in history[-1]
    # An M without the head is refused by a run with it, and the other way round.
    proc = run_script(SCRIPT, data_dir=tmp_path, check=False)
    assert_user_error(proc, tmp_path / "rnn", "rnn.action_head: artifact has True, current config has False")


def test_stage_4_with_scheduled_sampling_trains_on_ms_own_draws(smoke_rnn, tmp_path):
    from worldmodels import artifacts

    shutil.copytree(smoke_rnn / "series", tmp_path / "series")
    run_script(SCRIPT, "--set", "rnn.scheduled_sampling=0.5", data_dir=tmp_path)
    cfg = config.load_config(tmp_path / "rnn" / "config.json")
    metrics = json.loads((tmp_path / "rnn" / "metrics.json").read_text())
    assert metrics["fingerprint"]["rnn.scheduled_sampling"] == 0.5 and math.isfinite(metrics["z_nll"])
    assert artifacts.load_rnn(tmp_path, cfg).scheduled_sampling == 0.5
    # Off (the default), the fingerprint is the one from before the option, so older runs still resume.
    plain = json.loads((smoke_rnn / "rnn" / "metrics.json").read_text())
    assert "rnn.scheduled_sampling" not in plain["fingerprint"]
