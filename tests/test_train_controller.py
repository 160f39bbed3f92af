"""05_train_controller.py and evaluate_controller.py as a user runs them: outputs, a no-op rerun,
resume after SIGKILL to the result of an uninterrupted run, and clear errors."""

import importlib.util
import json

import numpy as np
import pytest

import config
from models.controller import num_parameters
from tests.conftest import (assert_user_error, data_dir_with, kill_then_resume_controller, load_npz, read_csv,
                            run_plain, run_script)
from worldmodels import storage
from worldmodels.controller_training import generation_fitness, race, search_cost, search_table
from worldmodels.rollout import EVAL_SEED_OFFSET, FINAL_EVAL_SEED_OFFSET, Rollouts, heldout_seeds

GENERATIONS = 3
# Short episodes keep each generation to a second or two; everything else is the smoke preset.
TRAIN = ("--set", f"controller.generations={GENERATIONS}", "--set", "controller.max_steps=30")
SMOKE = config.make_config("smoke")
# The cheaper training episodes of issue 18: an early stop without a new tile, and racing over 2 tracks.
CHEAP = ("--set", "controller.patience=5", "--set", "controller.racing=true", "--set",
         "controller.rollouts_per_member=2")


@pytest.fixture(scope="module")
def models_dir(smoke_rnn):
    """The smoke pipeline's data dir: trained V in ``vae/`` and M in ``rnn/``, each with its config.json."""
    return smoke_rnn


@pytest.fixture(scope="module")
def trained(models_dir, tmp_path_factory):
    """One uninterrupted run (serial backend) with its final evaluation: the reference."""
    data = data_dir_with(models_dir, tmp_path_factory.mktemp("reference"), "vae", "rnn")
    proc = run_script("05_train_controller.py", *TRAIN, "--set", "controller.backend=serial", data_dir=data)
    return data, proc


def test_training_writes_every_output(trained):
    data, proc = trained
    out = data / "controller"
    assert "final evaluation on 2 held-out tracks" in proc.stdout
    history = read_csv(out / "history.csv")
    assert [int(row["generation"]) for row in history] == list(range(1, GENERATIONS + 1))
    evals = read_csv(out / "eval.csv")
    assert list(evals[0]) == ["generation", "mean", "std", "env_steps", "seconds"]
    assert all(int(row["env_steps"]) == 2 * 30 for row in evals)  # full held-out episodes
    assert [int(row["generation"]) for row in evals] == list(range(1, GENERATIONS + 1))  # smoke: eval_every=1

    controller = load_npz(out / "controller.npz")
    n = num_parameters(SMOKE.vae.z_size, SMOKE.rnn.hidden_units)
    for key in ("params", "mean", "best_member"):
        assert controller[key].shape == (n,) and np.all(np.isfinite(controller[key]))
    assert int(controller["generation"]) == GENERATIONS
    means = [float(row["mean"]) for row in evals]
    assert float(controller["best_eval_mean"]) == max(means)
    assert int(controller["best_eval_generation"]) == int(evals[int(np.argmax(means))]["generation"])
    assert not np.array_equal(controller["mean"], np.zeros(n)), "the CMA mean must have moved"

    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["scores"]) == len(metrics["seeds"]) == SMOKE.controller.final_eval_episodes
    assert metrics["mean"] == pytest.approx(np.mean(metrics["scores"]))
    assert metrics["seeds"] == heldout_seeds(SMOKE.controller.seed, 2, FINAL_EVAL_SEED_OFFSET).tolist()
    assert not set(metrics["seeds"]) & set(heldout_seeds(SMOKE.controller.seed, 2, EVAL_SEED_OFFSET).tolist())
    assert "05_train_controller.py" in metrics["command"]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "logs").iterdir())
    assert config.load_config(out / "config.json").controller.generations == GENERATIONS

    # A finished run reruns as a no-op.
    before = (out / "controller.npz").stat().st_mtime_ns
    rerun = run_script("05_train_controller.py", *TRAIN, data_dir=data)
    assert "nothing to do" in rerun.stdout
    assert (out / "controller.npz").stat().st_mtime_ns == before


def test_evaluate_controller_writes_per_track_scores_and_a_video(trained, tmp_path):
    data, _ = trained
    output, video = tmp_path / "metrics.json", tmp_path / "episode.gif"
    # The process backend here, serial in training: the same tracks must score the same.
    run_script("evaluate_controller.py", *TRAIN, "--output", str(output), "--video", str(video), "--profile",
               data_dir=data)
    metrics = json.loads(output.read_text())
    # --profile: in 30 steps no lap ends, so each return is CarRacing's 1000 / tiles per tile visited
    # minus 0.1 per step, read from the replayed car; the CSV carries it per track.
    profile = metrics["profile"]
    assert profile["replays_mismatched"] == 0 and profile["laps_finished"] == 0
    for score, steps, track in zip(metrics["scores"], metrics["lengths"], profile["tracks_profile"]):
        assert score == pytest.approx(track["tiles"] * 1000 / track["track_tiles"] - 0.1 * steps)
    rows = read_csv(output.with_suffix(".csv"))
    assert [int(row["tiles"]) for row in rows] == [track["tiles"] for track in profile["tracks_profile"]]
    reference = json.loads((data / "controller" / "metrics.json").read_text())
    assert metrics["seeds"] == reference["seeds"]
    assert metrics["scores"] == reference["scores"]
    for key in ("mean", "std", "min", "max", "lengths", "command"):
        assert key in metrics
    assert metrics["lengths"] == [30, 30]
    assert metrics["video"]["frames"] == metrics["lengths"][0] + 1
    from PIL import Image

    with Image.open(video) as gif:
        assert gif.size == (600, 400) and gif.n_frames == metrics["video"]["frames"]


def test_resume_after_sigkill_reaches_the_uninterrupted_result(trained, models_dir, tmp_path):
    reference = trained[0] / "controller"
    data = data_dir_with(models_dir, tmp_path, "vae", "rnn")
    out = data / "controller"
    kill_then_resume_controller(data, out, reference, TRAIN, GENERATIONS)
    strip = [{k: v for k, v in row.items() if k != "elapsed"} for row in read_csv(out / "history.csv")]
    assert strip == [{k: v for k, v in row.items() if k != "elapsed"} for row in read_csv(reference / "history.csv")]


def test_corrupt_checkpoint_is_a_clear_error(models_dir, tmp_path):
    data = data_dir_with(models_dir, tmp_path, "vae", "rnn")
    (data / "controller").mkdir()
    (data / "controller" / "evolution.pkl").write_bytes(b"\x80\x05 not a pickle")
    proc = run_script("05_train_controller.py", data_dir=data, check=False)
    assert_user_error(proc, "evolution.pkl", "delete it")


def test_missing_or_corrupt_models_are_clear_errors(models_dir, tmp_path):
    empty = tmp_path / "empty"
    assert_user_error(run_script("05_train_controller.py", data_dir=empty, check=False), "vae.keras", "02_train_vae.py")
    assert_user_error(run_script("evaluate_controller.py", data_dir=empty, check=False), "vae.keras")
    only_v = data_dir_with(models_dir, tmp_path / "v", "vae")
    assert_user_error(run_script("05_train_controller.py", data_dir=only_v, check=False), "rnn.keras", "04_train_rnn.py")
    assert_user_error(run_script("05_train_controller.py", "--env", "dream", data_dir=only_v, check=False),
                      "rnn.keras", "04_train_rnn.py")
    if importlib.util.find_spec("ray") is None:
        assert_user_error(run_script("05_train_controller.py", "--set", "controller.backend=ray", data_dir=only_v,
                                     check=False), "pip install")
    both = data_dir_with(models_dir, tmp_path / "both", "vae", "rnn")
    assert_user_error(run_script("evaluate_controller.py", data_dir=both, check=False), "controller.npz",
                      "05_train_controller.py")

    # A truncated V: the error names the file instead of a Keras traceback.
    broken = tmp_path / "broken"
    (broken / "vae").mkdir(parents=True)
    (broken / "rnn").symlink_to(models_dir / "rnn", target_is_directory=True)
    (broken / "vae" / "config.json").write_bytes((models_dir / "vae" / "config.json").read_bytes())
    (broken / "vae" / "vae.keras").write_bytes((models_dir / "vae" / "vae.keras").read_bytes()[:5000])
    assert_user_error(run_script("05_train_controller.py", data_dir=broken, check=False), "vae.keras", "corrupt")


# --------------------------------------------------------------------------- cheaper training episodes


class FakeRuns:
    """``run(params, seeds)`` whose return of member p on track s is score[p] + s / 100; records every call."""

    def __init__(self, score):
        self.score, self.calls = np.asarray(score, float), []

    def __call__(self, params, seeds):
        self.calls.append((params.copy(), seeds.copy()))
        rows = [int(np.flatnonzero((self.params == p).all(axis=1))[0]) for p in params]
        returns = self.score[rows][:, None] + seeds / 100.0
        return Rollouts(returns, np.full(seeds.shape, 7), None)


def test_racing_keeps_exactly_the_better_half_by_the_first_track_and_ranks_the_rest_below_it():
    rng = np.random.default_rng(0)
    members, tracks = 8, np.array([5, 1, 300])
    params = rng.normal(size=(members, 4))
    first = rng.permutation(members) * 10.0  # distinct first-track returns
    runs = FakeRuns(first)
    runs.params = params
    for weight_decay in (0.0, 0.5):
        runs.calls.clear()
        fitness, steps = race(runs, params, tracks, weight_decay)
        (p1, s1), (p2, s2) = runs.calls
        assert len(p1) == members and np.all(s1 == tracks[0])  # everyone drives track 1
        better = np.sort(np.argsort(-first)[:members // 2])
        np.testing.assert_array_equal(p2, params[better])  # exactly the better half drives the rest
        assert np.all(s2 == tracks[1:])
        np.testing.assert_allclose(fitness[better], first[better] + tracks.mean() / 100.0)
        assert steps == 7 * (members + len(better) * 2)
        penalised = fitness - weight_decay * np.sum(params ** 2, axis=1)
        worse = np.setdiff1d(np.arange(members), better)
        assert penalised[worse].max() < penalised[better].min()  # eliminated rank below every survivor ...
        np.testing.assert_array_equal(np.argsort(penalised[worse]), np.argsort(first[worse]))  # ... by track 1
    plain, plain_steps = generation_fitness(runs, params, tracks, racing=False)
    np.testing.assert_allclose(plain, first + tracks.mean() / 100.0)
    assert plain_steps == 7 * members * len(tracks) and np.all(runs.calls[-1][1] == tracks)  # all on the same tracks
    with pytest.raises(ValueError, match="at least 2 tracks"):
        race(runs, params, tracks[:1])


def test_search_cost_adds_training_and_evaluation_steps_and_time():
    history = [{"generation": g, "elapsed": 10.0 * g, "env_steps": 100} for g in (1, 2, 3)]
    history[0]["env_steps"] = "nan"  # a row of an older checkpoint counts as 0
    evals = {2: {"mean": 0.0, "std": 0.0, "env_steps": 50.0, "seconds": 1.0},
             3: {"mean": 0.0, "std": 0.0, "env_steps": 50.0, "seconds": 2.0}}
    assert search_cost(history, evals) == {2: (150, 21.0), 3: (300, 33.0)}
    # A search in the dream records dream steps in its history: only its real evaluations are real steps.
    assert search_cost(history, evals, real_training=False) == {2: (50, 21.0), 3: (100, 33.0)}


def test_search_table_reports_each_evaluation_with_its_cost(tmp_path):
    """The README's table of a long search comes from its files: the rows are the evaluations, the cost
    columns search_cost's, and core-hours appear only with the cores given."""
    folder = tmp_path / "controller"
    folder.mkdir()
    (folder / "history.csv").write_text("generation,best,mean,std,worst,sigma,elapsed,env_steps\n"
                                        + "".join(f"{g},0,0,0,0,0.1,{1800.0 * g},{10**6}\n" for g in (1, 2, 3)))
    (folder / "eval.csv").write_text("generation,mean,std,env_steps,seconds\n2,612.25,100.04,32000,360\n")
    config.save_config(SMOKE, folder)
    table = search_table(folder, cores=2).splitlines()
    assert table[0].startswith(f"| generation | held-out mean ± std ({SMOKE.controller.eval_episodes} tracks) |")
    assert table[2:] == ["| 2 | 612.2 ± 100.0 | 2.03 M | 1.10 h | 2.2 |"]  # 2 M + 32,000 steps; 3600 + 360 s
    assert "core-hours" not in search_table(folder)
    config.save_config(config.make_config("smoke", {"controller.env": "dream"}), folder)  # dream steps: not real
    assert search_table(folder).splitlines()[2] == "| 2 | 612.2 ± 100.0 | 0.03 M | 1.10 h |"
    (folder / "history.csv").write_text("generation,best\nlast,1\n")
    with pytest.raises(storage.CorruptFileError, match="not a search history"):
        search_table(folder)
    with pytest.raises(storage.MissingDataError, match="holds no search"):
        search_table(tmp_path / "nothing")


def test_old_controller_configs_keep_the_posterior_mean():
    saved = config.to_dict(SMOKE)
    del saved["controller"]["z_input"]
    assert config.from_dict(saved).controller.z_input == "mean"  # how controllers were fed before the choice
    assert SMOKE.controller.z_input == "sample" and config.from_dict(config.to_dict(SMOKE)) == SMOKE
    with pytest.raises(config.ConfigError, match="racing needs"):
        config.make_config("smoke", {"controller.racing": "true"})


@pytest.fixture(scope="module")
def raced(models_dir, tmp_path_factory):
    """An uninterrupted run with an early stop and racing on: the reference for its resume."""
    data = data_dir_with(models_dir, tmp_path_factory.mktemp("raced"), "vae", "rnn")
    run_script("05_train_controller.py", *TRAIN, *CHEAP, "--no-final-eval", data_dir=data)
    return data


def test_early_stop_and_racing_cut_training_steps_only_and_resume_exactly(raced, models_dir, tmp_path):
    out = raced / "controller"
    history = read_csv(out / "history.csv")
    full = SMOKE.controller.population * 2 * 30
    assert all(0 < int(row["env_steps"]) < full for row in history)  # racing alone: 4 + 2 * 1 of 8 episodes
    assert all(int(row["env_steps"]) == 2 * 30 for row in read_csv(out / "eval.csv"))  # evaluations run in full
    data = data_dir_with(models_dir, tmp_path, "vae", "rnn")
    kill_then_resume_controller(data, data / "controller", out, TRAIN + CHEAP, GENERATIONS)
    strip = [{k: v for k, v in row.items() if k != "elapsed"} for row in read_csv(data / "controller" / "history.csv")]
    assert strip == [{k: v for k, v in row.items() if k != "elapsed"} for row in history]


# --------------------------------------------------------------------------- evaluation anyone can repeat


def test_evaluate_takes_the_controllers_config_and_leaves_its_metrics_alone(trained):
    data, _ = trained
    folder = data / "controller"
    before = (folder / "metrics.json").read_bytes()
    reference = json.loads(before)
    proc = run_plain("evaluate_controller.py", "--data-dir", str(data))
    assert proc.returncode == 0, proc.stderr
    base = FINAL_EVAL_SEED_OFFSET + SMOKE.controller.seed
    metrics = json.loads((folder / f"evaluation_s{base}_n2.json").read_text())
    assert metrics["lengths"] == [30, 30]  # the controller's saved step limit, not the default preset's 1000
    assert metrics["scores"] == reference["scores"] and metrics["seeds"] == reference["seeds"]
    assert (folder / "metrics.json").read_bytes() == before
    rows = read_csv(folder / f"evaluation_s{base}_n2.csv")
    assert [float(row["return"]) for row in rows] == metrics["scores"]
    assert metrics["iqm"] == pytest.approx(np.mean(metrics["scores"]))  # 2 tracks: nothing is trimmed
    assert metrics["iqm_ci95"][0] <= metrics["iqm"] <= metrics["iqm_ci95"][1]

    assert_user_error(run_plain("evaluate_controller.py", "--data-dir", str(data), "--preset", "quick"),
                      "disagrees", "preset smoke")
    other = run_plain("evaluate_controller.py", "--data-dir", str(data), "--track-seed", "5", "--episodes", "3",
                      "--set", "controller.max_steps=20")
    assert other.returncode == 0 and "controller.max_steps=20 (trained with 30)" in other.stderr
    mine = json.loads((folder / "evaluation_s5_n3.json").read_text())
    assert mine["seeds"] == heldout_seeds(5, 3, 0).tolist() and mine["lengths"] == [20, 20, 20]


def test_a_killed_scoring_resumes_from_its_finished_waves(trained, tmp_path):
    """evaluate_controller.py keeps each finished wave beside its output; a rerun after a kill takes them as they
    are (proved by a planted score) and runs the rest; the file is gone once the score is written."""
    from worldmodels.rollout import WaveLog, checkpoint_for

    data, _ = trained
    assert not checkpoint_for(data / "controller" / "metrics.json").exists(), "stage 5 removes its own"
    output = tmp_path / "score.json"
    args = ("evaluate_controller.py", "--data-dir", str(data), "--output", str(output), "--max-concurrent", "1")
    proc = run_plain(*args)
    assert proc.returncode == 0, proc.stderr
    reference = json.loads(output.read_text())
    partial = checkpoint_for(output)
    assert not partial.exists()

    # What a run killed after its first wave (one track) leaves, with a score no real episode gives.
    params = load_npz(data / "controller" / "controller.npz")["params"]
    seeds = np.array(reference["seeds"])
    log = WaveLog(partial, params[None].astype(np.float64), seeds[None], 30, 1, None)
    log.save(0, 1, np.array([12345.0, 0.0]), np.array([7, 0]), np.zeros(2, bool))
    proc = run_plain(*args)
    assert proc.returncode == 0, proc.stderr
    assert "1 of 2 episodes already run" in proc.stdout
    resumed = json.loads(output.read_text())
    assert resumed["scores"] == [12345.0, reference["scores"][1]] and resumed["lengths"] == [7, 30]
    assert not partial.exists()


def test_the_selected_controller_carries_the_generation_it_was_selected_at():
    from worldmodels.artifacts import selected_generation

    scalars = {"generation": 187, "best_eval_generation": 180}
    assert selected_generation(scalars, "params") == 180
    assert selected_generation(scalars, "mean") == selected_generation(scalars, "best_member") == 187
    assert selected_generation({"generation": 3, "best_eval_generation": -1}, "params") == 3  # nothing selected yet
    assert selected_generation({"generation": 3}, "params") == 3  # older files


def test_evaluate_summary_statistics():
    from worldmodels import metrics as ec

    scores = np.array([-50.0, 10.0, 20.0, 30.0, 40.0, 900.0, 910.0, 1000.0])
    summary = ec.summarise(scores, resamples=2000)
    assert summary["iqm"] == pytest.approx(np.mean([20.0, 30.0, 40.0, 900.0]))
    assert summary["sem"] == pytest.approx(scores.std(ddof=1) / np.sqrt(8))
    low, high = summary["iqm_ci95"]
    assert low < summary["iqm"] < high
    assert ec.summarise(scores, resamples=2000) == summary  # a fixed bootstrap seed: the same interval


# --------------------------------------------------------------------------- the shipped agent


def test_a_pretrained_agent_scores_identically_after_a_round_trip_and_refuses_a_changed_file(trained, tmp_path):
    data, _ = trained
    reference = json.loads((data / "controller" / "metrics.json").read_text())
    agent = tmp_path / "pretrained" / "tiny"
    made = run_plain("-m", "worldmodels.pretrained", "export", "--data-dir", str(data), "--name", str(agent))
    assert made.returncode == 0, made.stderr
    proc = run_plain("evaluate_controller.py", "--pretrained", str(agent), "--output", str(tmp_path / "tiny.json"))
    assert proc.returncode == 0, proc.stderr
    shipped = json.loads((tmp_path / "tiny.json").read_text())
    assert shipped["scores"] == reference["scores"]
    with np.load(data / "controller" / "controller.npz") as saved:
        # The agent is the controller selected on the held-out tracks: its generation is the selection's.
        assert shipped["generation"] == int(saved["best_eval_generation"]) >= 0

    half = tmp_path / "pretrained" / "half"
    assert run_plain("-m", "worldmodels.pretrained", "export", "--data-dir", str(data), "--name", str(half),
                     "--float16").returncode == 0
    assert (half / "vision.npz").stat().st_size < 0.6 * (agent / "vision.npz").stat().st_size

    damaged = bytearray((agent / "rnn.npz").read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (agent / "rnn.npz").write_bytes(bytes(damaged))
    proc = run_plain("evaluate_controller.py", "--pretrained", str(agent))
    assert_user_error(proc, "rnn.npz", "SHA-256")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_carried_search_continues_on_a_machine_that_kept_nothing_exactly(trained, models_dir, tmp_path):
    """Stop after 1 generation, carry, restore into an empty folder, go on to 3: the uninterrupted search."""
    reference = trained[0] / "controller"
    first = data_dir_with(models_dir, tmp_path / "first", "vae", "rnn")
    run_script("05_train_controller.py", "--set", "controller.generations=1", "--set", "controller.max_steps=30",
               "--no-final-eval", data_dir=first)
    # Scores of the search (a seed study's, evaluate_controller.py's default files) travel with it; figures do not.
    scores = {"evaluation_s5_n2.json": '{"mean": 1.0}', "evaluation_s5_n2.csv": "track,seed,return,steps\n"}
    for name, text in scores.items():
        (first / "controller" / name).write_text(text)
    (first / "controller" / "other.png").write_bytes(b"not carried")
    carry = tmp_path / "checkpoints" / "run"
    saved = run_plain("-m", "worldmodels.carry", "save", "--data-dir", str(first), "--name", str(carry),
                      "--command", "python 05_train_controller.py --preset smoke")
    assert saved.returncode == 0, saved.stderr
    assert "generation 1" in saved.stdout
    listed = sorted(line.split("  ")[1] for line in (carry / "MANIFEST.sha256").read_text().splitlines())
    assert "vae/vae.keras" in listed and "rnn/rnn.keras" in listed and "controller/evolution.pkl" in listed
    assert not any(name.startswith(("rollouts/", "series/")) for name in listed)
    assert {f"controller/{name}" for name in scores} <= set(listed) and "controller/other.png" not in listed

    fresh = tmp_path / "fresh"  # holds nothing but what the carry brings
    restored = run_plain("-m", "worldmodels.carry", "restore", str(carry), "--data-dir", str(fresh))
    assert restored.returncode == 0, restored.stderr
    assert "continue with: python 05_train_controller.py --preset smoke" in restored.stdout
    assert all((fresh / "controller" / name).read_text() == text for name, text in scores.items())
    resumed = run_script("05_train_controller.py", *TRAIN, "--no-final-eval", data_dir=fresh)
    assert f"1 of {GENERATIONS} generations done" in resumed.stdout
    got, want = load_npz(fresh / "controller" / "controller.npz"), load_npz(reference / "controller.npz")
    for key in ("mean", "params", "best_member"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    strip = [{k: v for k, v in row.items() if k != "elapsed"} for row in read_csv(fresh / "controller" / "history.csv")]
    assert strip == [{k: v for k, v in row.items() if k != "elapsed"} for row in read_csv(reference / "history.csv")]

    # Restoring over a search that went further is refused (it would throw generations away) ...
    proc = run_plain("-m", "worldmodels.carry", "restore", str(carry), "--data-dir", str(fresh))
    assert_user_error(proc, "controller/evolution.pkl", "other versions", "--force")
    # ... and a damaged carry is named before anything is copied.
    damaged = bytearray((carry / "controller" / "evolution.pkl").read_bytes())
    damaged[len(damaged) // 2] ^= 1
    (carry / "controller" / "evolution.pkl").write_bytes(bytes(damaged))
    empty = tmp_path / "empty"
    proc = run_plain("-m", "worldmodels.carry", "restore", str(carry), "--data-dir", str(empty))
    assert_user_error(proc, "evolution.pkl", "SHA-256")
    assert not empty.exists()
