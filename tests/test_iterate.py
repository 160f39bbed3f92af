"""06_iterate.py: the iterative procedure end to end on smoke data, its files, its resume and its checks."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import config
from tests.conftest import (REPO, assert_old_configs_match_the_option_off, assert_replays_in_the_real_env,
                            assert_user_error, data_dir_with, load_npz, noisy_actions, read_csv, run_script,
                            run_until_then_kill)

SCRIPT = "06_iterate.py"
STAGES = ("rollouts", "vae", "series", "rnn")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time (a rewrite with equal bytes changes the time)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(smoke_rnn, tmp_path_factory):
    """A data dir after iteration 1 alone (with a snapshot of its folder), then iteration 2 in a second call."""
    data = data_dir_with(smoke_rnn, tmp_path_factory.mktemp("iterate_reference"), *STAGES)
    run_script(SCRIPT, "--set", "iterate.iterations=1", data_dir=data)
    first = snapshot(data / "iterations" / "iter_001")
    second = run_script(SCRIPT, data_dir=data)
    return data, first, second


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_two_iterations_end_to_end(reference):
    from worldmodels import storage

    data, _, second = reference
    rows = read_csv(data / "iterations" / "iterations.csv")
    assert [row["iteration"] for row in rows] == ["1", "2"]
    assert "iteration 2: real score" in second.stdout
    steps = [int(row["real_env_steps"]) for row in rows]
    assert steps[0] > 0 and steps[1] == steps[0] + int(rows[1]["collect_steps"]) + int(rows[1]["eval_steps"]) \
        + int(rows[1]["steering_env_steps"])
    # The steering check replays both collected episodes' 5-frame prefix and 20 steps, once per probe.
    for row in rows:
        assert int(row["steering_env_steps"]) == 2 * 2 * (5 + 20)
        assert float(row["steering_real_10"]) > 0 and math.isfinite(float(row["steering_model_10"]))
    # Curiosity is off by default: no scoring episodes, no choice; two iterations give no rank correlation.
    for row in rows:
        assert row["curiosity_env_steps"] == "0" and row["curiosity_variant"] == row["curiosity_bonus"] == "nan"
        assert row["dream_real_rank_corr"] == "nan"
    assert not any(data.glob("iterations/iter_*/curiosity.npz"))
    # So is the repair: no repair episodes, no measurements, no steps.
    assert not any(data.glob("iterations/iter_*/repair.npz"))
    assert not any(data.glob("iterations/*/rollouts/episode_*5?????.npz"))
    for row in rows:
        assert row["repair_env_steps"] == "0" and row["repair_disagreement"] == row["repair_reward_gap"] == "nan"
    for i, row in enumerate(rows, start=1):
        folder = data / "iterations" / f"iter_{i:03d}"
        metrics = load_json(folder / "controller" / "metrics.json")
        assert float(row["real_score"]) == metrics["mean"] and float(row["dream_score"]) == metrics["dream"]["mean"]
        assert math.isclose(float(row["exploit_gap"]), metrics["dream"]["mean"] - metrics["mean"])
        assert metrics["episodes"] == 2 and metrics["observation"] == "stock"
        assert math.isfinite(float(row["m_z_nll_new"]))
        # The diagnostics of the previous M on these episodes (worldmodels.diagnostics; smoke episodes are
        # 60 steps from frame 5, so 50 steps ahead is reached).
        for key in ("exploit_gap_same_actions", "latent_error_open_1", "latent_error_teacher_50"):
            assert math.isfinite(float(row[key])), key
        assert row["latent_error_open_1"] == row["latent_error_teacher_1"]  # both from the same state and input
        assert (folder / "diagnostics.png").is_file()
        assert row["episodes_by_policy"] == f"brownian:3;controller:{2 * i}"
        names = [f"episode_{i * 1_000_000 + j:06d}.npz" for j in range(2)]
        for kind, where in (("rollout", "rollouts"), ("series", "series")):  # the tag survives encoding
            assert sorted(p.name for p in (folder / where).glob("episode_*.npz")) == names
            for name in names:
                assert storage.load_episode(folder / where / name, kind, keys=("policy",))["policy"] == "controller"
        # M of iteration i trained on stage 3's series and every iteration's so far.
        split = load_json(folder / "rnn" / "split.json")
        assert len(split["train"]) + len(split["heldout"]) == 3 + 2 * i


def load_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_iteration_one_is_not_rewritten_by_iteration_two(reference):
    data, first, _ = reference
    assert snapshot(data / "iterations" / "iter_001") == first


def test_iteration_two_starts_from_iteration_one(reference):
    """Iteration 2's search starts from iteration 1's controller, and its M from iteration 1's M."""
    data, _, _ = reference
    previous = load_npz(data / "iterations" / "iter_001" / "controller" / "controller.npz")["params"]
    assert np.any(previous != 0)
    import pickle

    state = pickle.loads((data / "iterations" / "iter_002" / "controller" / "evolution.pkl").read_bytes())
    np.testing.assert_allclose(state["es"].x0, previous)
    # Iteration 1 started from zeros (the smoke data dir holds no controller), and says so for later readers.
    assert load_json(data / "iterations" / "start.json") == {"controller": ""}


def test_an_iterations_controller_is_scored_and_shipped_with_its_own_m(reference, tmp_path):
    """evaluate_controller.py on iteration 2's controller drives with iteration 2's M (fine-tuned there), not the
    data dir's: it reproduces the score 06 measured, and the shipped agent carries that M."""
    from worldmodels import artifacts, pretrained
    from worldmodels.storage import read_json

    data = reference[0]
    folder = data / "iterations" / "iter_002" / "controller"
    measured = read_json(folder / "metrics.json")
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, str(REPO / "evaluate_controller.py"), "--data-dir", str(data),
                           "--controller", str(folder), "--episodes", str(measured["episodes"]), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"M of {data.absolute() / 'iterations' / 'iter_002'}" in proc.stdout
    assert read_json(out)["scores"] == measured["scores"]
    cfg = config.load_config(folder / "config.json")
    shipped = pretrained.export_from_data(data, tmp_path / "agent", controller=folder)
    rnn = pretrained.load(shipped)[2]
    want = artifacts.load_rnn(data / "iterations" / "iter_002", cfg)
    stage4 = artifacts.load_rnn(data, cfg)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(rnn.weights, want.weights))
    assert not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(rnn.weights, stage4.weights))


def test_collected_episodes_replay_in_the_real_environment(reference):
    """The recorded frames, actions and rewards are one real episode: replaying the actions on the
    recorded track reproduces the rewards and the frames (obs[t] is the frame before action[t])."""
    from worldmodels import storage

    path = sorted((reference[0] / "iterations" / "iter_002" / "rollouts").glob("episode_*.npz"))[0]
    episode = storage.load_episode(path, "rollout")
    assert_replays_in_the_real_env(episode, len(episode["action"]))
    assert episode["truncated"][-1] or episode["terminated"][-1]


def test_kill_anywhere_then_resume_gives_the_same_table(reference, smoke_rnn, tmp_path):
    """SIGKILL while iteration 2 collects, then while it searches; the resumed runs end with the rows of an
    uninterrupted run (wall time aside). Iteration 1 is the reference's, copied, to save its minute."""
    import shutil

    data = data_dir_with(smoke_rnn, tmp_path, *STAGES)
    done = reference[0] / "iterations"
    shutil.copytree(done / "iter_001", data / "iterations" / "iter_001")
    shutil.copy(done / "config.json", data / "iterations" / "config.json")
    rows = (done / "iterations.csv").read_text().splitlines(keepends=True)
    (data / "iterations" / "iterations.csv").write_text("".join(rows[:2]))
    iteration = data / "iterations" / "iter_002"
    cmd = [sys.executable, str(REPO / SCRIPT), "--preset", "smoke", "--data-dir", str(data)]
    run_until_then_kill(cmd, lambda: any((iteration / "rollouts").glob("episode_*.npz")))
    assert len(read_csv(data / "iterations" / "iterations.csv")) == 1
    history = iteration / "controller" / "history.csv"
    run_until_then_kill(cmd, lambda: history.exists() and len(read_csv(history)) >= 1)
    run_script(SCRIPT, data_dir=data)
    want = read_csv(reference[0] / "iterations" / "iterations.csv")
    assert without_seconds(read_csv(data / "iterations" / "iterations.csv")) == without_seconds(want)


def test_a_branched_dream_starts_from_every_series_so_far(smoke_rnn, tmp_path):
    """With dream.start_every, an iteration's dream starts every k frames of stage 3's series and of the iteration's
    own (collected and repaired), M in the state it reaches there: the states C meets, not only the start line."""
    from worldmodels import storage

    data = data_dir_with(smoke_rnn, tmp_path, *STAGES)
    proc = run_script(SCRIPT, "--set", "iterate.iterations=1", "--set", "dream.start_every=10", data_dir=data)
    paths = sorted((data / "series").glob("episode_*.npz")) + \
        sorted((data / "iterations" / "iter_001" / "series").glob("episode_*.npz"))
    skip = config.make_config("smoke").dream.skip_initial_frames
    lengths = [len(storage.load_episode(path, "series", keys=("mu",))["mu"]) for path in paths]
    rows = sum(len(range(min(skip, length - 1), length, 10)) for length in lengths)
    assert f"{rows} starting frames (every 10 frames of each series from frame {skip}, {len(paths)} series)" \
        in proc.stdout
    assert config.load_config(data / "iterations" / "iter_001" / "controller" / "config.json").dream.start_every == 10


def test_a_bad_value_is_a_one_line_error(reference, tmp_path):
    proc = run_script(SCRIPT, "--set", "iterate.episodes=0", data_dir=tmp_path, check=False)
    assert_user_error(proc, "iterate.episodes must be positive")
    proc = run_script(SCRIPT, "--set", "iterate.action_noise=-1", data_dir=tmp_path, check=False)
    assert_user_error(proc, "iterate.action_noise must be >= 0")
    # Continuing the reference with other settings would mix two procedures in one table.
    proc = run_script(SCRIPT, "--set", "iterate.action_noise=0.5", data_dir=reference[0], check=False)
    assert_user_error(proc, "iterate.action_noise")


def test_missing_stages_name_the_command(tmp_path):
    proc = run_script(SCRIPT, data_dir=tmp_path, check=False)
    assert_user_error(proc, "02_train_vae.py")


def test_action_noise_is_per_episode_correlated_and_in_the_action_box():
    from worldmodels.env import ACTION_HIGH, ACTION_LOW

    np.testing.assert_array_equal(noisy_actions([1, 2], 0.0), np.tile(np.float32([0, 0.5, 0]), (2, 200, 1)))
    together = noisy_actions([5, 7, 9], 0.3)
    np.testing.assert_array_equal(together[1], noisy_actions([7], 0.3)[0])  # whatever batch it runs in
    assert not np.array_equal(together[0], together[2])
    assert np.all(together >= ACTION_LOW) and np.all(together <= ACTION_HIGH)
    steer = together[:, :, 0]
    lag1 = np.mean([np.corrcoef(s[:-1], s[1:])[0, 1] for s in steer])
    assert lag1 > 0.7  # temporally correlated (OU with theta 0.1: ~0.9), unlike independent noise
    with pytest.raises(ValueError, match="action noise"):
        noisy_actions([1], -0.1)


def test_the_collection_lapses_as_configured_and_only_the_collection(monkeypatch, tmp_path):
    """iterate.steer_lapses reaches the collection's driving (recording.NoisyWorld's lapses, tested in
    test_controller_policy); the other real driving of an iteration (curiosity, repair, steering) has none."""
    import config
    from worldmodels import iterate, recording

    cfg = config.make_config("smoke", {"iterate.steer_lapses": 0.05, "iterate.steer_lapse_steps": 4})
    seen = []
    monkeypatch.setattr(recording, "drive_and_record", lambda *args, **kwargs: seen.append(args[7]) or 0)
    iterate.collect_episodes(cfg, 1, tmp_path, np.zeros(3), None, None)
    assert (seen[0].steer_lapses, seen[0].steer_lapse_steps) == (0.05, 4.0)
    assert iterate.driving(cfg, 10).steer_lapses == 0.0
    assert config.make_config("smoke").iterate.steer_lapses == 0.0  # off by default
    with pytest.raises(config.ConfigError, match="iterate.steer_lapses"):
        config.make_config("smoke", {"iterate.steer_lapses": 1.0})


def test_reward_error_on_tile_steps_is_measured_on_those_steps_only(reference):
    """``reward_mse_tiles`` (the row's ``m_reward_mse_tiles_new``) equals the squared error of M's reward
    prediction on the steps with a positive reward, computed here over whole episodes at once."""
    import config
    from worldmodels import artifacts, sequences, storage

    data = reference[0]
    cfg = config.make_config("smoke")
    model = artifacts.load_rnn(data / "iterations" / "iter_001", cfg)
    paths = sorted((data / "iterations" / "iter_002" / "series").glob("episode_*.npz"))
    errors = []
    for path in paths:
        series = storage.load_episode(path, "series")
        out = model(np.concatenate([series["mu"], series["action"]], axis=-1)[None], training=False)
        tiles = series["reward"] > 0
        errors.append(np.square(out["reward"].numpy()[0] - series["reward"])[tiles])
    want = np.concatenate(errors)
    assert len(want) > 0, "the collected episodes should hold tile rewards"
    got = sequences.evaluate_model(model, paths, 100, batch_size=3)  # one window per episode, from M's zero state
    np.testing.assert_allclose(got["reward_mse_tiles"], want.mean(), rtol=1e-4)
    assert got["reward_mse_tiles"] > got["reward_mse"]  # a tile's +3 is what M misses, not the -0.1


def test_a_table_from_before_the_curiosity_reads_with_nan_and_takes_new_rows(tmp_path):
    from worldmodels import iterate

    old = [key for key in iterate.FIELDS if key not in iterate.CURIOSITY_FIELDS + (iterate.RANK_FIELD,)]
    path = tmp_path / "iterations.csv"
    path.write_text(",".join(old) + "\n" + ",".join("1" if key == "iteration" else "2.5" for key in old) + "\n")
    iterate.append_row(path, {key: (2 if key == "iteration" else 0.5) for key in iterate.FIELDS})
    rows = iterate.read_rows(path)
    assert rows[0]["curiosity_bonus"] == rows[0]["dream_real_rank_corr"] == "nan" and rows[0]["real_score"] == "2.5"
    assert rows[1]["curiosity_bonus"] == "0.5"


def test_the_rank_correlation_of_dream_and_real_scores_over_the_iterations():
    from worldmodels import iterate

    rows = [{"dream_score": "1.0", "real_score": "10.0"}, {"dream_score": "2.0", "real_score": "30.0"}]
    assert math.isnan(iterate.score_rank_correlation(rows[:1], 3.0, 20.0))  # two iterations: too few
    # Dream ranks 1, 2, 3 against real ranks 1, 3, 2: rho = 1 - 6 * 2 / (3 * 8) = 0.5.
    assert iterate.score_rank_correlation(rows, 3.0, 20.0) == pytest.approx(0.5)
    assert iterate.score_rank_correlation(rows, 3.0, 40.0) == pytest.approx(1.0)


def test_old_iterations_configs_load_and_match_a_run_without_curiosity(tmp_path):
    """An iterations folder's config.json from before the curiosity keys is compatible with curiosity off."""
    from worldmodels import iterate

    assert_old_configs_match_the_option_off(tmp_path, "iterate", ("curiosity", "curiosity_variants", "curiosity_steps"),
                                            iterate.ITERATE_KEYS, {"iterate.curiosity_variants": 2})


def test_the_iterations_table_prints_each_row_with_unmeasured_values_as_dashes(tmp_path):
    from worldmodels import diagnostics, figures, iterate

    root = tmp_path / "iterations"
    root.mkdir()
    values = {"iteration": 1, "real_env_steps": 2_500_000, "episodes_by_policy": "brownian:20;controller:180",
              "m_z_nll_new": 0.7312, "exploit_gap_same_actions": -5.04, "repair_disagreement": 12.34,
              "repair_disagreement_all": 8.0, "dream_score": 531.6, "real_score": 47.04, "real_std": 58.47,
              "exploit_gap": 484.56, "seconds": 5400.0}
    iterate.append_row(root / "iterations.csv", {key: values.get(key, 0.0) for key in iterate.FIELDS})
    iterate.append_row(root / "iterations.csv", {**{key: values.get(key, 0.0) for key in iterate.FIELDS},
                                                 "iteration": 2, "repair_disagreement": math.nan})
    out = tmp_path / "table.md"
    assert figures.main(["iterations_table", "--data-dir", str(tmp_path), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| iteration |") and "(? tracks)" in lines[0]
    assert f"same actions ({diagnostics.HORIZON} steps)" in lines[0]
    assert lines[2] == ("| 1 | brownian 20, controller 180 | 2.50 M | 0.731 | -5.0 | 12.3 / 8.0 | 531.6 | 47.0 ± 58.5 "
                        "| 484.6 | 1.50 h |")
    assert "| – | 531.6 |" in lines[3]  # the repair was off in iteration 2


def test_the_iterations_table_of_a_run_without_iterations_names_the_command(tmp_path):
    from worldmodels import figures, storage

    with pytest.raises(storage.MissingDataError, match="06_iterate.py"):
        figures.iterations_table(tmp_path)


def test_a_carried_run_records_its_episodes_again_and_goes_on_to_the_same_rows(reference, smoke_rnn, tmp_path):
    """Iteration 1 carried without its episodes (``carry save --iterations``) and restored beside stages 1 and 3
    only, as a fresh machine would have them after rerunning those, goes on: 06 records iteration 1's episodes
    again (the same series as the first time, on this machine) and iteration 2's row is the uninterrupted run's."""
    import shutil

    from tests.conftest import run_plain
    from worldmodels import storage

    source = data_dir_with(smoke_rnn, tmp_path / "source", *STAGES)
    done = reference[0] / "iterations"
    shutil.copytree(done / "iter_001", source / "iterations" / "iter_001")
    for name in ("config.json", "start.json"):
        shutil.copy(done / name, source / "iterations" / name)
    rows = (done / "iterations.csv").read_text().splitlines(keepends=True)
    (source / "iterations" / "iterations.csv").write_text("".join(rows[:2]))
    carry = tmp_path / "carry"
    saved = run_plain("-m", "worldmodels.carry", "save", "--data-dir", str(source), "--name", str(carry), "--iterations")
    assert saved.returncode == 0, saved.stderr
    assert "1 finished iteration(s) of iterations/" in saved.stdout
    listed = storage.verify_manifest(carry, "carry")
    for name in ("vae/vae.keras", "rnn/rnn.keras", "iterations/iterations.csv", "iterations/start.json",
                 "iterations/iter_001/rnn/rnn.keras", "iterations/iter_001/controller/controller.npz",
                 "iterations/iter_001/seconds.json", "iterations/iter_001/diagnostics.png"):
        assert name in listed, name
    assert not any("/rollouts/" in name or "/series/" in name or name.endswith("evolution.pkl") for name in listed)

    fresh = data_dir_with(smoke_rnn, tmp_path / "fresh", "rollouts", "series")
    restored = run_plain("-m", "worldmodels.carry", "restore", str(carry), "--data-dir", str(fresh))
    assert restored.returncode == 0, restored.stderr
    proc = run_script(SCRIPT, data_dir=fresh)
    assert "iteration 1: its episodes are missing" in proc.stdout + proc.stderr
    series = sorted((done / "iter_001" / "series").glob("episode_*.npz"))
    assert [p.name for p in sorted((fresh / "iterations" / "iter_001" / "series").glob("episode_*.npz"))] == [
        p.name for p in series]
    for path in series:
        got, want = load_npz(fresh / "iterations" / "iter_001" / "series" / path.name), load_npz(path)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{path.name}: {key}")
    want = read_csv(done / "iterations.csv")
    assert without_seconds(read_csv(fresh / "iterations" / "iterations.csv")) == without_seconds(want)
