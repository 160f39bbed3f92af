"""The sample-efficiency figure (worldmodels/figures.py): held-out real score against every real step behind it.

Everything runs on small folders written here (csv and json files as the stages write them, and a few tiny
series files for stage 1's data), so no model is trained: the tests check the step counts, not pixels.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, assert_user_error
from worldmodels import artifacts, figures, storage

STAGE1 = (100, 50)  # frames of stage 1's two series files: 150 real steps
HISTORY = ("generation", "best", "mean", "std", "worst", "sigma", "elapsed", "env_steps")


def write_series(folder, lengths) -> None:
    for i, length in enumerate(lengths):
        arrays = {"mu": np.zeros((length, 2), np.float32), "logvar": np.zeros((length, 2), np.float32),
                  "action": np.zeros((length, 3), np.float32), "reward": np.zeros(length, np.float32),
                  "done": np.zeros(length, bool), "seed": np.int64(i)}
        storage.save_episode(folder / storage.episode_name(i), arrays, "series")


def write_csv(path, fields, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        writer.writerows(rows)


def write_search(folder, env: str, train_steps: list[int], evals: dict, final=None, init_from: str = "") -> None:
    """A search folder: ``train_steps`` per generation 1..G in history.csv, ``evals`` {generation: (mean, std,
    env_steps)} in eval.csv, ``final`` (mean, std, episodes, steps) in metrics.json, and a controller.npz."""
    storage.atomic_write_json(folder / "config.json", {"controller": {"env": env, "init_from": init_from}})
    (folder / "controller.npz").write_bytes(b"")  # what 06_iterate.py looks for to start from (never read here)
    write_csv(folder / "history.csv", HISTORY,
              [[g, 0, 0, 0, 0, 0.1, 1.0, steps] for g, steps in enumerate(train_steps, start=1)])
    write_csv(folder / "eval.csv", ("generation", "mean", "std", "env_steps", "seconds"),
              [[g, *row, 1.0] for g, row in sorted(evals.items())])
    if final is not None:
        mean, std, episodes, steps = final
        storage.atomic_write_json(folder / "metrics.json", {"mean": mean, "std": std, "episodes": episodes,
                                                            "steps": steps})


def write_iterations(data, rows) -> None:
    """iterations.csv as 06_iterate.py writes it (every column), from (real_env_steps, real_score, real_std)."""
    from worldmodels import iterate

    for i, (steps, score, std) in enumerate(rows, start=1):
        row = {key: math.nan for key in iterate.FIELDS}
        row.update(iteration=i, episodes_by_policy="controller:1", real_env_steps=steps, real_score=score,
                   real_std=std)
        iterate.append_row(data / artifacts.ITERATIONS / artifacts.ITERATIONS_TABLE, row)


@pytest.fixture
def data(tmp_path):
    """Stage 1's data, a real search, a dream search at tau=1.15, the hybrid started from it, two iterations."""
    data = tmp_path / "data"
    write_series(data / "series", STAGE1)
    # 4 generations of 1000 real steps, evaluated at 2 and 4 (300 steps each), final score on 5000 steps.
    write_search(data / "controller", "real", [1000] * 4, {2: (10.0, 1.0, 300), 4: (20.0, 2.0, 300)},
                 final=(25.0, 3.0, 100, 5000))
    # Its history counts dream steps: they must not be counted as real ones.
    write_search(data / "controller_dream_t1.15", "dream", [99_999] * 2, {1: (-5.0, 4.0, 40), 2: (1.0, 5.0, 40)},
                 final=(2.0, 6.0, 100, 700))
    write_search(data / "controller_hybrid", "real", [500, 500], {2: (30.0, 7.0, 60)},
                 init_from="controller_dream_t1.15")
    write_iterations(data, [(1000, 40.0, 8.0), (2000, 50.0, 9.0)])
    return data


def by_label(curves) -> dict:
    return {curve.label: curve for curve in curves}


def test_every_point_counts_every_real_step_behind_it(data):
    curves = by_label(figures.sample_efficiency_curves(data))
    assert figures.stage1_steps(data) == 150
    assert list(curves) == ["stage 5 in the real env", "stage 5 in the dream, tau=1.15",
                            "dream + real fine-tuning (from controller_dream_t1.15)",
                            "iterative dream (06_iterate.py, from controller)"]

    real = curves["stage 5 in the real env"]  # stage 1 + training so far + evaluations so far
    assert real.steps == [150 + 2000 + 300, 150 + 4000 + 600]
    assert (real.mean, real.std) == ([10.0, 20.0], [1.0, 2.0])
    assert real.final == (150 + 4000 + 600 + 5000, 25.0, 3.0, 100)

    dream = curves["stage 5 in the dream, tau=1.15"]  # stage 1 + the real evaluations only
    assert dream.steps == [150 + 40, 150 + 80]
    assert dream.final == (150 + 80 + 700, 2.0, 6.0, 100)

    hybrid = curves["dream + real fine-tuning (from controller_dream_t1.15)"]  # all the dream spent + its own
    assert hybrid.steps == [(150 + 80 + 700) + 1000 + 60]
    assert (hybrid.mean, hybrid.std, hybrid.final) == ([30.0], [7.0], None)

    # real_env_steps already holds stage 1; iteration 1 started from controller/, whose search spent 9600.
    iterations = curves["iterative dream (06_iterate.py, from controller)"]
    assert iterations.steps == [9600 + 1000, 9600 + 2000]
    assert (iterations.mean, iterations.std) == ([40.0, 50.0], [8.0, 9.0])


def test_the_iterations_count_the_dream_controller_they_started_from(data):
    shutil.rmtree(data / "controller")
    curves = by_label(figures.sample_efficiency_curves(data))
    assert curves["iterative dream (06_iterate.py, from controller_dream_t1.15)"].steps == [780 + 1000, 780 + 2000]
    shutil.rmtree(data / "controller_dream_t1.15")
    shutil.rmtree(data / "controller_hybrid")
    assert by_label(figures.sample_efficiency_curves(data))["iterative dream (06_iterate.py, from zeros)"].steps == \
        [1000, 2000]


def test_missing_curves_are_skipped_and_the_rest_drawn(data, tmp_path):
    shutil.rmtree(data / "controller")
    shutil.rmtree(data / artifacts.ITERATIONS)
    (data / "controller").mkdir()  # a search that has not scored anything yet
    write_search(data / "controller_dream_t2", "dream", [10], {})  # likewise
    curves = figures.sample_efficiency_curves(data)
    assert [c.label for c in curves] == ["stage 5 in the dream, tau=1.15",
                                         "dream + real fine-tuning (from controller_dream_t1.15)"]
    out = figures.sample_efficiency(data, tmp_path / "out" / "sample_efficiency.png")
    with Image.open(out) as image:
        assert image.format == "PNG"


def test_several_data_dirs_are_labelled_by_folder(data, tmp_path):
    other = tmp_path / "other"
    write_search(other / "controller", "real", [10], {1: (3.0, 1.0, 5)})
    assert [c.steps for c in figures.sample_efficiency_curves(other)] == [[15]]  # no stage 1 data there
    out = tmp_path / "both.png"
    assert figures.main(["sample_efficiency", "--data-dir", str(data), "--also-data-dir", str(other),
                         "--out", str(out)]) == 0
    assert out.is_file()


def test_a_hybrid_whose_start_is_gone_is_a_one_line_error(data, tmp_path):
    shutil.rmtree(data / "controller_dream_t1.15")
    with pytest.raises(storage.MissingDataError, match="controller_dream_t1.15") as error:
        figures.sample_efficiency(data, tmp_path / "x.png")
    assert "\n" not in str(error.value)


def test_nothing_to_draw_is_a_one_line_error(tmp_path):
    out = tmp_path / "out" / "sample_efficiency.png"
    with pytest.raises(storage.MissingDataError, match="no held-out real score") as error:
        figures.sample_efficiency(tmp_path, out)
    assert "\n" not in str(error.value) and not out.exists()
    proc = subprocess.run([sys.executable, "-m", "worldmodels.figures", "sample_efficiency", "--data-dir",
                           str(tmp_path), "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_user_error(proc, "no held-out real score", "06_iterate.py")
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_the_iterations_start_from_the_real_controller_then_a_dream_one(tmp_path):
    assert artifacts.initial_controller_dir(tmp_path, 1.15) is None
    for name in ("controller_dream_t0.5", "controller_dream_t1.15", "controller"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "controller.npz").write_bytes(b"")
    assert artifacts.initial_controller_dir(tmp_path, 1.15) == tmp_path / "controller"
    (tmp_path / "controller" / "controller.npz").unlink()
    assert artifacts.initial_controller_dir(tmp_path, 1.15) == tmp_path / "controller_dream_t1.15"
    assert artifacts.initial_controller_dir(tmp_path, 3.0) == tmp_path / "controller_dream_t0.5"


def test_the_recorded_start_wins_over_a_controller_trained_later(tmp_path):
    assert artifacts.iterations_start_dir(tmp_path, 1.15, record=True) is None  # zeros, recorded
    (tmp_path / "controller").mkdir()
    (tmp_path / "controller" / "controller.npz").write_bytes(b"")
    assert artifacts.iterations_start_dir(tmp_path, 1.15) is None
    (tmp_path / "iterations" / "start.json").unlink()
    assert artifacts.iterations_start_dir(tmp_path, 1.15) == tmp_path / "controller"  # no record: the folders


def write_rollouts(folder, lengths, data: dict) -> None:
    """Rollout files of ``lengths`` frames and the ``rollouts/config.json`` stage 1 writes (its ``data`` section)."""
    for i, length in enumerate(lengths):
        arrays = {"obs": np.zeros((length, 64, 64, 3), np.uint8), "action": np.zeros((length, 3), np.float32),
                  "reward": np.zeros(length, np.float32), "terminated": np.zeros(length, bool),
                  "truncated": np.zeros(length, bool), "seed": np.int64(i)}
        storage.save_episode(folder / storage.episode_name(i), arrays, "rollout")
    storage.atomic_write_json(folder / artifacts.CONFIG_FILE, {"data": data})


def test_data_driven_by_a_trained_controller_counts_its_training(data, tmp_path):
    # The driver's search: 3 generations of 2000 real steps, evaluated at 3 (100 steps), final score on 400 steps;
    # its params come from generation 3, so everything but the final score made the driver.
    driver = tmp_path / "driver"
    write_search(driver, "real", [2000] * 3, {3: (500.0, 9.0, 100)}, final=(480.0, 8.0, 100, 400))
    np.savez(driver / "controller.npz", params=np.zeros(3), generation=3, best_eval_generation=3)
    write_rollouts(data / "rollouts", STAGE1, {"policy": "controller:0.9,brownian:0.1",
                                               "controller": str(driver / "controller.npz")})
    assert figures.collector_steps(data) == 6000 + 100
    curves = by_label(figures.sample_efficiency_curves(data))
    assert curves["stage 5 in the dream, tau=1.15"].steps == [6100 + 150 + 40, 6100 + 150 + 80]
    assert curves["iterative dream (06_iterate.py, from controller)"].steps == [6100 + 9600 + 1000,
                                                                                 6100 + 9600 + 2000]
    # A search that went on after the driver's generation: its later generations, evaluations and final score
    # did not make the driver (generation 2 of 4, evaluated at 2 and 4).
    write_search(driver, "real", [2000] * 4, {2: (400.0, 9.0, 100), 4: (500.0, 9.0, 100)}, final=(480.0, 8.0, 100, 400))
    np.savez(driver / "controller.npz", params=np.zeros(3), generation=4, best_eval_generation=2)
    assert figures.collector_steps(data) == 4000 + 100
    (driver / "controller.npz").write_bytes(b"not a zip")
    with pytest.raises(storage.CorruptFileError, match="controller that drove stage 1"):
        figures.collector_steps(data)
    # A bare copy of the driver's controller.npz: its cost is unknown, which is an error, not zero.
    (driver / "eval.csv").unlink()
    with pytest.raises(storage.MissingDataError, match="cannot be counted") as error:
        figures.sample_efficiency(data, tmp_path / "x.png")
    assert "\n" not in str(error.value) and str(driver) in str(error.value)


def test_stage1_is_counted_from_the_rollouts_when_the_series_are_gone(data):
    write_rollouts(data / "rollouts", (7, 5), {"policy": "brownian"})
    assert figures.stage1_steps(data) == 150  # the series come first
    shutil.rmtree(data / "series")
    assert figures.stage1_steps(data) == 12 and figures.collector_steps(data) == 0


def test_v_trained_on_other_data_or_carried_without_its_episodes_is_counted(data):
    random = {"policy": "brownian", "seed": 0, "episodes": 2, "max_steps": 75, "backend": "process"}
    write_rollouts(data / "rollouts", (75, 75), random)
    vision = data / "vae_gan"
    storage.atomic_write_json(vision / "metrics.json", {"train_frames": 900, "heldout_frames": 100})
    # V on the same data (its config older, without a key; another backend): the 150 frames are all.
    older = {key: value for key, value in random.items() if key != "max_steps"}
    storage.atomic_write_json(vision / "config.json", {"data": {**older, "backend": "thread"}})
    assert figures.stage1_steps(data) == 150
    # V taken from a run on other data (the dream runs' V came from the random-policy run): both count.
    storage.atomic_write_json(vision / "config.json", {"data": {**random, "seed": 7}})
    driven = {**random, "policy": "controller:0.9,brownian:0.1", "controller": "elsewhere", "controller_noise": 0.1}
    storage.atomic_write_json(data / "rollouts" / "config.json", {"data": driven})
    assert figures.stage1_steps(data) == 150 + 1000
    # ...in every curve: the iterations' real_env_steps count M's data only, so V's frames are added there too.
    curves = by_label(figures.sample_efficiency_curves(data, driver=0))
    assert curves["stage 5 in the real env"].steps[0] == 150 + 1000 + 2000 + 300
    assert curves["iterative dream (06_iterate.py, from controller)"].steps == [1000 + 9600 + 1000, 1000 + 9600 + 2000]
    # A carried run travels without its episodes: V's count stands for the data V and M were trained on.
    shutil.rmtree(data / "series")
    shutil.rmtree(data / "rollouts")
    assert figures.stage1_steps(data) == 1000
    (vision / "metrics.json").unlink()
    assert figures.stage1_steps(data) == 0
