"""vae_gan/compare.py and notebooks/compare_vae_vaegan.ipynb: VAE and VAE-GAN measured on the same held-out frames."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import config
from tests.conftest import REPO, assert_user_error, check_notebook, data_dir_with, run_script
from vae_gan import compare
from worldmodels import storage

ROAD = (100, 100, 100)
GRASS = (100, 202, 100)
GRASS_LIGHT = (100, 228, 100)


@pytest.fixture(scope="module")
def both_v(smoke_vae, tmp_path_factory) -> Path:
    """A data dir with the smoke rollouts and both V kinds made by 02: ``vae/`` and ``vae_gan/`` side by side.

    ``vae/`` is a copy of the session's smoke V (02 on these very rollouts; rerunning 02 here would be a
    no-op), ``vae_gan/`` is trained here with ``--set vae.model=vae_gan``.
    """
    data_dir = tmp_path_factory.mktemp("compare")
    shutil.copytree(smoke_vae / "rollouts", data_dir / "rollouts")
    shutil.copytree(smoke_vae / "vae", data_dir / "vae", ignore=shutil.ignore_patterns("checkpoint"))
    run_script("02_train_vae.py", "--set", "vae.model=vae_gan", data_dir=data_dir)
    return data_dir


def run_compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vae_gan.compare", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def split_image(width: int = 8, height: int = 8) -> np.ndarray:
    """One uint8 frame (1, H, W, 3): road on the left half, grass on the right half."""
    frame = np.empty((1, height, width, 3), np.uint8)
    frame[:, :, : width // 2] = ROAD
    frame[:, :, width // 2:] = GRASS
    return frame


# --------------------------------------------------------------------------- image metrics on hand-made images


def test_edge_mask_is_the_road_grass_boundary_not_the_grass_stripes_or_the_border():
    mask = compare.edge_mask(split_image())[0]
    # The boundary lies between columns 3 and 4: the pixels on both sides of it are edges, in every row
    # that has a full 3x3 neighbourhood (rows 1..6); nothing else is.
    expected = np.zeros((8, 8), bool)
    expected[1:7, 3:5] = True
    np.testing.assert_array_equal(mask, expected)
    stripes = split_image()
    stripes[:, :, :4] = GRASS_LIGHT  # two shades of grass, as CarRacing draws its grass tiles
    assert not compare.edge_mask(stripes).any()


def test_edge_mse_counts_edge_pixels_only_and_is_zero_for_identical_images():
    original = split_image()
    assert compare.edge_mse(original, original) == 0.0
    assert compare.edge_mse(original, original.astype(np.float32) / 255.0) == pytest.approx(0.0, abs=1e-12)
    changed = original.astype(np.float64) / 255.0
    changed[0, 3, 0, 1] += 0.5  # column 0 is not an edge pixel: no effect
    assert compare.edge_mse(original, changed) == pytest.approx(0.0, abs=1e-12)
    changed[0, 3, 4, 1] -= 0.3  # an edge pixel: its squared error over the 12 edge pixels x 3 channels
    assert compare.edge_mse(original, changed) == pytest.approx(0.3**2 / 36)
    # The whole-frame MSE dilutes the same error over all 192 values; the edge MSE does not.
    assert compare.edge_mse(original, changed) > np.mean((changed - original / 255.0) ** 2)


def box_blur(frames: np.ndarray) -> np.ndarray:
    """3x3 mean filter of float frames (N, H, W, 3) with edge padding."""
    padded = np.pad(frames, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    return sum(padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def test_sharpness_is_one_for_identical_images_and_below_one_for_blurred_ones():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert compare.sharpness_ratio(frames, frames) == pytest.approx(1.0)
    blurred = box_blur(frames.astype(np.float64) / 255.0)
    assert compare.sharpness_ratio(frames, blurred) < 1.0
    assert compare.sharpness_ratio(blurred, box_blur(blurred)) < 1.0
    # Noise added to a smooth image is "sharper than real": the ratio is not bounded by 1.
    assert compare.sharpness_ratio(blurred, np.clip(blurred + rng.normal(0, 0.1, blurred.shape), 0, 1)) > 1.0
    with pytest.raises(ValueError, match="flat"):
        compare.sharpness_ratio(np.zeros((2, 8, 8, 3), np.uint8), frames[:2, :8, :8])


def test_laplacian_matches_a_direct_loop():
    grey = np.random.default_rng(1).random((2, 6, 7))
    direct = np.array([[[grey[n, i - 1, j] + grey[n, i + 1, j] + grey[n, i, j - 1] + grey[n, i, j + 1]
                         - 4 * grey[n, i, j] for j in range(1, 6)] for i in range(1, 5)] for n in range(2)])
    np.testing.assert_allclose(compare.filter3x3(grey, compare.LAPLACIAN), direct)


@pytest.mark.parametrize("frames", [np.zeros((2, 64, 64), np.uint8), np.zeros((2, 64, 64, 3), np.int32),
                                    np.full((2, 64, 64, 3), 255.0)])
def test_image_metrics_refuse_bad_frames(frames):
    with pytest.raises(ValueError):
        compare.edge_mask(frames)


# --------------------------------------------------------------------------- downstream numbers and aggregation


def fake_run(root: Path, name: str, kind: str, seed: int = 0) -> compare.Run:
    cfg = config.make_config("smoke", {"vae.model": kind, "vae.seed": seed})
    return compare.Run(name, root, kind, cfg)


def test_m_and_c_numbers_belong_only_to_the_v_they_were_made_with(tmp_path):
    vae, gan = fake_run(tmp_path, "vae", "vae"), fake_run(tmp_path, "gan", "vae_gan")
    assert compare.downstream_metrics(vae) == {"rnn": "not run", "controller": "not run"}
    baselines = {"sampled": {"persistence": 1.75, "unconditional": 1.625}, "mu": {"persistence": -1.0}}
    for stage, metrics in (("rnn", {"z_nll": 1.25, "z_nll_sampled": 1.5, "steps": 4, "baselines": baselines}),
                           ("controller", {"mean": 12.5, "std": 3.0, "episodes": 2})):
        config.save_config(gan.cfg, tmp_path / stage)
        storage.atomic_write_json(tmp_path / stage / "metrics.json", metrics)
    assert compare.downstream_metrics(vae) == {"rnn": "not run", "controller": "not run"}
    got = compare.downstream_metrics(gan)
    assert (got["rnn"]["z_nll"], got["rnn"]["z_nll_sampled"]) == (1.25, 1.5)
    # The better (lower) of the two baselines on sampled z, not the one on z = mu.
    assert got["rnn"]["z_nll_sampled_baseline"] == 1.625 and "baselines" not in got["rnn"]
    assert (got["controller"]["mean"], got["controller"]["std"], got["controller"]["episodes"]) == (12.5, 3.0, 2)


def test_aggregate_groups_by_kind_with_mean_and_sample_std():
    def result(name, kind, mse, rnn="not run"):
        return {"name": name, "kind": kind, "reconstruction_mse": mse, "psnr_db": 10.0, "edge_mse": 0.1,
                "sharpness": 0.5, "kl_per_frame": 16.0, "active_dimensions": 3, "rnn": rnn, "controller": "not run"}

    results = [result("a0", "vae", 0.01, {"z_nll": 1.0, "z_nll_sampled": 2.0, "z_nll_sampled_baseline": 2.5}),
               result("a1", "vae", 0.03), result("g0", "vae_gan", 0.02, {"z_nll": 1.0, "z_nll_sampled": 2.0})]
    by_kind = compare.aggregate(results)
    assert by_kind["vae"]["runs"] == ["a0", "a1"]
    assert by_kind["vae"]["reconstruction_mse"]["mean"] == pytest.approx(0.02)
    assert by_kind["vae"]["reconstruction_mse"]["std"] == pytest.approx(np.std([0.01, 0.03], ddof=1))
    assert by_kind["vae"]["z_nll"]["n"] == 1 and "controller_score" not in by_kind["vae"]
    assert by_kind["vae_gan"]["reconstruction_mse"]["std"] is None
    # M's gain is the baseline minus M; a metrics.json from before baselines were kept has none.
    assert by_kind["vae"]["z_nll_sampled_gain"] == {"mean": 0.5, "std": None, "n": 1}
    assert "z_nll_sampled_gain" not in by_kind["vae_gan"]
    assert "(baseline 2.500)" in compare.markdown_report(
        {"evaluation": {"frames": 1, "episodes": ["e"], "split_of": "a0", "edge_pixel_fraction": 0.1,
                        "edge_threshold": 0.5},
         "runs": [{**r, "heldout_episodes_seen_in_training": 0, "z_size": 32} for r in results],
         "by_kind": by_kind})


# --------------------------------------------------------------------------- end to end


def test_compare_cli_measures_both_v_on_the_same_heldout_frames(both_v, tmp_path):
    out = tmp_path / "out"
    proc = run_compare("--run", f"vae_seed0={both_v / 'vae'}", "--run", f"vae_seed1={both_v / 'vae'}",
                       "--run", f"gan={both_v / 'vae_gan'}", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "comparison.json").read_text())
    split = storage.read_json(both_v / "vae" / "split.json")
    assert result["evaluation"]["episodes"] == split["heldout"] and result["evaluation"]["split_of"] == "vae_seed0"
    assert [r["name"] for r in result["runs"]] == ["vae_seed0", "vae_seed1", "gan"]
    assert [r["kind"] for r in result["runs"]] == ["vae", "vae", "vae_gan"]
    for run in result["runs"]:
        for key in ("reconstruction_mse", "psnr_db", "edge_mse", "sharpness", "kl_per_frame"):
            assert math.isfinite(run[key]), (run["name"], key)
        assert run["rnn"] == "not run" and run["controller"] == "not run"
        assert run["heldout_episodes_seen_in_training"] == 0
        assert 0 <= run["active_dimensions"] <= run["z_size"] == len(run["kl_per_dimension"])
        # 02 evaluated its V on every frame of the same held-out episodes: the same numbers.
        own = storage.read_json(Path(run["v_dir"]) / "metrics.json")
        assert run["reconstruction_mse"] == pytest.approx(own["reconstruction_mse"], rel=1e-3)
        assert run["psnr_db"] == pytest.approx(own["psnr_db"], rel=1e-3)
        assert run["kl_per_frame"] == pytest.approx(own["kl_per_frame"], rel=1e-3, abs=1e-4)
        assert run["active_dimensions"] == own["active_dimensions"]
    assert 0 < result["evaluation"]["edge_pixel_fraction"] < 1
    assert result["by_kind"]["vae"]["runs"] == ["vae_seed0", "vae_seed1"]

    markdown = (out / "comparison.md").read_text()
    assert markdown in proc.stdout  # main prints the table it wrote
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    for name in ("vae_seed0", "vae_seed1", "gan"):
        assert any(line.startswith(f"| {name} |") for line in table_rows), markdown
    assert any(line.startswith("| vae | 2 (vae_seed0, vae_seed1) |") for line in table_rows), markdown
    width, height = Image.open(out / "reconstructions.png").size
    assert width > height > 0  # 8 columns, 4 rows (originals and three runs)


def test_mismatched_rollouts_missing_runs_and_missing_v_are_one_line_errors(both_v, tmp_path):
    other = data_dir_with(both_v, tmp_path, "vae")
    shutil.copytree(both_v / "rollouts", other / "rollouts")
    removed = sorted((other / "rollouts").glob("episode_*.npz"))[-1]
    removed.unlink()
    proc = run_compare("--run", f"vae={both_v / 'vae_gan'}", "--run", f"other={other}")
    assert_user_error(proc, "same rollouts", removed.name)
    assert len(proc.stderr.strip().splitlines()) == 1

    shutil.copy(both_v / "rollouts" / removed.name, removed)
    with open(removed, "ab") as f:
        f.write(b"\0")
    runs = [compare.resolve_run("a", both_v / "vae_gan"), compare.resolve_run("b", other)]
    with pytest.raises(config.ConfigError, match=f"{removed.name} has"):
        compare.check_same_rollouts(runs)

    assert_user_error(run_compare("--run", f"x={tmp_path / 'nowhere'}"), "no folder")
    assert_user_error(run_compare("--run", f"x={both_v}"), "holds both vae/ and vae_gan/")
    empty = tmp_path / "empty"
    shutil.copytree(both_v / "rollouts", empty / "rollouts")
    assert_user_error(run_compare("--data-dir", str(empty)), "no trained V")


def test_notebook_compares_the_v_of_the_data_dir(both_v, monkeypatch):
    monkeypatch.delenv("WORLDMODELS_COMPARE", raising=False)
    monkeypatch.delenv("WORLDMODELS_COMPARE_PREVIOUS", raising=False)
    check_notebook(REPO / "notebooks" / "compare_vae_vaegan.ipynb", both_v)
    result = storage.read_json(both_v / "compare" / "comparison.json")
    assert [r["name"] for r in result["runs"]] == ["vae", "vae_gan"]


def test_runs_from_environment_reads_name_dir_pairs(both_v):
    runs = compare.runs_from_environment(REPO, {"WORLDMODELS_COMPARE": f"a={both_v / 'vae_gan'}; b={both_v}/vae"})
    assert [(r.name, r.kind) for r in runs] == [("a", "vae_gan"), ("b", "vae")]
    assert [r.name for r in compare.runs_from_environment(REPO, {"WORLDMODELS_DATA": str(both_v)})] == ["vae", "vae_gan"]
    previous = {"WORLDMODELS_COMPARE_PREVIOUS": "results/a.json; /abs/b.json;"}
    assert compare.previous_from_environment(REPO, previous) == [REPO / "results/a.json", Path("/abs/b.json")]
    assert compare.previous_from_environment(REPO, {}) == []


def test_seeds_of_v_share_one_split_and_the_split_seed_changes_it(tmp_path):
    """vae.seed (initialisation) leaves the held-out episodes alone, so V seeds are scored alike."""
    paths = [tmp_path / f"episode_{i:06d}.npz" for i in range(40)]
    base = compare.evaluation_episodes([fake_run(tmp_path, "a", "vae", seed=0)], paths)
    assert compare.evaluation_episodes([fake_run(tmp_path, "b", "vae_gan", seed=3)], paths) == base
    other = compare.Run("c", tmp_path, "vae", config.make_config("smoke", {"vae.split_seed": 1}))
    assert compare.evaluation_episodes([other], paths) != base
    assert compare.episodes_seen_in_training(fake_run(tmp_path, "d", "vae", seed=2), base, paths) == 0
    assert compare.episodes_seen_in_training(other, base, paths) > 0


def test_runs_measured_on_another_day_join_only_when_they_scored_the_same_frames(both_v, tmp_path):
    """--previous: a seed measured in an earlier session joins the tables only if its frames' SHA-256 matches."""
    quiet = {"log": lambda message: None}
    first = compare.compare([compare.resolve_run("gan_s0", both_v / "vae_gan")], tmp_path / "first", **quiet)
    assert len(first["evaluation"]["frames_sha256"]) == 64
    earlier = tmp_path / "first" / "comparison.json"

    merged = compare.compare([compare.resolve_run("vae_s0", both_v / "vae")], tmp_path / "merged",
                             previous=[earlier], **quiet)
    assert [(r["name"], r.get("source")) for r in merged["runs"]] == [("vae_s0", None), ("gan_s0", str(earlier))]
    assert merged["runs"][1]["psnr_db"] == first["runs"][0]["psnr_db"]  # carried over, not re-measured
    assert set(merged["by_kind"]) == {"vae", "vae_gan"}
    assert "merged with --previous: gan_s0" in merged["markdown"]
    # A merged file can itself be merged again: its runs keep their first source.
    again = compare.compare([compare.resolve_run("vae_s1", both_v / "vae")], tmp_path / "again",
                            previous=[tmp_path / "merged" / "comparison.json"], **quiet)
    assert [(r["name"], r.get("source")) for r in again["runs"][1:]] == [
        ("vae_s0", str(tmp_path / "merged" / "comparison.json")), ("gan_s0", str(earlier))]
    assert again["by_kind"]["vae"]["runs"] == ["vae_s1", "vae_s0"]

    with pytest.raises(config.ConfigError, match="appear both here and in --previous"):
        compare.compare([compare.resolve_run("gan_s0", both_v / "vae")], tmp_path / "clash", previous=[earlier],
                        **quiet)
    # Other pixels (another SHA-256), other episodes, or a file without a fingerprint: refused.
    for change, message in (({"frames_sha256": "0" * 64}, "frame contents"),
                            ({"episodes": ["episode_999999.npz"]}, "held-out episodes")):
        doctored = tmp_path / f"doctored_{len(message)}.json"
        content = json.loads(earlier.read_text())
        content["evaluation"].update(change)
        doctored.write_text(json.dumps(content))
        with pytest.raises(config.ConfigError, match=message):
            compare.compare([compare.resolve_run("vae_s0", both_v / "vae")], tmp_path / "x", previous=[doctored],
                            **quiet)
    old = json.loads(earlier.read_text())
    del old["evaluation"]["frames_sha256"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(config.ConfigError, match="predates frame fingerprints"):
        compare.load_previous(tmp_path / "old.json", first["evaluation"])
    assert_user_error(run_compare("--run", f"v={both_v / 'vae'}", "--previous", str(tmp_path / "none.json")),
                      "no file")
