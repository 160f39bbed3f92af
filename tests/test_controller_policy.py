"""Stage 1's ``controller`` policy: a trained C with V and M in the loop, mixed with the blind policies."""

from __future__ import annotations

import numpy as np
import pytest

import config
from tests.conftest import (ActionLog, assert_replays_in_the_real_env, assert_user_error, data_dir_with,
                            noisy_actions, run_script)
from worldmodels import policies, recording, storage

MIX = "controller:0.5,brownian:0.5"
EPISODES = 4


def write_controller(folder, seed: int = 0):
    """A controller.npz with random parameters of the smoke preset's shape (C need not be good to drive)."""
    from models.controller import num_parameters

    cfg = config.make_config("smoke")
    params = np.random.default_rng(seed).normal(0.0, 0.5, num_parameters(cfg.vae.z_size, cfg.rnn.hidden_units))
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "controller.npz", params=params)
    return params


def load_all(folder):
    return {p.name: storage.load_episode(p) for p in storage.list_episodes(folder)}


@pytest.fixture(scope="module")
def mixed(smoke_rnn, tmp_path_factory):
    """A data dir with V, M and a controller, whose stage 1 ran ``controller:0.5,brownian:0.5``."""
    data = data_dir_with(smoke_rnn, tmp_path_factory.mktemp("controller_policy"), "vae", "rnn")
    write_controller(data / "controller")
    proc = run_script("01_generate_data.py", "--set", f"data.policy={MIX}", "--set", f"data.episodes={EPISODES}",
                      data_dir=data)
    return data, proc


def test_a_mix_with_the_controller_records_each_episode_with_its_policy(mixed):
    data, proc = mixed
    episodes = load_all(data / "rollouts")
    assert sorted(episodes) == [storage.episode_name(i) for i in range(EPISODES)]
    chosen = [policies.episode_policy(MIX, 0, i) for i in range(EPISODES)]
    assert set(chosen) == {"controller", "brownian"}
    for i, policy in enumerate(chosen):
        episode = episodes[storage.episode_name(i)]
        assert str(episode["policy"]) == policy
        assert len(episode["obs"]) == len(episode["action"]) == 60
    assert "driving" in proc.stdout and "controller" in proc.stdout
    # The controller's episodes drive on the tracks any policy would get for that index.
    from worldmodels.env import episode_seed

    assert [int(episodes[storage.episode_name(i)]["seed"]) for i in range(EPISODES)] == \
        [episode_seed(0, i) for i in range(EPISODES)]


def test_controller_episodes_replay_in_the_real_environment(mixed):
    """The recorded frames, actions and rewards of a controller episode are one real episode."""
    data, _ = mixed
    index = [i for i in range(EPISODES) if policies.episode_policy(MIX, 0, i) == "controller"][0]
    episode = storage.load_episode(data / "rollouts" / storage.episode_name(index))
    assert_replays_in_the_real_env(episode, len(episode["action"]), truncation=False)
    assert np.std(episode["action"][:, 0]) > 0  # C's steering plus noise, not a constant


def test_a_lost_episode_of_each_policy_is_recorded_again_identically(mixed, tmp_path):
    import shutil

    data, _ = mixed
    copy = data_dir_with(data, tmp_path, "vae", "rnn", "controller")
    shutil.copytree(data / "rollouts", copy / "rollouts")
    for i in range(EPISODES):
        if i in (0, 2, 3):  # both policies lose an episode
            (copy / "rollouts" / storage.episode_name(i)).unlink()
    assert {policies.episode_policy(MIX, 0, i) for i in (0, 2, 3)} == {"controller", "brownian"}
    proc = run_script("01_generate_data.py", "--set", f"data.policy={MIX}", "--set", f"data.episodes={EPISODES}",
                      data_dir=copy)
    assert f"{EPISODES - 3} of {EPISODES} episodes already complete" in proc.stdout
    got, want = load_all(copy / "rollouts"), load_all(data / "rollouts")
    assert sorted(got) == sorted(want)
    for name in want:
        for key in want[name]:
            np.testing.assert_array_equal(got[name][key], want[name][key], err_msg=f"{name} {key}")


def test_the_controller_tag_survives_encoding(mixed, tmp_path):
    data, _ = mixed
    copy = data_dir_with(data, tmp_path, "vae", "rnn", "rollouts")
    run_script("03_generate_rnn_data.py", "--set", f"data.policy={MIX}", "--set", f"data.episodes={EPISODES}",
               data_dir=copy)
    for i in range(EPISODES):
        series = storage.load_episode(copy / "series" / storage.episode_name(i), "series", keys=("policy",))
        assert str(series["policy"]) == policies.episode_policy(MIX, 0, i)


def test_a_missing_controller_is_a_one_line_error(smoke_rnn, tmp_path):
    data = data_dir_with(smoke_rnn, tmp_path, "vae", "rnn")
    proc = run_script("01_generate_data.py", "--set", "data.policy=controller:0.9,brownian:0.1", data_dir=data,
                      check=False)
    assert_user_error(proc, str(data / "controller" / "controller.npz"), "05_train_controller.py",
                      "data.controller")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_controller_source_finds_m_beside_the_controller_and_v_above(tmp_path):
    """An iteration's controller (iterations/iter_<iii>/controller) is driven with that iteration's M and
    the data dir's V; a plain data dir's with its own V and M."""
    cfg = config.make_config("smoke")
    for folder in ("vae", "rnn", "controller", "iterations/iter_002/rnn", "iterations/iter_002/controller"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("vae/vae.keras", "rnn/rnn.keras", "controller/controller.npz", "iterations/iter_002/rnn/rnn.keras",
                 "iterations/iter_002/controller/controller.npz"):
        (tmp_path / name).write_bytes(b"")
    assert recording.controller_source(cfg, tmp_path) == (tmp_path / "controller" / "controller.npz", tmp_path,
                                                          tmp_path)
    other = config.apply_overrides(cfg, {"data.controller": str(tmp_path / "iterations" / "iter_002" / "controller")})
    iteration = tmp_path / "iterations" / "iter_002"
    assert recording.controller_source(other, "elsewhere") == (iteration / "controller" / "controller.npz",
                                                               tmp_path, iteration)
    (iteration / "rnn" / "rnn.keras").unlink()
    with pytest.raises(storage.MissingDataError, match="rnn.keras"):
        recording.controller_source(other, "elsewhere")


def test_only_a_mix_with_the_controller_depends_on_what_c_sees():
    plain = config.make_config("smoke", {"data.policy": "brownian"})
    mixed = config.make_config("smoke", {"data.policy": MIX})
    assert "env.observation" not in recording.rollout_keys(plain)
    assert {"controller.z_input", "env.observation", "data.controller"} <= set(recording.rollout_keys(mixed))
    assert recording.controller_episodes(mixed) == [i for i in range(3) if policies.episode_policy(MIX, 0, i)
                                                    == "controller"]


def test_a_rollouts_folder_of_the_controller_refuses_another_z_input(mixed):
    """What C saw of V made its episodes: continuing them with controller.z_input=mean would mix two data sets."""
    data, _ = mixed
    proc = run_script("01_generate_data.py", "--set", f"data.policy={MIX}", "--set", f"data.episodes={EPISODES}",
                      "--set", "controller.z_input=mean", data_dir=data, check=False)
    assert_user_error(proc, "controller.z_input")


def test_steering_lapses_hold_a_random_steer_and_leave_everything_else_as_without_them():
    seeds, steps, wanted = [11, 22, 33], 4000, (0.3, 0.5, 0.1)
    # (steps, B, 3): the actions applied, C always asking for ``wanted``, noise 0.1.
    plain = noisy_actions(seeds, 0.1, steps, wanted).swapaxes(0, 1)
    lapsed = noisy_actions(seeds, 0.1, steps, wanted, lapses=0.02, lapse_steps=10.0).swapaxes(0, 1)
    np.testing.assert_array_equal(lapsed[:, :, 1:], plain[:, :, 1:])  # gas and brake: C's plus the same noise
    changed = lapsed[:, :, 0] != plain[:, :, 0]
    off = noisy_actions(seeds, 0.1, steps, wanted, lapses=0.0).swapaxes(0, 1)
    np.testing.assert_array_equal(off, plain)  # off = exactly as before
    for agent in range(len(seeds)):
        steer, mask = lapsed[:, agent, 0], changed[:, agent]
        # A lapse holds one value in [-1, 1]: the lapse steps split into runs of one value (a lapse may follow
        # another at once), 10 steps long on average, and about 0.2 / 1.2 of the steps are lapses (one starts
        # with chance 0.02 a step outside one).
        held = np.where(mask, steer, np.nan)
        boundaries = np.flatnonzero(np.r_[True, held[1:] != held[:-1]])  # nan != nan: steps outside split too
        runs = [(a, b) for a, b in zip(boundaries, np.r_[boundaries[1:], steps]) if mask[a]]
        assert len(runs) > 30 and all(-1.0 <= steer[a] <= 1.0 for a, _ in runs)
        assert 6.0 < np.mean([b - a for a, b in runs]) < 14.0
        assert 0.10 < mask.mean() < 0.24, mask.mean()
    # An episode's lapses come from its track seed alone, whatever else runs beside it.
    alone = noisy_actions([22], 0.1, steps, wanted, lapses=0.02, lapse_steps=10.0)
    np.testing.assert_array_equal(alone[0], lapsed[:, 1])
    with pytest.raises(ValueError, match="steering lapses"):
        recording.NoisyWorld(ActionLog(), 0.1, lapses=1.0)
    with pytest.raises(config.ConfigError, match="data.controller_steer_lapses"):
        config.make_config("smoke", {"data.controller_steer_lapses": -0.1})
    with pytest.raises(config.ConfigError, match="data.controller_steer_lapse_steps"):
        config.make_config("smoke", {"data.controller_steer_lapse_steps": 0.5})


def test_a_rollouts_folder_of_the_controller_refuses_other_steering_lapses(mixed):
    data, _ = mixed
    proc = run_script("01_generate_data.py", "--set", f"data.policy={MIX}", "--set", f"data.episodes={EPISODES}",
                      "--set", "data.controller_steer_lapses=0.02", data_dir=data, check=False)
    assert_user_error(proc, "data.controller_steer_lapses")
