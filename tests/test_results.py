"""The report's figures (worldmodels/figures.py), make_all, the results table and notebooks/results.ipynb.

Everything runs on the smoke pipeline: ``smoke_rnn`` (rollouts, V, series, M), linked into a fresh
data dir in which a one-generation real controller and a one-temperature dream study are trained,
so the fixture's own folders are never written to.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, check_notebook, data_dir_with, run_script
from worldmodels import figures, storage

pytestmark = pytest.mark.slow

# The command each figure's missing-input message must name.
MAKES = {
    "reconstructions": "02_train_vae.py",
    "dream_strip": "04_train_rnn.py",
    "learning_curve": "05_train_controller.py",
    "temperature": "study_temperature.py",
    "driving": "05_train_controller.py",
}
UPSTREAM = ("rollouts", "vae", "series", "rnn")


@pytest.fixture(scope="module")
def trained(smoke_rnn, tmp_path_factory) -> Path:
    """smoke_rnn's stages 1-4 (linked), a real controller/ and a study's controller_dream_t1.15/ (1 generation each)."""
    data = data_dir_with(smoke_rnn, tmp_path_factory.mktemp("results"), *UPSTREAM)
    run_script("05_train_controller.py", "--set", "controller.generations=1", data_dir=data)
    run_script("study_temperature.py", "--set", "dream.temperatures=1.15", "--set", "controller.generations=1",
               data_dir=data)
    return data


def png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG", path
        return image.size


def test_every_figure_without_its_inputs_is_a_one_line_error_naming_the_command(tmp_path):
    assert set(MAKES) == set(figures.FIGURES)
    for name, make in figures.FIGURES.items():
        with pytest.raises(storage.MissingDataError) as error:
            make(tmp_path, tmp_path / "out" / figures.FILE_NAMES[name])
        message = str(error.value)
        assert MAKES[name] in message and "\n" not in message, (name, message)
    assert not (tmp_path / "out").exists()  # nothing half-made


def test_cli_all_before_the_controller_makes_v_and_m_figures_and_says_why_it_skips_the_rest(smoke_rnn, tmp_path,
                                                                                         capsys):
    data = data_dir_with(smoke_rnn, tmp_path, *UPSTREAM)
    out = tmp_path / "figures"
    assert figures.main(["all", "--data-dir", str(data), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    for name in ("reconstructions", "dream_strip"):
        assert f"made {name}: {out / figures.FILE_NAMES[name]}" in printed
        png(out / figures.FILE_NAMES[name])
    for name in ("learning_curve", "temperature", "driving"):
        line = next(line for line in printed if line.startswith(f"skipped {name}: "))
        assert MAKES[name] in line
        assert not (out / figures.FILE_NAMES[name]).exists()
    with pytest.raises(SystemExit):  # one figure needs --out
        figures.main(["temperature", "--data-dir", str(data)])


def test_dream_strip_has_one_row_per_temperature(smoke_rnn, tmp_path):
    one = png(figures.dream_strip_figure(smoke_rnn, tmp_path / "one.png", temperatures=(1.0,), steps=4, every=3))
    three = png(figures.dream_strip_figure(smoke_rnn, tmp_path / "three.png", temperatures=(0.5, 1.0, 1.5), steps=4,
                                           every=3))
    assert one[0] == three[0] and three[1] > one[1]
    with pytest.raises(ValueError, match="temperature"):
        figures.dream_strip_figure(smoke_rnn, tmp_path / "none.png", temperatures=())


def test_open_loop_dream_is_reproducible_and_depends_on_the_temperature(smoke_rnn):
    import config
    from worldmodels import artifacts

    cfg = config.load_config(smoke_rnn / "rnn" / "config.json")
    model = artifacts.load_rnn(smoke_rnn, cfg)
    actions = np.tile([[0.0, 1.0, 0.0]], (5, 1)).astype(np.float32)
    z0 = np.zeros(cfg.vae.z_size, np.float32)
    first, rewards, dones = figures.dream_open_loop(model, z0, actions, 1.0)
    assert first.shape == (5, cfg.vae.z_size) and rewards.shape == dones.shape == (5,)
    np.testing.assert_array_equal(first, figures.dream_open_loop(model, z0, actions, 1.0)[0])
    assert not np.allclose(first, figures.dream_open_loop(model, z0, actions, 0.3)[0])

    # With a real prefix, M first reads it (teacher forcing) and dreams on from the state it reached:
    # the same as feeding the prefix step by step by hand, and not the same as starting from zeros.
    rng = np.random.default_rng(0)
    prefix = (rng.normal(size=(4, cfg.vae.z_size)).astype(np.float32), actions[:4])
    warmed = figures.dream_open_loop(model, z0, actions, 1.0, prefix=prefix)[0]
    state = model.initial_state(1)
    for z, a in zip(*prefix):
        state = model.step(z[None], a[None], state)["state"]
    from models.mdn_rnn import sample_mixture
    out = model.step(z0[None], actions[:1], state)
    import tensorflow as tf
    expected = sample_mixture(out["log_pi"], out["mu"], out["log_sigma"], 1.0, seed=tf.constant([0, 0], tf.int64))
    np.testing.assert_allclose(warmed[0], expected.numpy()[0], atol=1e-5)
    assert not np.allclose(warmed, first)


def test_make_all_on_a_trained_pipeline_makes_every_figure(trained, tmp_path):
    made = figures.make_all(trained, tmp_path, log=lambda message: None)
    assert list(made) == list(figures.FIGURES)
    assert all(made[name] == tmp_path / figures.FILE_NAMES[name] for name in made), made
    for name, path in made.items():
        if path.suffix == ".png":
            png(path)
    with Image.open(made["driving"]) as gif:
        assert gif.format == "GIF" and gif.n_frames > 1
    assert made["driving"].stat().st_size < 400_000


def test_learning_curves_use_whatever_searches_exist(trained, tmp_path):
    both = png(figures.learning_curve_figure(trained, tmp_path / "both.png"))
    dream_only = data_dir_with(trained, tmp_path / "dream", "controller_dream_t1.15")
    alone = png(figures.learning_curve_figure(dream_only, tmp_path / "dream.png"))
    assert both[0] > alone[0]  # a panel for the real search beside the dream's
    broken = tmp_path / "broken"
    shutil.copytree(trained / "controller", broken / "controller")
    (broken / "controller" / "history.csv").write_text("generation,best,mean\n1,oops,2\n")
    with pytest.raises(storage.CorruptFileError, match="history.csv"):
        figures.learning_curve_figure(broken, tmp_path / "broken.png")


def test_temperature_figure_refuses_a_results_file_without_rows(trained, tmp_path):
    png(figures.temperature_figure(trained, tmp_path / "t.png"))
    storage.atomic_write_json(tmp_path / "temperature_study" / "results.json", {"rows": []})
    with pytest.raises(storage.CorruptFileError, match="study_temperature.py"):
        figures.temperature_figure(tmp_path, tmp_path / "t2.png")


def test_driving_animation_is_downscaled_and_subsampled_from_the_best_scored_controller(trained, tmp_path):
    scores = {folder: storage.read_json(folder / "metrics.json")["mean"]
              for folder in (trained / "controller", trained / "controller_dream_t1.15")}
    assert figures.best_controller_dir(trained) == max(scores, key=scores.get)
    out = figures.driving_animation(trained, tmp_path / "car.gif", width=64, max_frames=10)
    with Image.open(out) as gif:
        assert gif.size[0] == 64 and 2 <= gif.n_frames <= 10
    with pytest.raises(ValueError, match="gif"):
        figures.driving_animation(trained, tmp_path / "car.png")


def test_driving_animation_of_a_shipped_agent_needs_no_data_dir(trained, tmp_path):
    from worldmodels import pretrained

    agent = tmp_path / "pretrained" / "tiny"
    pretrained.export_from_data(trained, agent)
    out = figures.driving_animation(None, tmp_path / "car.gif", width=48, max_frames=6, pretrained=str(agent))
    with Image.open(out) as gif:
        assert gif.size[0] == 48 and 2 <= gif.n_frames <= 6


def test_results_table_reports_each_metrics_file_or_not_run(trained, tmp_path):
    empty = figures.results_table(tmp_path)
    rows = [line for line in empty.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5 and all("| not run |" in row for row in rows), empty
    assert "VAE-GAN** (`compare/comparison.json`): not run" in empty

    table = figures.results_table(trained)
    vae = storage.read_json(trained / "vae" / "metrics.json")
    real = storage.read_json(trained / "controller" / "metrics.json")
    dream = storage.read_json(trained / "controller_dream_t1.15" / "metrics.json")
    assert f"PSNR {vae['psnr_db']:.2f} dB" in table
    assert f"**{real['mean']:.1f} ± {real['std']:.1f} over {real['episodes']} held-out tracks**" in table
    assert f"in the dream: {dream['dream']['mean']:.1f}" in table and "tau=1.15" in table
    assert "| V (VAE-GAN) | not run |" in table


def test_results_notebook_regenerates_the_figures(trained):
    check_notebook(REPO / "notebooks" / "results.ipynb", trained)
    for name in figures.FIGURES:
        assert (trained / "figures" / figures.FILE_NAMES[name]).is_file(), name
