"""worldmodels/figures.py: README's figures are made from the pipeline's outputs."""

import shutil

import pytest
from PIL import Image

from worldmodels import figures, storage


def test_reconstruction_figure_from_a_trained_v(smoke_vae, tmp_path):
    out = figures.reconstruction_figure(smoke_vae, tmp_path / "rec.png", count=4)
    width, height = Image.open(out).size
    assert width > height > 0  # one row of originals and one of reconstructions, 4 columns


def test_reconstruction_figure_without_v_is_a_clear_error(smoke_rollouts, tmp_path):
    # smoke_rollouts may already hold V (the smoke_vae fixture trains in place), so copy the rollouts only.
    shutil.copytree(smoke_rollouts / "rollouts", tmp_path / "rollouts")
    with pytest.raises(storage.MissingDataError, match="no trained V"):
        figures.reconstruction_figure(tmp_path, tmp_path / "rec.png")


def test_architecture_diagram_needs_no_data(tmp_path, capsys):
    out = tmp_path / "fig" / "architecture.png"
    assert figures.main(["architecture", "--data-dir", str(tmp_path / "nothing"), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 0


def test_profile_figure_from_a_profiled_evaluation_and_a_clear_error_without_one(tmp_path, capsys):
    tracks = [{"tiles": 200 + 10 * i, "track_tiles": 300, "finished_step": None if i < 3 else 950,
               "mean_speed": 40.0 + i, "off_road": 0.1 - 0.02 * i, "mean_gas": 0.3, "mean_brake": 0.0}
              for i in range(4)]
    profiled = storage.atomic_write_json(tmp_path / "eval.json", {"scores": [500.0, 600.0, 650.0, 900.0],
                                                                  "max_steps": 1000,
                                                                  "profile": {"tracks_profile": tracks}})
    out = tmp_path / "profile.png"
    assert figures.main(["profile", "--evaluation", str(profiled), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 0
    plain = storage.atomic_write_json(tmp_path / "plain.json", {"scores": [1.0]})
    with pytest.raises(storage.MissingDataError, match="--profile"):
        figures.profile_figure(plain, tmp_path / "no.png")
    with pytest.raises(SystemExit):
        figures.main(["profile", "--out", str(out)])  # no --evaluation


def test_a_learning_curve_draws_each_kind_of_evaluation_in_one_colour_in_every_panel(tmp_path, monkeypatch):
    from worldmodels import controller_training

    drawn = []
    monkeypatch.setattr(storage, "save_figure", lambda fig, path, **kw: drawn.append(fig))
    history = [{"generation": g, "best": 10.0 * g, "mean": 5.0 * g, "steps": 1000, "seconds": 2.0} for g in (1, 2)]
    evals = {2: {"mean": 7.0, "std": 1.0, "dream_mean": 9.0, "dream_std": 2.0, "env_steps": 500, "seconds": 3.0}}
    controller_training.plot_learning_curve(tmp_path / "curve.png", history, evals, dream_temperature=1.0)
    colours = [[container.lines[0].get_color() for container in axis.containers] for axis in drawn[0].axes]
    assert len(colours) == 3 and all(len(c) == 2 for c in colours), colours
    assert colours[0] == colours[1] == colours[2] and colours[0][0] != colours[0][1]
    # ...and neither is a colour of the first panel's two fitness lines.
    assert not set(colours[0]) & {line.get_color() for line in drawn[0].axes[0].lines[:2]}
