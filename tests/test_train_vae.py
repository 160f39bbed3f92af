"""02_train_vae.py and its library: the episode split, streaming frames, exact resume, clear errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import config
from tests.conftest import REPO, assert_user_error, check_notebook, run_script
from worldmodels import datasets, storage

SCRIPT = "02_train_vae.py"


# --------------------------------------------------------------------------- helpers


def write_episodes(folder: Path, lengths, noise: bool = False) -> list[Path]:
    """Rollout files whose frame t of episode i has pixel (0, 0) = (i, t, 7): every frame is identifiable."""
    rng = np.random.default_rng(0)
    paths = []
    for i, length in enumerate(lengths):
        obs = rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8) if noise \
            else np.zeros((length, 64, 64, 3), np.uint8)
        obs[:, 0, 0] = np.stack([np.full(length, i), np.arange(length), np.full(length, 7)], axis=1)
        arrays = {"obs": obs, "action": np.zeros((length, 3), np.float32), "reward": np.zeros(length, np.float32),
                  "terminated": np.zeros(length, bool), "truncated": np.zeros(length, bool), "seed": np.int64(i)}
        paths.append(storage.save_episode(folder / storage.episode_name(i), arrays))
    return paths


def frame_ids(batches) -> list[tuple[int, int]]:
    return [(int(f[0, 0, 0]), int(f[0, 0, 1])) for b in batches for f in b]


def copy_rollouts(source: Path, target: Path) -> Path:
    shutil.copytree(source / "rollouts", target / "rollouts")
    return target


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_decided_by_file_name():
    paths = [Path("/a") / storage.episode_name(i) for i in range(200)]
    train, heldout = datasets.split_episodes(paths, 0.1, seed=3)
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(paths)
    # Same names in another folder and in another order: the same split (V's rollouts and M's series).
    moved = [Path("/b/series") / p.name for p in reversed(paths)]
    train_b, heldout_b = datasets.split_episodes(moved, 0.1, seed=3)
    assert [p.name for p in heldout_b] == [p.name for p in heldout]
    # Roughly the asked fraction (20 expected; a binomial draw stays far inside these bounds).
    assert 5 <= len(heldout) <= 40
    assert datasets.split_episodes(paths, 0.1, seed=4)[1] != heldout


def test_split_is_stable_when_episodes_are_added():
    first = [Path(storage.episode_name(i)) for i in range(200)]
    more = first + [Path(storage.episode_name(i)) for i in range(200, 500)]
    train, heldout = datasets.split_episodes(first, 0.05, seed=0)
    train_more, heldout_more = datasets.split_episodes(more, 0.05, seed=0)
    assert set(heldout) == set(heldout_more) & set(first)
    assert set(train) == set(train_more) & set(first)


def test_split_of_few_episodes_keeps_both_sets_non_empty():
    two = [Path(storage.episode_name(i)) for i in range(2)]
    for fraction in (0.01, 0.99):
        train, heldout = datasets.split_episodes(two, fraction, seed=0)
        assert len(train) == 1 and len(heldout) == 1
    assert datasets.split_episodes(two, 0.0, seed=0) == (two, [])
    with pytest.raises(storage.MissingDataError, match="too few"):
        datasets.split_episodes(two[:1], 0.5, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        datasets.split_episodes(two, 1.0, seed=0)


# --------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def small_rollouts(tmp_path_factory) -> list[Path]:
    return write_episodes(tmp_path_factory.mktemp("rollouts"), [7, 12, 5, 9, 11])


def test_headers_give_lengths_and_frame_count(small_rollouts):
    assert datasets.check_episodes(small_rollouts) == [7, 12, 5, 9, 11]
    assert datasets.count_frames(small_rollouts) == 44


def test_frame_dataset_yields_every_frame_once_per_epoch_in_a_new_order(small_rollouts):
    expected = sorted((i, t) for i, n in enumerate([7, 12, 5, 9, 11]) for t in range(n))

    def epoch(e):
        ds = datasets.frame_dataset(small_rollouts, batch_size=4, shuffle_buffer=8, episodes_in_flight=2,
                                    seed=0, epoch=e)
        return [b.numpy() for b in ds]

    first = epoch(0)
    assert all(b.dtype == np.uint8 and b.shape[1:] == (64, 64, 3) for b in first)
    assert [len(b) for b in first[:-1]] == [4] * (len(first) - 1) and 1 <= len(first[-1]) <= 4
    assert len(first) == datasets.steps_per_epoch(44, 4)
    assert sorted(frame_ids(first)) == expected
    # The same epoch gives the same batches (what exact resume relies on); the next epoch a new order.
    assert frame_ids(epoch(0)) == frame_ids(first)
    second = epoch(1)
    assert sorted(frame_ids(second)) == expected and frame_ids(second) != frame_ids(first)
    # Frames of different episodes are mixed within the first batches, not one episode after another.
    assert len({i for i, _ in frame_ids(first[:3])}) > 1


def test_unshuffled_dataset_is_in_file_and_time_order(small_rollouts):
    ds = datasets.frame_dataset(small_rollouts, batch_size=10, shuffle=False)
    assert frame_ids(b.numpy() for b in ds) == [(i, t) for i, n in enumerate([7, 12, 5, 9, 11]) for t in range(n)]


def test_damaged_frames_are_reported_by_file_name(tmp_path):
    (path,) = write_episodes(tmp_path, [40], noise=True)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("obs.npy")
    data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw = bytearray(path.read_bytes())
    middle = data_start + info.compress_size // 2
    raw[middle:middle + 256] = bytes(256)
    path.write_bytes(bytes(raw))
    # The headers are intact, so the cheap check passes; reading the frames must name the file.
    assert datasets.check_episodes([path]) == [40]
    with pytest.raises(storage.CorruptFileError, match=path.name):
        with datasets.surface_corrupt_files():
            for _ in datasets.frame_dataset([path], batch_size=8):
                pass


def test_truncated_file_fails_the_cheap_check(tmp_path):
    paths = write_episodes(tmp_path, [5, 5])
    paths[1].write_bytes(paths[1].read_bytes()[:500])
    with pytest.raises(storage.CorruptFileError, match=paths[1].name):
        datasets.check_episodes(paths)


# --------------------------------------------------------------------------- resumable training helper


class Crash(Exception):
    """Stands for SIGKILL in the in-process tests: nothing after it runs."""


def tiny_model(init_seed: int):
    """A model with Adam and a random layer (GaussianNoise draws from a SeedGenerator at every step).

    Like a script starting, it first sets the global seed (always the same, as a script sets it
    from its config): tf.data shuffles depend on it. ``init_seed`` only changes the initial weights.
    """
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    x = keras.layers.GaussianNoise(0.5, seed=11)(inputs)
    dense = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=init_seed))
    model = keras.Model(inputs, dense(x))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def tiny_dataset(epoch: int):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32))[:, None]
    return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(40, seed=epoch).batch(4)


def crash_after(model, updates: int):
    """Make the model's training function raise Crash instead of running update number ``updates + 1``."""
    make = model.make_train_function

    def make_crashing(force=False):
        make(force)
        step, calls = model.train_function, [0]

        def crashing(iterator):
            if calls[0] == updates:
                raise Crash
            calls[0] += 1
            return step(iterator)

        model.train_function = crashing

    model.make_train_function = make_crashing


def all_values(model):
    return [v.numpy() for v in model.variables] + [v.numpy() for v in model.optimizer.variables]


def test_resume_after_a_crash_matches_an_uninterrupted_run_exactly(tmp_path):
    from worldmodels import training

    steps, epochs, every, crash_at = 10, 3, 3, 14
    reference = tiny_model(0)
    reference_state = training.train(reference, tiny_dataset, steps, epochs, tmp_path / "ref",
                                     checkpoint_every_steps=every, log=lambda m: None)

    crashed = tiny_model(0)
    crash_after(crashed, crash_at)
    with pytest.raises(Crash):
        training.train(crashed, tiny_dataset, steps, epochs, tmp_path / "run", checkpoint_every_steps=every,
                       log=lambda m: None)
    saved = training.load_state(tmp_path / "run")
    # The last checkpoint before update 15 is the one after 3 full checkpoint intervals of epoch 1.
    assert (saved["epoch"], saved["step"]) == (crash_at // steps, (crash_at % steps) // every * every)

    # A new process: a freshly initialised model (other initial weights) restores everything from disk.
    resumed = tiny_model(99)
    messages = []
    state = training.train(resumed, tiny_dataset, steps, epochs, tmp_path / "run", checkpoint_every_steps=every,
                           log=messages.append)
    assert any(f"resuming at epoch {saved['epoch'] + 1}/{epochs}, step {saved['step']}/{steps}" in m for m in messages)
    last = state["sessions"][-1]
    assert (last["start_epoch"], last["start_step"]) == (saved["epoch"], saved["step"])
    assert last["steps_trained"] == steps * epochs - (saved["epoch"] * steps + saved["step"])
    assert state["iterations"] == steps * epochs == reference_state["iterations"]
    # Same weights, Adam moments, RNG state and per-epoch mean losses as the run that never stopped:
    # the batches after the resume are the same, and so are the noise draws.
    for a, b in zip(all_values(resumed), all_values(reference)):
        np.testing.assert_array_equal(a, b)
    assert state["history"] == reference_state["history"]

    # A finished run is a no-op.
    before = all_values(resumed)
    again = training.train(resumed, tiny_dataset, steps, epochs, tmp_path / "run", log=messages.append)
    assert len(again["sessions"]) == len(state["sessions"]) and "complete" in messages[-1]
    for a, b in zip(all_values(resumed), before):
        np.testing.assert_array_equal(a, b)


def test_crash_during_the_epoch_end_callback_reruns_only_the_callback(tmp_path):
    from worldmodels import training

    calls = []

    def on_epoch_end(epoch, logs):
        calls.append(epoch)
        if len(calls) == 1:
            raise Crash
        return {"heldout_loss": 1.5}

    with pytest.raises(Crash):
        training.train(tiny_model(0), tiny_dataset, 10, 2, tmp_path, on_epoch_end=on_epoch_end, log=lambda m: None)
    assert training.load_state(tmp_path)["epoch_end_pending"] == 0
    state = training.train(tiny_model(0), tiny_dataset, 10, 2, tmp_path, on_epoch_end=on_epoch_end,
                           log=lambda m: None)
    assert calls == [0, 0, 1]
    assert (state["sessions"][-1]["start_epoch"], state["sessions"][-1]["start_step"]) == (1, 0)
    assert state["iterations"] == 20 and [h["heldout_loss"] for h in state["history"]] == [1.5, 1.5]


def test_a_checkpoint_of_another_model_or_data_is_refused(tmp_path):
    import keras

    from worldmodels import training

    training.train(tiny_model(0), tiny_dataset, 10, 1, tmp_path, fingerprint={"frames": 40}, log=lambda m: None)
    with pytest.raises(config.ConfigError, match="frames"):
        training.train(tiny_model(0), tiny_dataset, 10, 2, tmp_path, fingerprint={"frames": 41}, log=lambda m: None)
    wider = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    wider.compile(optimizer="adam", loss="mse")
    with pytest.raises(config.ConfigError, match="delete"):
        training.train(wider, tiny_dataset, 10, 2, tmp_path, fingerprint={"frames": 40}, log=lambda m: None)


# --------------------------------------------------------------------------- 02_train_vae.py end to end


def saved_groups(path: Path) -> set[str]:
    """The top-level groups of a saved model's weights file (``.keras`` archive or ``.weights.h5``)."""
    import h5py

    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as f, h5py.File(f, "r") as h5:
            return set(h5.keys())
    with h5py.File(path, "r") as h5:
        return set(h5.keys())


def test_saved_model_files_hold_no_optimizer_state_and_training_goes_on(tmp_path):
    from worldmodels import training

    model = tiny_model(0)
    model.fit(tiny_dataset(0), epochs=1, verbose=0)
    optimizer = model.optimizer
    model.save(tmp_path / "keras_default.keras")  # what Keras alone writes: Adam's moments too
    assert "optimizer" in saved_groups(tmp_path / "keras_default.keras")
    for name in ("m.keras", "m.weights.h5"):
        training.atomic_save_model(model, tmp_path / name)
        assert "optimizer" not in saved_groups(tmp_path / name)
    assert model.optimizer is optimizer  # put back: a mid-run save does not stop the training
    import keras

    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    before = int(optimizer.iterations.numpy())
    model.fit(tiny_dataset(1), epochs=1, verbose=0)
    assert int(optimizer.iterations.numpy()) == before + 10


def test_artifacts_and_metrics(smoke_vae):
    vae = smoke_vae / "vae"
    for name in ("vae.keras", "vae.weights.h5", "config.json", "split.json", "metrics.json",
                 "checkpoint/checkpoint.npz", "checkpoint/training_state.json"):
        assert (vae / name).is_file(), name
    assert "optimizer" not in saved_groups(vae / "vae.keras") | saved_groups(vae / "vae.weights.h5")
    cfg = config.load_config(vae / "config.json")
    assert cfg == config.make_config("smoke")
    metrics = json.loads((vae / "metrics.json").read_text())
    split = json.loads((vae / "split.json").read_text())
    names = [p.name for p in storage.list_episodes(smoke_vae / "rollouts")]
    assert sorted(split["train"] + split["heldout"]) == names and not set(split["train"]) & set(split["heldout"])
    assert split["heldout"] == [p.name for p in datasets.split_episodes(
        [Path(n) for n in names], cfg.vae.heldout_fraction, cfg.vae.split_seed)[1]]

    heldout_frames = datasets.count_frames([smoke_vae / "rollouts" / n for n in split["heldout"]])
    assert metrics["epochs"] == cfg.vae.epochs and metrics["evaluated_on"] == "heldout"
    assert metrics["heldout_episodes"] == len(split["heldout"]) and metrics["heldout_frames"] == heldout_frames
    for key in ("reconstruction_mse", "psnr_db", "kl_per_frame", "train_loss", "heldout_loss"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["reconstruction_mse"] < 1
    assert len(metrics["kl_per_dimension"]) == cfg.vae.z_size
    assert metrics["kl_per_frame"] == pytest.approx(sum(metrics["kl_per_dimension"]))
    assert 0 <= metrics["active_dimensions"] <= cfg.vae.z_size

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_log = EventAccumulator(str(vae / "logs" / "train"), size_guidance={"tensors": 0}).Reload()
    heldout_log = EventAccumulator(str(vae / "logs" / "heldout"), size_guidance={"tensors": 0}).Reload()
    assert {"loss", "reconstruction_loss", "kl_loss"} <= set(train_log.Tags()["tensors"])
    assert {"loss", "originals_vs_reconstructions"} <= set(heldout_log.Tags()["tensors"])
    assert [e.step for e in heldout_log.Tensors("loss")] == list(range(1, cfg.vae.epochs + 1))


def test_rerun_of_a_finished_run_is_a_noop(smoke_vae):
    vae = smoke_vae / "vae"
    files = [vae / "vae.keras", vae / "vae.weights.h5", vae / "metrics.json", vae / "checkpoint" / "checkpoint.npz"]
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    start = time.perf_counter()
    proc = run_script(SCRIPT, data_dir=smoke_vae)
    assert "already trained" in proc.stdout
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before
    # Nothing is imported or trained: far less than the TensorFlow import alone.
    assert time.perf_counter() - start < 4


def test_sigkill_mid_epoch_then_rerun_continues_where_it_stopped(tmp_path, smoke_rollouts):
    from worldmodels import training

    data = copy_rollouts(smoke_rollouts, tmp_path)
    extra = ["--set", "vae.epochs=2", "--set", "vae.batch_size=4", "--checkpoint-every", "4"]
    cmd = [sys.executable, str(REPO / SCRIPT), "--preset", "smoke", "--data-dir", str(data), *extra]
    state_file = data / "vae" / "checkpoint" / "training_state.json"
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(state_file.read_text())["step"] >= 4:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = training.load_state(data / "vae" / "checkpoint")
    assert saved is not None and saved["epoch"] < 2 and saved["step"] > 0, "the kill should land mid-epoch"
    assert not (data / "vae" / "metrics.json").exists()

    rerun = run_script(SCRIPT, *extra, data_dir=data)
    steps = saved["steps_per_epoch"]
    assert f"resuming at epoch {saved['epoch'] + 1}/2, step {saved['step']}/{steps}" in rerun.stdout
    state = training.load_state(data / "vae" / "checkpoint")
    last = state["sessions"][-1]
    assert (last["start_epoch"], last["start_step"]) == (saved["epoch"], saved["step"])
    # No update was repeated: the resumed session did exactly the updates the checkpoint lacked.
    assert last["start_iterations"] == saved["iterations"] == saved["epoch"] * steps + saved["step"]
    assert state["iterations"] == 2 * steps == last["start_iterations"] + last["steps_trained"]
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert json.loads((data / "vae" / "metrics.json").read_text())["epochs"] == 2


def test_notebook_executes_and_is_committed_without_outputs(smoke_vae):
    check_notebook(REPO / "notebooks" / "check_02_vae.ipynb", smoke_vae)


def test_missing_or_empty_rollouts_folder_is_a_clear_error(tmp_path):
    proc = run_script(SCRIPT, data_dir=tmp_path, check=False)
    assert_user_error(proc, tmp_path / "rollouts", "01_generate_data.py")
    (tmp_path / "rollouts").mkdir()
    proc = run_script(SCRIPT, data_dir=tmp_path, check=False)
    assert_user_error(proc, tmp_path / "rollouts", "holds no rollouts")


def test_corrupt_episode_is_named_before_training(tmp_path, smoke_rollouts):
    data = copy_rollouts(smoke_rollouts, tmp_path)
    victim = data / "rollouts" / storage.episode_name(1)
    victim.write_bytes(victim.read_bytes()[:2000])
    proc = run_script(SCRIPT, data_dir=data, check=False)
    assert_user_error(proc, victim)
    assert not (data / "vae" / "checkpoint").exists()


def test_vae_gan_trains_as_v_and_stage_3_uses_it_unchanged(tmp_path, smoke_rollouts):
    """vae.model=vae_gan: 02 trains the VAE-GAN into vae_gan/, and 03 encodes with it through the same API."""
    shutil.copytree(smoke_rollouts / "rollouts", tmp_path / "rollouts")
    run_script(SCRIPT, "--set", "vae.model=vae_gan", data_dir=tmp_path)
    folder = tmp_path / "vae_gan"
    for name in ("vae_gan.keras", "vae_gan.weights.h5", "config.json", "metrics.json"):
        assert (folder / name).is_file(), name
    assert not (tmp_path / "vae").exists()
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("reconstruction_mse", "psnr_db", "kl_per_frame", "train_loss"):
        assert math.isfinite(metrics[key]), key
    run_script("03_generate_rnn_data.py", "--set", "vae.model=vae_gan", data_dir=tmp_path)
    assert len(storage.list_episodes(tmp_path / "series")) == 3
    # The plain-VAE config cannot consume series made with the VAE-GAN.
    proc = run_script("03_generate_rnn_data.py", data_dir=tmp_path, check=False)
    assert proc.returncode == 2 and "vae.model" in proc.stderr
