"""worldmodels/repair.py and 06_iterate.py's iterate.repair_episodes: the real state re-created from a track seed
and an action prefix, dream-vs-real disagreement, and the repair episodes an iteration adds to M's data."""

from __future__ import annotations

import math
import shutil
import sys

import numpy as np
import pytest

from tests.conftest import (REPO, assert_old_configs_match_the_option_off, assert_replays_in_the_real_env, data_dir_with,
                            load_npz, read_csv, run_script, run_until_then_kill)
from tests.test_iterate import SCRIPT, STAGES, load_json, snapshot, without_seconds

REPAIR = ("--set", "iterate.repair_episodes=2", "--set", "iterate.repair_candidates=3",
          "--set", "iterate.repair_horizon=10")


def plan(**kwargs):
    from worldmodels.repair import Plan

    settings = dict(candidates=5, keep=2, horizon=10, temperature=1.0, skip=5, max_steps=60, seed=(0, 1))
    return Plan(**{**settings, **kwargs})


def test_starts_go_round_the_episodes_inside_their_bounds_and_repeat():
    from worldmodels.repair import choose_starts

    rows, t0 = choose_starts([60, 30, 3], plan(candidates=7))
    np.testing.assert_array_equal(rows, [0, 1, 2, 0, 1, 2, 0])
    # Episode 0: [5, 60 - 10]; episode 1: [5, 29]; episode 2 (3 steps): frame 2, its last.
    assert all(5 <= t <= 50 for t in t0[rows == 0]) and all(5 <= t <= 29 for t in t0[rows == 1])
    np.testing.assert_array_equal(t0[rows == 2], [2, 2])
    again = choose_starts([60, 30, 3], plan(candidates=7))
    np.testing.assert_array_equal(again[1], t0)
    assert not np.array_equal(choose_starts([60, 30, 3], plan(candidates=7, seed=(0, 2)))[1], t0)
    with pytest.raises(ValueError, match="keep <= candidates"):
        plan(keep=6)


def test_the_windows_kept_are_those_of_largest_disagreement():
    from worldmodels.repair import chosen

    np.testing.assert_array_equal(chosen([0.5, np.nan, 2.0, 0.5, 1.0], 3), [0, 2, 4])
    np.testing.assert_array_equal(chosen([1.0, 1.0, 1.0], 2), [0, 1])  # ties: the lower index


@pytest.fixture(scope="module")
def recorded(smoke_rnn):
    """Two stage 1 episodes of the smoke data (60 steps each), with V and M."""
    import config
    from worldmodels import artifacts, storage

    cfg = config.make_config("smoke")
    paths = sorted((smoke_rnn / "rollouts").glob("episode_*.npz"))[:2]
    episodes = [{**storage.load_episode(p, "rollout"), "name": p.name} for p in paths]
    assert all(len(e["action"]) == 60 for e in episodes)
    return episodes, artifacts.load_vision(smoke_rnn, cfg), artifacts.load_rnn(smoke_rnn, cfg)


def replay(episodes, rows, t0, actions):
    from worldmodels import envpool, repair

    with envpool.CarRacingPool(len(rows), 60, "serial") as pool:
        return repair.replay(pool, episodes, rows, t0, actions)


def test_a_replayed_prefix_recreates_the_recorded_state_and_the_real_dream_disagrees_by_zero(recorded):
    """With the recorded actions as the "dream" actions and V's z of the recorded frames as the "dream" z, the
    real replay from the same state gives back the recorded frames and rewards: disagreement and reward gap are
    exactly zero, and the repair episode is the recorded episode's first t0 + L steps."""
    from worldmodels import repair

    episodes, vae, _ = recorded
    rows, t0, horizon = np.array([0, 1, 0]), np.array([20, 7, 35]), 10
    actions = np.stack([episodes[r]["action"][t:t + horizon] for r, t in zip(rows, t0)])
    real = replay(episodes, rows, t0, actions)
    np.testing.assert_array_equal(real["steps"], [horizon] * 3)
    for c, (r, t) in enumerate(zip(rows, t0)):
        np.testing.assert_array_equal(real["frames"][c], episodes[r]["obs"][t + 1:t + 1 + horizon])
        np.testing.assert_array_equal(real["reward"][c], episodes[r]["reward"][t:t + horizon])
    dreamed = {"actions": actions, "reward": real["reward"].astype(np.float64),
               "z": np.stack([vae.encode(episodes[r]["obs"][t + 1:t + 1 + horizon])[0] for r, t in zip(rows, t0)])}
    measured = repair.disagreement(vae, dreamed, real)
    np.testing.assert_array_equal(measured["latent"], np.zeros(3))
    np.testing.assert_array_equal(measured["reward_gap"], np.zeros(3))
    episode = repair.repair_episode(episodes[0], 20, actions, real, 0)
    for key in ("obs", "action", "reward", "terminated"):
        np.testing.assert_array_equal(episode[key], episodes[0][key][:20 + horizon], err_msg=key)
    assert episode["truncated"][-1] and not episode["truncated"][:-1].any() and episode["policy"] == "repair"
    # A dream one step out of line disagrees.
    shifted = dict(dreamed, z=np.roll(dreamed["z"], 1, axis=1), reward=dreamed["reward"] + 0.5)
    measured = repair.disagreement(vae, shifted, real)
    assert np.all(measured["latent"] > 0) and np.allclose(measured["reward_gap"], 0.5 * horizon)


def test_a_replay_that_does_not_reproduce_the_recording_is_refused(recorded):
    episodes, _, _ = recorded
    tampered = [dict(episodes[0], obs=episodes[0]["obs"].copy())]
    tampered[0]["obs"][12, 30, 30] += 1
    with pytest.raises(ValueError, match="did not reproduce its frame 12"):
        replay(tampered, [0], [20], np.zeros((1, 5, 3), np.float32))


def test_the_dream_starts_from_each_real_state_and_is_reproducible(recorded):
    from models.controller import num_parameters
    from worldmodels import dream, repair

    episodes, vae, rnn = recorded
    settings = plan(candidates=3, horizon=6)
    starts = repair.start_states(vae, episodes, [0, 1, 0], [20, 7, 35], 64)
    world = repair.PinnedDream(rnn, starts, 1.0, 6, 3, done="off")
    world.reset(np.array([4, 5, 6]))
    np.testing.assert_array_equal(world.start_rows, [0, 1, 2])
    h, _ = dream.read_prefix(rnn, starts.prefix_mu, starts.prefix_action, starts.frames)
    np.testing.assert_array_equal(world.observation()[:, rnn.z_size:], h)
    params = np.random.default_rng(0).normal(size=num_parameters(rnn.z_size, rnn.hidden_units)) * 0.1
    first = repair.dream_from_starts(rnn, starts, params, settings)
    assert first["actions"].shape == (3, 6, 3) and first["z"].shape == (3, 6, rnn.z_size)
    again = repair.dream_from_starts(rnn, starts, params, settings)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    assert not np.array_equal(first["actions"][0], first["actions"][2])  # two starts, two drives


# --------------------------------------------------------------------------- in 06_iterate.py


@pytest.fixture(scope="module")
def repaired(smoke_rnn, tmp_path_factory):
    """Iteration 1 with the repair on (and a snapshot of its folder), then iteration 2 in a second call."""
    data = data_dir_with(smoke_rnn, tmp_path_factory.mktemp("repair_reference"), *STAGES)
    run_script(SCRIPT, *REPAIR, "--set", "iterate.iterations=1", data_dir=data)
    first = snapshot(data / "iterations" / "iter_001")
    run_script(SCRIPT, *REPAIR, data_dir=data)
    return data, first


def test_repair_episodes_are_saved_tagged_and_in_the_next_m(repaired):
    from worldmodels import storage

    data, first = repaired
    rows = read_csv(data / "iterations" / "iterations.csv")
    assert snapshot(data / "iterations" / "iter_001") == first
    for i, row in enumerate(rows, start=1):
        folder = data / "iterations" / f"iter_{i:03d}"
        names = [f"episode_{i * 1_000_000 + 500_000 + k:06d}.npz" for k in range(2)]
        assert sorted(p.name for p in (folder / "rollouts").glob("episode_*.npz"))[2:] == names
        summary = load_npz(folder / "repair.npz")
        assert summary["latent"].shape == (3,) and len(summary["chosen"]) == 2
        kept = summary["latent"][summary["chosen"]]
        assert kept.min() >= np.delete(summary["latent"], summary["chosen"]).max()
        for name, c in zip(names, summary["chosen"]):
            for kind, where in (("rollout", "rollouts"), ("series", "series")):
                episode = storage.load_episode(folder / where / name, kind)
                assert episode["policy"] == "repair"
                assert len(episode["action"]) == summary["t0"][c] + summary["steps"][c]
        split = load_json(folder / "rnn" / "split.json")
        assert set(names) <= set(split["train"]) | set(split["heldout"])  # M of this iteration trained on them
        assert row["episodes_by_policy"] == f"brownian:3;controller:{2 * i};repair:{2 * i}"
        assert float(row["repair_disagreement"]) == pytest.approx(float(np.mean(kept)))
        assert float(row["repair_disagreement"]) >= float(row["repair_disagreement_all"]) > 0
        assert math.isfinite(float(row["repair_reward_gap"]))
        assert int(row["repair_env_steps"]) == int(summary["t0"].sum() + summary["steps"].sum())
        collected = sum(len(storage.load_episode(folder / "series" / f"episode_{i * 1_000_000 + j:06d}.npz",
                                                  "series", keys=("reward",))["reward"]) for j in range(2))
        assert int(row["collect_steps"]) == collected
    steps = [int(row["real_env_steps"]) for row in rows]
    assert steps[1] == steps[0] + sum(int(rows[1][k]) for k in ("collect_steps", "eval_steps", "repair_env_steps",
                                                                  "steering_env_steps"))


def test_repair_episodes_replay_in_the_real_environment(repaired):
    """A repair episode is one real episode: its actions from its seed give back its frames and rewards."""
    from worldmodels import storage

    episode = storage.load_episode(repaired[0] / "iterations" / "iter_002" / "rollouts" / "episode_2500001.npz")
    assert_replays_in_the_real_env(episode, 60, truncation=False)


def test_kill_while_repairing_then_resume_gives_the_same_files_and_row(repaired, smoke_rnn, tmp_path):
    data = data_dir_with(smoke_rnn, tmp_path, *STAGES)
    folder = data / "iterations" / "iter_001"
    cmd = [sys.executable, str(REPO / SCRIPT), "--preset", "smoke", "--data-dir", str(data), *REPAIR,
           "--set", "iterate.iterations=1"]
    run_until_then_kill(cmd, lambda: any((folder / "rollouts").glob("episode_15*.npz")))
    assert not (data / "iterations" / "iterations.csv").exists()
    # Wherever the kill landed after the first window, make it land right after it: the rest is redone.
    for name in ("repair.npz", "rollouts/episode_1500001.npz"):
        (folder / name).unlink(missing_ok=True)
    assert (folder / "rollouts" / "episode_1500000.npz").is_file()
    run_script(SCRIPT, *REPAIR, "--set", "iterate.iterations=1", data_dir=data)
    want = read_csv(repaired[0] / "iterations" / "iterations.csv")[:1]
    assert without_seconds(read_csv(data / "iterations" / "iterations.csv")) == without_seconds(want)
    reference = repaired[0] / "iterations" / "iter_001"
    for name in ["repair.npz"] + [f"rollouts/episode_{1_500_000 + k}.npz" for k in range(2)] + \
            [f"series/episode_{1_500_000 + k}.npz" for k in range(2)]:
        assert (folder / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_finished_iterations_lost_episodes_repair_episodes_included_are_recorded_again_as_they_were(
        repaired, smoke_rnn, tmp_path):
    """After a carry (which leaves the episodes behind), ``iterate.refill_data`` records iteration 1's collected and
    repair episodes again from the saved choice and encodes them: the same files, byte for byte; repair.npz, M and
    the search are not touched. A complete iteration is left alone."""
    import config
    from worldmodels import artifacts, iterate

    data = data_dir_with(smoke_rnn, tmp_path, *STAGES)
    reference = repaired[0] / "iterations"
    shutil.copytree(reference / "iter_001", data / "iterations" / "iter_001",
                    ignore=shutil.ignore_patterns("rollouts", "series"))
    for name in ("config.json", "start.json"):
        shutil.copy(reference / name, data / "iterations" / name)
    kept = snapshot(data / "iterations" / "iter_001")
    cfg = config.make_config("smoke", {"iterate.repair_episodes": 2, "iterate.repair_candidates": 3,
                                       "iterate.repair_horizon": 10})
    vae = artifacts.load_vision(data, cfg)
    assert not iterate.data_complete(cfg, 1, data)
    assert iterate.refill_data(cfg, 1, data, vae)
    assert iterate.data_complete(cfg, 1, data) and not iterate.refill_data(cfg, 1, data, vae)
    for sub in ("rollouts", "series"):
        want = sorted(p.name for p in (reference / "iter_001" / sub).glob("episode_*.npz"))
        assert any(name.startswith("episode_15") for name in want)  # the repair's
        assert sorted(p.name for p in (data / "iterations" / "iter_001" / sub).glob("episode_*.npz")) == want
        for name in want:
            assert (data / "iterations" / "iter_001" / sub / name).read_bytes() == \
                (reference / "iter_001" / sub / name).read_bytes(), f"{sub}/{name}"
    after = snapshot(data / "iterations" / "iter_001")
    assert {name: after[name] for name in kept} == kept


def test_a_folder_without_repair_refuses_it_and_old_configs_match_it_off(tmp_path):
    import config
    from worldmodels import iterate

    assert_old_configs_match_the_option_off(tmp_path, "iterate", ("repair_episodes", "repair_candidates", "repair_horizon"),
                                            iterate.ITERATE_KEYS, {"iterate.repair_episodes": 2})
    with pytest.raises(config.ConfigError, match="repair_candidates"):
        config.make_config("smoke", {"iterate.repair_episodes": 5, "iterate.repair_candidates": 3})


def test_an_ensemble_reads_the_pinned_dream_from_each_ms_own_start_state(recorded):
    """dream_from_starts with further Ms: every M starts at row c's own state (a copy of M never disagrees,
    which fails if the copies start where the dream's random draw put them), M's rewards and z are unchanged,
    and another M's disagreement at each step is the spread of the two predictions from the states reached."""
    from models.controller import num_parameters
    from models.mdn_rnn import MDNRNN
    from worldmodels import dream, repair

    episodes, vae, rnn = recorded
    settings = plan(candidates=3, horizon=6)
    starts = repair.start_states(vae, episodes, [0, 1, 0], [20, 7, 35], 64)
    params = np.random.default_rng(0).normal(size=num_parameters(rnn.z_size, rnn.hidden_units)) * 0.1
    alone = repair.dream_from_starts(rnn, starts, params, settings)
    np.testing.assert_array_equal(alone["disagreement"], np.zeros((3, 6)))
    copy = repair.dream_from_starts(rnn, starts, params, settings, [rnn])
    np.testing.assert_array_equal(copy["disagreement"], np.zeros((3, 6)))
    other = MDNRNN(z_size=rnn.z_size, hidden_units=rnn.hidden_units, seed=11)
    pair = repair.dream_from_starts(rnn, starts, params, settings, [other])
    for key in ("actions", "z", "reward"):
        np.testing.assert_array_equal(pair[key], alone[key], err_msg=key)
    # By hand: each M from its own state after the prefix, fed the dream's z and actions.
    world = repair.PinnedDream(rnn, starts, 1.0, 6, 3, done="off", ensemble=[other])
    z = world.reset(np.array([4, 5, 6]))[0]
    states = [dream.read_prefix(m, starts.prefix_mu, starts.prefix_action, starts.frames) for m in (rnn, other)]
    actions = np.random.default_rng(1).uniform([-1, 0, 0], 1, size=(6, 3, 3)).astype(np.float32)
    for t in range(6):
        means = []
        for i, model in enumerate((rnn, other)):
            out = model.step(z, actions[t], states[i])
            states[i] = tuple(s.numpy() for s in out["state"])
            means.append(dream.mixture_mean(out["log_pi"].numpy(), out["mu"].numpy()))
        z = world.step(actions[t])[0][0]
        np.testing.assert_allclose(world.disagreement, dream.disagreement(means), rtol=1e-4, err_msg=t)
    assert np.all(pair["disagreement"] > 0)
