"""worldmodels/fast_render.py: the 64x64 observation drawn directly (``make_env(observation="fast")``).

The fast frame must look like the stock one (gymnasium's 96x96 state through ``preprocess``) and
must change nothing but the drawing: physics and rewards stay bit-identical.
"""

import numpy as np
import pytest

import config
from tests.conftest import assert_user_error, run_script
from worldmodels import env as wenv
from worldmodels import fast_render

# Measured by benchmarks/parity_fast_obs.py (6 seeds x 300 steps): mean |difference| 0.10 levels,
# 99th percentile 3 levels. The bounds leave room for other tracks, not for a misplaced scene: a
# camera off by one 64-pixel gives a mean near 10, a wrong colour or a missing element more.
MEAN_BOUND = 0.25
P99_BOUND = 8.0
MASK_AGREEMENT = 0.99


def _states(seeds, steps):
    """(fast, stock) uint8 (N, 64, 64, 3) and the step of each (N,) over every state of Brownian
    episodes, the zoom-in included: the fast frame is drawn from the very state the stock env drew."""
    env = wenv.make_env(steps)
    fast, stock, times = [], [], []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        policy = wenv.BrownianPolicy(np.random.default_rng(seed))
        for t in range(steps):
            times.append(t)
            stock.append(wenv.preprocess(obs))
            fast.append(fast_render.render_observation(env.unwrapped))
            obs, _, terminated, truncated, _ = env.step(policy())
            if terminated or truncated:
                break
    env.close()
    return np.stack(fast), np.stack(stock), np.array(times)


@pytest.fixture(scope="module")
def frames():
    return _states(seeds=[11, 12, 13], steps=100)


@pytest.fixture(scope="module")
def measured(frames):
    fast, stock, _ = frames
    return fast_render.parity(fast, stock)


def test_fast_observation_has_the_stock_frames_shape_dtype_and_range():
    env = wenv.make_env(30, observation="fast")
    obs, _ = env.reset(seed=1)
    for _ in range(5):
        obs, *_ = env.step(np.array([0.0, 1.0, 0.0], np.float32))
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert env.observation_space.contains(obs)
    assert obs.min() < 110 and obs.max() > 200  # road grey and grass green, not a blank frame
    assert wenv.preprocess(obs) is obs  # already what the agent sees
    env.close()


def test_fast_frames_match_stock_frames_over_a_few_hundred_states(frames, measured):
    fast, stock, times = frames
    assert len(fast) >= 300
    result = measured
    assert result["mean"] < MEAN_BOUND, result
    assert result["p99"] <= P99_BOUND, result
    # The zoom-in (first 50 steps of each episode) shows the whole track small: bound it on its own.
    zoom_in = times < 50
    assert zoom_in.sum() >= 100
    assert fast_render.parity(fast[zoom_in], stock[zoom_in])["mean"] < 2 * MEAN_BOUND


def test_road_grass_car_and_kerbs_are_where_the_stock_frame_has_them(measured):
    classes = measured["classes"]
    for name, row in classes.items():
        assert row["agreement"] >= MASK_AGREEMENT, (name, row)
    assert classes["road"]["share_of_pixels"] > 0.05 and classes["car"]["share_of_pixels"] > 0.001


def test_parity_would_catch_a_shifted_camera(frames):
    """The bounds are not vacuous: the same frames one pixel apart already break them."""
    fast, stock, _ = frames
    assert np.abs(np.roll(fast, 1, axis=2).astype(np.int16) - stock).mean() > MEAN_BOUND


def _trajectory(observation: str, seed: int, steps: int) -> list[tuple]:
    """(reward, terminated, truncated, car x, car y, car angle, tiles visited) of every step of a
    Brownian episode on a ``make_env(observation=...)`` env."""
    env = wenv.make_env(steps, observation=observation)
    env.reset(seed=seed)
    policy = wenv.BrownianPolicy(np.random.default_rng(seed))
    rows = []
    for _ in range(steps):
        _, reward, terminated, truncated, _ = env.step(policy())
        hull = env.unwrapped.car.hull
        rows.append((reward, terminated, truncated, *hull.position, hull.angle, env.unwrapped.tile_visited_count))
        if terminated or truncated:
            break
    env.close()
    return rows


@pytest.mark.parametrize("seed", [5, 6])
def test_physics_and_rewards_are_bit_identical_to_the_stock_env(seed):
    fast, stock = _trajectory("fast", seed, 120), _trajectory("stock", seed, 120)
    assert fast == stock
    assert sum(row[0] > 0 for row in stock) >= 3  # new tiles were reached, so tile rewards were compared too


def test_switching_back_to_stock_draws_gymnasiums_exact_frames():
    """Stage 5 trains on the fast frame and scores its final controller on the stock one, in the same envs."""
    switched, stock = wenv.make_env(40, observation="fast"), wenv.make_env(40)
    wenv.set_observation(switched, "stock")
    assert switched.observation_space == stock.observation_space
    a, _ = switched.reset(seed=2)
    b, _ = stock.reset(seed=2)
    for _ in range(10):
        np.testing.assert_array_equal(a, b)
        action = np.array([0.1, 0.5, 0.0], np.float32)
        a, *_ = switched.step(action)
        b, *_ = stock.step(action)
    wenv.set_observation(switched, "fast")
    assert switched.step(action)[0].shape == (64, 64, 3)
    switched.close()
    stock.close()


def test_full_size_video_frames_stay_gymnasiums():
    env = wenv.make_env(10, render_mode="rgb_array", observation="fast")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and env.render().shape == (400, 600, 3)
    env.close()


def test_unknown_observation_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of stock, fast"):
        wenv.make_env(10, observation="tiny")


def test_pool_builds_fast_envs_and_switches_them():
    from worldmodels.envpool import CarRacingPool

    with CarRacingPool(2, 20, "serial", observation="fast") as fast, CarRacingPool(2, 20, "serial") as stock:
        seeds = np.array([3, 4])
        frames_fast, frames_stock = fast.reset(seeds), stock.reset(seeds)
        actions = np.tile(np.array([0.0, 0.8, 0.0], np.float32), (2, 1))
        for _ in range(5):
            step_fast, step_stock = fast.step(actions), stock.step(actions)
            np.testing.assert_array_equal(step_fast[1], step_stock[1])  # rewards
        assert fast_render.parity(step_fast[0], step_stock[0])["mean"] < 4 * MEAN_BOUND
        fast.set_observation("stock")
        np.testing.assert_array_equal(fast.reset(seeds), stock.reset(seeds))
    assert frames_fast.shape == frames_stock.shape


def test_evaluation_never_writes_the_reported_score_from_fast_frames(tmp_path):
    """controller/metrics.json is the reported score: a fast-frame score must go to another file."""
    proc = run_script("evaluate_controller.py", "--set", "env.observation=fast", "--replace-metrics",
                      data_dir=tmp_path, check=False)
    assert_user_error(proc, "metrics.json", "stock observation", "--replace-metrics")


def test_a_fast_search_trains_on_fast_frames_and_evaluates_on_stock_ones():
    """Stage 5 with env.observation=fast: members drive a fast pool, every evaluation a stock pool of its own."""
    from worldmodels.controller_training import _open_pools, training_observation

    fast_cfg = config.make_config("smoke", {"env.observation": "fast", "controller.backend": "serial"})
    assert training_observation(fast_cfg) == "fast"
    with _open_pools(fast_cfg, 2, max_concurrent=4) as (train_pool, eval_pool):
        assert train_pool is not eval_pool
        assert (train_pool.observation, eval_pool.observation) == ("fast", "stock")
        assert train_pool.reset([1, 2]).shape == eval_pool.reset([1, 2]).shape == (2, 64, 64, 3)
    stock_cfg = config.make_config("smoke", {"controller.backend": "serial"})
    with _open_pools(stock_cfg, 2, max_concurrent=4) as (train_pool, eval_pool):
        assert train_pool is eval_pool and eval_pool.observation == "stock"


@pytest.mark.parametrize("saved", [True, False])
def test_a_score_is_on_stock_pixels_unless_set_even_when_the_preset_says_fast(tmp_path, saved):
    """The `cpu` preset trains on fast frames; evaluating a controller with it (its saved config, or
    --preset cpu for a controller file without one) still scores on stock pixels, unless --set says fast."""
    from worldmodels import artifacts
    from worldmodels.controller_evaluation import resolve_config

    if saved:
        config.save_config(config.make_config("cpu"), tmp_path, artifacts.CONFIG_FILE)
    preset = None if saved else "cpu"
    assert resolve_config(tmp_path, preset, []).env.observation == "stock"
    assert resolve_config(tmp_path, preset, []).controller.population == 32  # the rest is the cpu preset's
    assert resolve_config(tmp_path, preset, ["env.observation=fast"]).env.observation == "fast"
