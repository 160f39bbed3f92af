"""worldmodels/metrics.py: V's totals over batches are exact means, C's score summary, the grid frames."""

from __future__ import annotations

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
