"""study_seeds.py and ``python -m worldmodels.seed_study table``: one search per controller seed on one V and M,
every seed scored on the same final tracks, the statistics over seeds, a no-op rerun, and clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

import config
from tests.conftest import REPO, assert_user_error, data_dir_with, load_npz, read_csv, run_script
from worldmodels import seed_study
from worldmodels.rollout import FINAL_EVAL_SEED_OFFSET, heldout_seeds

SMOKE = config.make_config("smoke")
# Two seeds of one short generation each; 4 final tracks, so that the IQM drops the best and the worst.
ARGS = ("--set", "controller.seeds=0,1", "--set", "controller.generations=1", "--set", "controller.max_steps=30",
        "--set", "controller.final_eval_episodes=4", "--set", "controller.backend=serial")
BASE = FINAL_EVAL_SEED_OFFSET + SMOKE.controller.seed


@pytest.fixture(scope="module")
def study(smoke_rnn, tmp_path_factory):
    data = data_dir_with(smoke_rnn, tmp_path_factory.mktemp("seeds"), "vae", "rnn")
    proc = run_script("study_seeds.py", *ARGS, data_dir=data)
    return data, proc


def test_each_seed_has_its_search_and_all_are_scored_on_the_same_tracks(study):
    data, _ = study
    folder = data / "controller_seeds"
    shared = heldout_seeds(SMOKE.controller.seed, 4, FINAL_EVAL_SEED_OFFSET).tolist()
    params = {}
    for seed in (0, 1):
        out = folder / f"seed_{seed}"
        assert config.load_config(out / "config.json").controller.seed == seed
        assert len(read_csv(out / "history.csv")) == 1
        params[seed] = load_npz(out / "controller.npz")["params"]
        tracks = read_csv(out / f"evaluation_s{BASE}_n4.csv")
        assert [int(row["seed"]) for row in tracks] == shared, f"seed {seed} was scored on other tracks"
        assert all(int(row["steps"]) == 30 for row in tracks)  # full episodes
        assert not (out / "metrics.json").exists(), "stage 5's own final evaluation (its seed's tracks) is skipped"
    # Seed 1's own final stream is not what it was scored on, and the seeds really ran different searches.
    assert heldout_seeds(1, 4, FINAL_EVAL_SEED_OFFSET).tolist() != shared
    assert not np.array_equal(params[0], params[1])


def test_the_statistics_over_seeds_are_those_of_the_per_track_scores(study):
    data, proc = study
    folder = data / "controller_seeds"
    results = json.loads((folder / "results.json").read_text())
    assert [row["seed"] for row in results["rows"]] == [0, 1]
    means = []
    for row in results["rows"]:
        returns = [float(r["return"]) for r in read_csv(folder / f"seed_{row['seed']}" / f"evaluation_s{BASE}_n4.csv")]
        assert row["mean"] == pytest.approx(np.mean(returns)) and row["std"] == pytest.approx(np.std(returns))
        assert row["iqm"] == pytest.approx(np.mean(np.sort(returns)[1:3]))
        means.append(row["mean"])
    across = results["across_seeds"]
    assert across["seeds"] == 2
    assert across["mean"] == pytest.approx(np.mean(means)) and across["std"] == pytest.approx(np.std(means, ddof=1))
    assert results["final_tracks"] == {"track_seed": BASE, "episodes": 4, "max_steps": 30,
                                       "seeds": heldout_seeds(SMOKE.controller.seed, 4, FINAL_EVAL_SEED_OFFSET).tolist()}
    assert results["vae_model"] == "vae" and results["settings"]["controller.seeds"] == [0, 1]
    table = (folder / "results.md").read_text()
    assert f"**{across['mean']:.1f} ± {across['std']:.1f}**" in table
    assert (folder / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "study_seeds.py" in results["command"]


def test_the_score_is_what_evaluate_controller_gives_on_the_same_tracks(study, tmp_path):
    data, _ = study
    out = data / "controller_seeds" / "seed_1"
    ours = json.loads((out / f"evaluation_s{BASE}_n4.json").read_text())
    # --controller takes the controller file or its folder
    for k, given in enumerate((out / "controller.npz", out)):
        output = tmp_path / f"eval_{k}.json"
        run_script("evaluate_controller.py", "--controller", str(given), "--track-seed", str(BASE),
                   "--episodes", "4", "--output", str(output), "--set", "controller.backend=serial", data_dir=data)
        theirs = json.loads(output.read_text())
        assert theirs["seeds"] == ours["seeds"] and theirs["scores"] == ours["scores"]


def test_a_rerun_is_a_no_op(study):
    data, _ = study
    folder = data / "controller_seeds"
    files = [folder / f"seed_{k}" / name for k in (0, 1) for name in ("controller.npz", f"evaluation_s{BASE}_n4.json")]
    before = [path.stat().st_mtime_ns for path in files]
    rerun = run_script("study_seeds.py", *ARGS, data_dir=data)
    assert rerun.stdout.count("nothing to do") == 2 and rerun.stdout.count("already scored") == 2
    assert [path.stat().st_mtime_ns for path in files] == before
    results = json.loads((folder / "results.json").read_text())
    assert [row["seed"] for row in results["rows"]] == [0, 1]


def write_results(folder, tracks: dict, **changes) -> None:
    """A seed study's results.json with the final ``tracks`` of another study, ``changes`` applied; its two seeds
    scored 10 and 30."""
    rows = [{"seed": k, "mean": m, "std": 1.0, "iqm": m, "iqm_ci95": [m, m], "min": m, "max": m, "generation": 1,
             "selected_at_generation": 1, "scores": [m], "folder": "x"} for k, m in ((0, 10.0), (1, 30.0))]
    results = {"vae_model": "vae", "rows": rows, "across_seeds": seed_study.across_seeds(rows),
               "final_tracks": {**tracks, **changes},
               "settings": {"controller.generations": 1, "controller.population": 4}}
    (folder / "controller_seeds").mkdir(parents=True)
    (folder / "controller_seeds" / "results.json").write_text(json.dumps(results))


def table(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worldmodels.seed_study", "table", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_the_table_of_two_runs_refuses_runs_scored_on_other_tracks(study, tmp_path):
    data, _ = study
    study = json.loads((data / "controller_seeds" / "results.json").read_text())
    ours, tracks = study["across_seeds"], study["final_tracks"]
    write_results(tmp_path / "same", tracks)
    write_results(tmp_path / "other", tracks, seeds=tracks["seeds"][:-1] + [tracks["seeds"][-1] + 1])
    write_results(tmp_path / "longer", tracks, max_steps=1000)
    out = tmp_path / "seeds.md"
    figure = tmp_path / "seeds.png"
    proc = table("--run", f"vae={data}", "--run", f"vae_gan={tmp_path / 'same'}", "--out", str(out),
                 "--figure", str(figure))
    assert proc.returncode == 0, proc.stderr
    assert figure.stat().st_size > 0 and "vae_gan − vae: " in out.read_text()
    # The second run's seeds scored 10 and 30: mean 20, std (ddof 1) 14.1.
    assert "| vae | vae | 0, 1 |" in out.read_text() and f"{ours['mean']:.1f}" in out.read_text()
    assert "| 10.0, 30.0 | 20.0 ± 14.1 |" in out.read_text() and out.read_text() in proc.stdout

    assert_user_error(table("--run", f"a={tmp_path / 'same'}", "--run", f"b={tmp_path / 'other'}"),
                      "different final tracks")
    assert_user_error(table("--run", f"a={tmp_path / 'same'}", "--run", f"b={tmp_path / 'longer'}"),
                      "different final tracks")
    assert_user_error(table("--run", f"a={tmp_path / 'same'}", "--run", f"b={tmp_path / 'nothing'}"), "results.json")
    assert_user_error(table("--run", "no_equals_sign"), "NAME=DATA_DIR")


def test_the_difference_of_two_runs_has_the_welch_standard_error():
    # se = sqrt(2^2 / 4 + 3^2 / 9) = sqrt(2); difference 6 = 4.2 standard errors.
    line = seed_study.difference_line("a", {"mean": 10.0, "std": 2.0, "seeds": 4}, "b", {"mean": 16.0, "std": 3.0, "seeds": 9})
    assert line == "b − a: +6.0 ± 1.4 (standard error over the seeds, Welch), 4.2 standard errors."
    one = seed_study.difference_line("a", {"mean": 10.0, "std": None, "seeds": 1}, "b", {"mean": 16.0, "std": 3.0, "seeds": 9})
    assert one == "b − a: +6.0 (one seed in a run: no standard error)."


def test_one_seed_has_no_spread_over_seeds():
    rows = [{"seed": 3, "mean": 12.0, "iqm": 11.0}]
    assert seed_study.across_seeds(rows) == {"seeds": 1, "mean": 12.0, "std": None, "iqm_mean": 11.0, "iqm_std": None}
    rows.append({"seed": 4, "mean": 20.0, "iqm": 11.0})
    assert seed_study.across_seeds(rows)["std"] == pytest.approx(np.std([12.0, 20.0], ddof=1))


@pytest.mark.parametrize("seeds, message", [("1,1", "distinct"), ("-3", "distinct"), ("", "empty"),
                                            ("a,b", "controller.seeds")])
def test_a_bad_seeds_list_is_a_one_line_error(tmp_path, seeds, message):
    proc = run_script("study_seeds.py", "--set", f"controller.seeds={seeds}", data_dir=tmp_path, check=False)
    assert_user_error(proc, message)
    assert not (tmp_path / "controller_seeds").exists()
