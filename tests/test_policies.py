"""Stage 1's policies: the mix of data.policy, and the expert driver (reads the env, drives laps)."""

import numpy as np
import pytest

import config
from worldmodels import policies
from worldmodels.collect import record_episode
from worldmodels.env import episode_seed, make_env, preprocess


def test_every_configurable_policy_can_be_built():
    """Every policy but the controller is built per episode; the controller is driven by worldmodels.recording."""
    assert set(config.POLICY_NAMES) == set(policies.POLICIES) | {policies.CONTROLLER_POLICY}
    assert policies.CONTROLLER_POLICY not in policies.POLICIES
    with pytest.raises(ValueError, match="worldmodels.recording"):
        record_episode(10, "controller", seed=1)


@pytest.mark.parametrize("spec, mix", [
    ("expert", (("expert", 1.0),)),
    ("expert:0.5,brownian:0.5", (("expert", 0.5), ("brownian", 0.5))),
    (" expert : 0.9 , uniform:0.1", (("expert", 0.9), ("uniform", 0.1))),
])
def test_policy_specs_parse(spec, mix):
    assert config.parse_policy_mix(spec) == mix
    assert config.make_config("smoke", {"data.policy": spec}).data.policy == spec


@pytest.mark.parametrize("spec, message", [
    ("driver", "unknown policy 'driver'"),
    ("expert:0.5,brownian", "needs a fraction in (0, 1]"),
    ("expert:0.5,brownian:half", "needs a fraction in (0, 1]"),
    ("expert:0.6,brownian:0.6", "sum to 1.2, not 1"),
    ("expert:0.5,expert:0.5", "names a policy twice"),
    ("expert:0,brownian:1", "needs a fraction in (0, 1]"),
])
def test_bad_policy_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(config.ConfigError, match="data.policy") as info:
        config.make_config("smoke", {"data.policy": spec})
    assert message in str(info.value)


def test_a_bare_name_drives_every_episode():
    assert {policies.episode_policy("brownian", 0, i) for i in range(50)} == {"brownian"}


def test_a_mix_is_reproducible_per_episode_and_holds_its_fractions():
    spec = "expert:0.7,brownian:0.2,uniform:0.1"
    chosen = [policies.episode_policy(spec, 5, i) for i in range(200)]
    # Each episode's policy is a function of (seed, index) alone, in any order.
    assert chosen[::-1] == [policies.episode_policy(spec, 5, i) for i in reversed(range(200))]
    for n in (20, 200):
        counts = {name: chosen[:n].count(name) for name, _ in config.parse_policy_mix(spec)}
        for name, fraction in config.parse_policy_mix(spec):
            assert abs(counts[name] - fraction * n) <= 2, (n, counts)
    other_seed = [policies.episode_policy(spec, 6, i) for i in range(200)]
    assert other_seed != chosen


def test_expert_episode_is_reproducible_and_replays_exactly():
    """The recorded actions are what the env received, and the expert only read the env: the
    same actions replayed in a fresh env with the same seed give the same frames and rewards."""
    a = record_episode(60, "expert", seed=11)
    b = record_episode(60, "expert", seed=11)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["policy"] == "expert"
    env = make_env(60)
    try:
        env.reset(seed=11)
        for t, action in enumerate(a["action"]):
            obs, reward, term, trunc, _ = env.step(action)
            assert reward == a["reward"][t] and term == a["terminated"][t] and trunc == a["truncated"][t]
            if t + 1 < len(a["obs"]):
                np.testing.assert_array_equal(preprocess(obs), a["obs"][t + 1], err_msg=f"step {t}")
    finally:
        env.close()


def test_expert_noise_changes_its_actions_and_zero_noise_draws_nothing():
    clean = record_episode(60, "expert", 11, config.DataConfig(expert_noise=0.0))
    noisy = record_episode(60, "expert", 11, config.DataConfig(expert_noise=1.0))
    assert not np.array_equal(clean["action"], noisy["action"])
    env = make_env(10)
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    expert = policies.ExpertPolicy(rng, env.unwrapped, noise=0.0)
    state = rng.bit_generator.state
    for _ in range(10):
        env.step(expert())
    assert rng.bit_generator.state == state
    env.close()


def test_expert_without_noise_finishes_a_lap():
    """A fast check of what benchmarks/bench_expert.py measures on 20 tracks: a clean lap."""
    seed = episode_seed(0, 0)
    ep = record_episode(1000, "expert", seed, config.DataConfig(expert_noise=0.0))
    tile_rewards = (ep["reward"] > 0).sum()
    assert ep["terminated"][-1] and not ep["truncated"].any(), "the lap should end before the time limit"
    assert ep["reward"][-1] > -100, "it should finish the lap, not leave the playfield"
    assert tile_rewards > 200

    # evaluate_controller.py --profile: a replay of the recorded actions reads the lap, tiles and speed.
    from worldmodels.driving import profile_episode, profile_summary

    lap = profile_episode(seed, ep["action"], 1000)
    assert lap["return"] == pytest.approx(float(np.sum(ep["reward"], dtype=np.float64)))
    assert lap["finished_step"] == len(ep["action"])
    assert lap["tiles"] >= 0.95 * lap["track_tiles"]  # CarRacing-v3 ends a lap at 95% of its tiles
    assert lap["mean_speed"] > 20 and lap["off_road"] < 0.1 and 0 < lap["mean_gas"] <= 1
    # Standing still for 50 steps: no speed, no gas, no tile beyond the start, no lap.
    assert 0 <= lap["off_road_fast"] <= lap["off_road"] and not lap["left_playfield"]
    still = profile_episode(seed, np.zeros((50, 3), np.float32), 1000)
    assert still["finished_step"] is None and still["mean_speed"] < 1e-3 and still["mean_gas"] == 0
    assert (still["off_road"], still["off_road_fast"], still["excursions"], still["left_playfield"]) == (0, 0, 0, False)
    assert still["return"] == pytest.approx(still["tiles"] * 1000 / still["track_tiles"] - 0.1 * 50)
    summary = profile_summary([lap, still])
    assert summary["laps_finished"] == 1 and summary["mean_finished_step"] == lap["finished_step"]
    assert summary["mean_tile_share"] == pytest.approx((lap["tiles"] + still["tiles"]) / 2 / lap["track_tiles"])


def test_expert_refuses_an_env_without_a_track():
    class NoTrack:
        track = []

    with pytest.raises(ValueError, match="reset CarRacing env"):
        policies.ExpertPolicy(np.random.default_rng(0), NoTrack())
    with pytest.raises(ValueError, match="noise scale must be >= 0"):
        policies.ExpertPolicy(np.random.default_rng(0), NoTrack(), noise=-1)



def test_recorded_episodes_are_profiled_per_policy_by_an_exact_replay(smoke_rollouts, tmp_path):
    """python -m worldmodels.metrics driving: every recorded episode replays to its recorded return."""
    from worldmodels import driving, metrics, storage

    folder = smoke_rollouts / "rollouts"
    paths = storage.list_episodes(folder, "rollouts")
    found = driving.profile_rollouts([folder], per_policy=2)
    assert list(found) == ["brownian"] and found["brownian"]["episodes"] == min(2, len(paths))
    row = found["brownian"]
    assert row["replays_mismatched"] == 0
    lengths = [len(storage.load_episode(p, keys=("reward",))["reward"]) for p in paths[:2]]
    assert row["steps"] == sum(lengths) and row["files"] == [str(p) for p in paths[:2]]
    returns = [float(np.sum(storage.load_episode(p, keys=("reward",))["reward"], dtype=np.float64)) for p in paths[:2]]
    assert row["return_mean"] == pytest.approx(np.mean(returns))
    assert 0 <= row["mean_off_road_fast"] <= row["mean_off_road"] <= 1 and row["laps_finished"] == 0
    out = tmp_path / "driving.json"
    assert metrics.main(["driving", str(folder), "--per-policy", "1", "--out", str(out)]) == 0
    assert storage.read_json(out)["policies"]["brownian"]["episodes"] == 1
    with pytest.raises(ValueError, match="per_policy"):
        driving.profile_rollouts([folder], per_policy=0)
