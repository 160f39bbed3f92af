"""worldmodels/env.py: frame preprocessing, the action map, exploration policies, determinism."""

import numpy as np
import pytest

from worldmodels import env as wenv
from worldmodels.collect import record_episode


def test_preprocess_shape_dtype_and_crop():
    frame = np.zeros((96, 96, 3), np.uint8)
    frame[84:] = 255  # the dashboard must be cropped away entirely
    out = wenv.preprocess(frame)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out.max() == 0


def test_preprocess_keeps_content_and_batches():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    frames[:, :84] = 200
    out = wenv.preprocess(frames)
    assert out.shape == (5, 64, 64, 3)
    assert np.all(out == 200)
    np.testing.assert_array_equal(out[2], wenv.preprocess(frames[2]))


@pytest.mark.parametrize("bad", [np.zeros((70, 96, 3), np.uint8), np.zeros((96, 96), np.uint8),
                                 np.zeros((96, 96, 3), np.float32)])
def test_preprocess_rejects_bad_frames(bad):
    with pytest.raises(ValueError, match="expected"):
        wenv.preprocess(bad)


def test_action_map():
    a = np.array([[-0.5, -1.0, -0.7], [0.3, 1.0, 0.4], [1.0, 0.0, 0.0]], np.float32)
    out = wenv.to_env_action(a)
    np.testing.assert_allclose(out[:, 0], [-0.5, 0.3, 1.0])
    np.testing.assert_allclose(out[:, 1], [0.0, 1.0, 0.5])
    # Brake is 0 for every non-positive output: the (a+1)/2 bug would brake 15% here.
    np.testing.assert_allclose(out[:, 2], [0.0, 0.4, 0.0])


def test_action_map_stays_in_the_action_box():
    out = wenv.to_env_action(np.random.default_rng(1).normal(0, 3, (1000, 3)))
    assert np.all(out >= wenv.ACTION_LOW) and np.all(out <= wenv.ACTION_HIGH)


def test_action_map_rejects_wrong_width():
    with pytest.raises(ValueError, match="steer, gas, brake"):
        wenv.to_env_action(np.zeros(4))


def test_brownian_policy_is_correlated_drives_forward_and_rarely_brakes():
    policy = wenv.BrownianPolicy(np.random.default_rng(0))
    actions = np.array([policy() for _ in range(5000)])
    assert np.all(actions >= wenv.ACTION_LOW) and np.all(actions <= wenv.ACTION_HIGH)
    steer = actions[:, 0]
    assert np.corrcoef(steer[:-1], steer[1:])[0, 1] > 0.8          # temporally correlated
    assert (steer > 0.3).mean() > 0.1 and (steer < -0.3).mean() > 0.1  # turns both ways
    assert actions[:, 1].mean() > 0.5                                # mostly accelerating
    assert 0.01 < (actions[:, 2] > 0).mean() < 0.25                  # brakes now and then


def test_episode_seeds_are_distinct_and_stable():
    seeds = [wenv.episode_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000
    assert seeds == [wenv.episode_seed(0, i) for i in range(1000)]
    assert wenv.episode_seed(1, 0) != seeds[0]


def test_same_seed_gives_identical_frames():
    a = record_episode(40, "brownian", seed=123)
    b = record_episode(40, "brownian", seed=123)
    c = record_episode(40, "brownian", seed=124)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["obs"], c["obs"])


def test_recorded_episode_layout():
    ep = record_episode(30, "uniform", seed=7)
    assert ep["obs"].shape == (30, 64, 64, 3) and ep["obs"].dtype == np.uint8
    assert ep["action"].shape == (30, 3) and ep["reward"].shape == (30,)
    assert ep["truncated"][-1] and not ep["truncated"][:-1].any()
    # CarRacing pays -0.1 a frame plus 1000/N per new tile.
    assert np.all(ep["reward"] >= -0.1 - 1e-5)


@pytest.mark.parametrize("seed", [3, 4])
def test_culled_drawing_gives_exactly_the_stock_environments_pixels_and_rewards(seed):
    """make_env skips off-screen polygons before gymnasium's own drawing code; the observations
    (zoom-in, driving along and off the track, tiles changing colour when visited) and rewards
    must be bit-identical to gymnasium's CarRacing-v3."""
    import gymnasium as gym

    fast = wenv.make_env(300)
    stock = gym.make(wenv.ENV_ID, continuous=True, max_episode_steps=300)
    assert fast.unwrapped._render_road.__func__ is wenv.render_road_culled
    assert not hasattr(stock.unwrapped._render_road, "__func__") or \
        stock.unwrapped._render_road.__func__ is not wenv.render_road_culled
    a, _ = fast.reset(seed=seed)
    b, _ = stock.reset(seed=seed)
    np.testing.assert_array_equal(a, b)
    policy = wenv.BrownianPolicy(np.random.default_rng(seed))
    tiles = 0
    for t in range(300):
        action = policy()
        a, ra, ta, ua, _ = fast.step(action)
        b, rb, tb, ub, _ = stock.step(action)
        np.testing.assert_array_equal(a, b, err_msg=f"step {t}")
        assert (ra, ta, ua) == (rb, tb, ub)
        tiles += ra > 0
        if ta or ua:
            break
    assert tiles > 5  # the car did visit tiles, so their colour change was drawn too
    fast.close()
    stock.close()
