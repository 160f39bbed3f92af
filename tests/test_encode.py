"""03_generate_rnn_data.py: series files from rollouts with V, resumable, with clear errors."""

import shutil

import numpy as np
import pytest

import config
from tests.conftest import run_script
from worldmodels import artifacts, storage


def make_untrained_vision(data_dir, z_size=32, seed=1):
    """A V artifact with random weights: 03's mechanics do not depend on training."""
    from models.vae import ConvVAE

    cfg = config.make_config("smoke", {"vae.z_size": str(z_size)})
    path = artifacts.vision_path(data_dir, cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    ConvVAE(z_size=z_size, seed=seed).save(path)
    config.save_config(cfg, path.parent)
    return path


@pytest.fixture
def data_with_vision(tmp_path, smoke_rollouts):
    shutil.copytree(smoke_rollouts / "rollouts", tmp_path / "rollouts")
    make_untrained_vision(tmp_path)
    return tmp_path


def test_series_match_a_direct_encoding(data_with_vision):
    run_script("03_generate_rnn_data.py", data_dir=data_with_vision)
    cfg = config.make_config("smoke")
    vision = artifacts.load_vision(data_with_vision, cfg)
    rollouts = storage.list_episodes(data_with_vision / "rollouts")
    series = storage.list_episodes(data_with_vision / "series")
    assert [p.name for p in series] == [p.name for p in rollouts]
    for r_path, s_path in zip(rollouts, series):
        r, s = storage.load_episode(r_path), storage.load_episode(s_path, "series")
        mu, logvar = vision.encode(r["obs"][:7])
        np.testing.assert_allclose(s["mu"][:7], mu, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s["logvar"][:7], logvar, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(s["action"], r["action"])
        np.testing.assert_array_equal(s["reward"], r["reward"])
        np.testing.assert_array_equal(s["done"], r["terminated"])
        assert s["policy"] == r["policy"] == "brownian"
        assert s["mu"].shape == (len(r["obs"]), 32)
    assert (data_with_vision / "series" / "config.json").exists()


def test_rerun_redoes_only_missing_or_broken_episodes(data_with_vision):
    run_script("03_generate_rnn_data.py", data_dir=data_with_vision)
    series_dir = data_with_vision / "series"
    paths = storage.list_episodes(series_dir)
    kept_mtime = paths[0].stat().st_mtime_ns
    paths[1].unlink()                                       # never finished
    paths[2].write_bytes(paths[2].read_bytes()[:500])       # truncated by some accident
    (series_dir / ".episode_000001.npz.k1.tmp").write_bytes(b"partial")  # what SIGKILL mid-write leaves
    proc = run_script("03_generate_rnn_data.py", data_dir=data_with_vision)
    assert "1 of 3 episodes already encoded; encoding 2" in proc.stdout
    assert paths[0].stat().st_mtime_ns == kept_mtime
    assert all(storage.check_episode(p, "series") for p in storage.list_episodes(series_dir))
    assert not list(series_dir.glob("*.tmp"))


def test_missing_vision_is_a_clear_error(tmp_path, smoke_rollouts):
    shutil.copytree(smoke_rollouts / "rollouts", tmp_path / "rollouts")
    proc = run_script("03_generate_rnn_data.py", data_dir=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no V (vae)" in proc.stderr and "02_train_vae.py" in proc.stderr


def test_missing_rollouts_is_a_clear_error(tmp_path):
    proc = run_script("03_generate_rnn_data.py", data_dir=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no rollouts folder" in proc.stderr and "01_generate_data.py" in proc.stderr


def test_incompatible_vision_is_refused(tmp_path, smoke_rollouts):
    shutil.copytree(smoke_rollouts / "rollouts", tmp_path / "rollouts")
    make_untrained_vision(tmp_path, z_size=16)
    proc = run_script("03_generate_rnn_data.py", data_dir=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "vae.z_size: artifact has 16, current config has 32" in proc.stderr


def test_corrupt_rollout_is_named(data_with_vision):
    victim = data_with_vision / "rollouts" / storage.episode_name(1)
    victim.write_bytes(victim.read_bytes()[:2000])
    proc = run_script("03_generate_rnn_data.py", data_dir=data_with_vision, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "episode_000001.npz" in proc.stderr and "truncated or corrupt" in proc.stderr


def test_policy_tags_survive_encoding_and_untagged_rollouts_still_encode(data_with_vision):
    """Each series keeps its rollout's policy tag; rollouts recorded before tags existed still
    load and encode, and their series simply carry no tag."""
    paths = storage.list_episodes(data_with_vision / "rollouts")
    tagged = storage.load_episode(paths[0])
    storage.save_episode(paths[0], {**tagged, "policy": np.str_("expert")})
    old = storage.load_episode(paths[1])
    storage.save_episode(paths[1], {k: v for k, v in old.items() if k != "policy"})
    assert "policy" not in storage.load_episode(paths[1])
    run_script("03_generate_rnn_data.py", data_dir=data_with_vision)
    series = [storage.load_episode(p, "series") for p in storage.list_episodes(data_with_vision / "series")]
    assert series[0]["policy"] == "expert"
    assert "policy" not in series[1]
    assert series[2]["policy"] == "brownian"
