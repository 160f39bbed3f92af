"""worldmodels/metrics.py: V's totals over batches are exact means, C's score summary, the grid frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models import vae as vae_lib
from worldmodels import metrics, storage


def random_batch(rng, n, z=4):
    frames = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    recon = rng.random((n, 8, 8, 3), dtype=np.float32)
    mu = rng.normal(size=(n, z)).astype(np.float32)
    logvar = rng.normal(scale=0.3, size=(n, z)).astype(np.float32)
    return frames, recon, mu, logvar


def test_vision_totals_over_uneven_batches_equal_the_metrics_of_all_frames():
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, n) for n in (5, 1, 7)]
    totals = metrics.VisionTotals()
    for batch in batches:
        totals.add(*batch)
    got = totals.result()
    frames, recon, mu, logvar = (np.concatenate(parts) for parts in zip(*batches))
    pixel = vae_lib.reconstruction_metrics(frames, recon)
    kl = vae_lib.kl_per_dimension(mu, logvar)
    assert got["reconstruction_mse"] == pytest.approx(pixel["mse"], rel=1e-6)
    assert got["psnr_db"] == pytest.approx(pixel["psnr"], rel=1e-6)
    assert got["kl_per_dimension"] == pytest.approx(kl.tolist(), rel=1e-5)
    assert got["kl_per_frame"] == pytest.approx(float(kl.sum()), rel=1e-5)
    assert got["active_dimensions"] == vae_lib.active_dimensions(mu)


def test_vision_totals_without_frames_is_a_clear_error():
    with pytest.raises(storage.MissingDataError, match="no frames"):
        metrics.VisionTotals().result()


def test_score_summary():
    assert metrics.score_summary([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    with pytest.raises(ValueError, match="shape"):
        metrics.score_summary([])


def test_grid_frames_spread_over_the_first_episode(tmp_path):
    from tests.test_train_vae import write_episodes

    paths = write_episodes(tmp_path, [20, 5])
    picked = metrics.grid_frames(paths, count=4)
    assert [(int(f[0, 0, 0]), int(f[0, 0, 1])) for f in picked] == [(0, 0), (0, 6), (0, 12), (0, 19)]
    assert len(metrics.grid_frames(paths[1], count=50)) == 5  # never more frames than the episode has


def test_paired_comparison_is_the_per_track_difference():
    from worldmodels.metrics import paired_comparison

    rng = np.random.default_rng(3)
    a = rng.normal(500, 200, size=100)
    b = a + rng.normal(2.0, 1.0, size=100)
    result = paired_comparison(a, b)
    diff = b - a
    assert result["difference"]["mean"] == pytest.approx(b.mean() - a.mean())
    assert result["difference"]["sem"] == pytest.approx(diff.std(ddof=1) / 10)
    low, high = result["difference"]["ci95"]
    assert low < diff.mean() < high and high - low < 1.0  # pairing removes the 200-point track spread
    assert result["a"]["mean"] == pytest.approx(a.mean()) and result["tracks"] == 100
    same = paired_comparison(a, a)
    assert same["difference"]["tracks_differing"] == 0 and same["difference"]["max_abs"] == 0.0
    with pytest.raises(ValueError, match="equal-length"):
        paired_comparison(a, b[:-1])


def test_paired_files_refuse_evaluations_on_other_tracks(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, assert_user_error

    def write(name, scores, track_seed=2_000_000, **extra):
        path = tmp_path / name
        path.write_text(json.dumps({"scores": scores, "track_seed": track_seed, "episodes": len(scores),
                                    "max_steps": 1000, **extra}))
        return path

    stock = write("stock.json", [1.0, 5.0, 3.0], observation="stock")
    fast = write("fast.json", [1.0, 6.0, 3.0], observation="fast")
    run = [sys.executable, "-m", "worldmodels.metrics", "paired"]
    proc = subprocess.run(run + [str(stock), str(fast), "--out", str(tmp_path / "p.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["difference"]["mean"] == pytest.approx(1 / 3) and written["difference"]["tracks_differing"] == 1
    assert (written["a"]["observation"], written["b"]["observation"]) == ("stock", "fast")
    other = write("other.json", [1.0, 6.0, 3.0], track_seed=7)
    proc = subprocess.run(run + [str(stock), str(other)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_user_error(proc, "other tracks", "track_seed: 2000000 vs 7")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_vision_by_policy_scores_each_tag_on_episodes_v_did_not_train_on(smoke_vae, tmp_path):
    """The CLI skips V's training episodes (also through a symlink), groups the rest by policy tag, and each
    group's numbers are vision_metrics of exactly its episodes."""
    import json
    import os
    import subprocess
    import sys

    import config
    from worldmodels import artifacts

    split = json.loads((smoke_vae / "vae" / "split.json").read_text())
    rollouts = smoke_vae / "rollouts"
    driving = tmp_path / "driving"
    driving.mkdir()
    arrays = storage.load_episode(rollouts / split["train"][0])
    storage.save_episode(driving / "episode_000000.npz", {**arrays, "policy": np.array("controller")})
    os.symlink(rollouts / split["train"][-1], driving / "episode_000001.npz")  # a training episode under another name
    out = tmp_path / "vision.json"
    proc = subprocess.run([sys.executable, "-m", "worldmodels.metrics", "vision", "--data-dir", str(smoke_vae),
                           str(rollouts), str(driving), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())["policies"]
    assert sorted(result) == ["brownian", "controller"]
    assert [Path(f).name for f in result["brownian"]["files"]] == split["heldout"]
    assert result["controller"]["files"] == [str(driving / "episode_000000.npz")]
    assert "PSNR" in proc.stdout and "controller: 1 episodes" in proc.stdout

    cfg = config.load_config(smoke_vae / "vae" / "config.json")
    model = artifacts.load_vision(smoke_vae, cfg)
    for tag, row in result.items():
        expected = metrics.vision_metrics(model, [Path(f) for f in row["files"]], 256)
        assert row["psnr_db"] == pytest.approx(expected["psnr_db"], rel=1e-5)
        assert row["kl_per_frame"] == pytest.approx(expected["kl_per_frame"], rel=1e-5)
        assert row["frames"] == sum(len(storage.load_episode(f, keys=("obs",))["obs"]) for f in row["files"])


def test_vision_by_policy_refuses_folders_of_training_episodes_only(smoke_vae, tmp_path):
    import json
    import subprocess
    import sys

    split = json.loads((smoke_vae / "vae" / "split.json").read_text())
    seen = tmp_path / "seen"
    seen.mkdir()
    for name in split["train"]:
        (seen / name).symlink_to(smoke_vae / "rollouts" / name)
    proc = subprocess.run([sys.executable, "-m", "worldmodels.metrics", "vision", "--data-dir", str(smoke_vae),
                           str(seen)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "every episode is one V trained on" in proc.stderr
