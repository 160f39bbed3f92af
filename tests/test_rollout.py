"""The environment pool and the shared rollout loop: backends agree, returns are CarRacing's own,
episodes end independently, and C sees M's state from *before* (z_t, a_t)."""

import importlib.util
import os
import signal

import numpy as np
import pytest

from models.controller import controller_actions, flatten, num_parameters
from worldmodels.env import make_env, preprocess, to_env_action
from worldmodels.envpool import BackendUnavailableError, CarRacingPool
from worldmodels.rollout import RealWorld, Rollouts, run_episodes

HIDDEN = 16  # a small M keeps the tests fast; the loop reads the size from the world


@pytest.fixture(scope="module")
def models():
    """Untrained V and M: shapes, order of operations and equivalence do not depend on weights."""
    from models.mdn_rnn import MDNRNN
    from models.vae import ConvVAE

    return ConvVAE(z_size=32, seed=1), MDNRNN(z_size=32, hidden_units=HIDDEN, seed=2)


def random_params(rng, members, scale=0.3):
    return rng.normal(0.0, scale, size=(members, num_parameters(32, HIDDEN)))


def plain_episode(seed, actions, max_steps):
    """CarRacing-v3 as gymnasium runs it: (return, steps, frames uint8 (steps + 1, 64, 64, 3))."""
    env = make_env(max_steps)
    obs, _ = env.reset(seed=int(seed))
    frames, total, steps = [preprocess(obs)], 0.0, 0
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(preprocess(obs))
        total += reward
        steps += 1
        if terminated or truncated:
            break
    env.close()
    return total, steps, np.stack(frames)


# --------------------------------------------------------------------------- the pool


def drive_pool(backend, workers, seeds, actions, max_steps):
    """Step a pool with ``actions`` (T, N, 3); env 1 drops out after 3 steps. Returns everything it saw."""
    with CarRacingPool(len(seeds), max_steps, backend, workers) as pool:
        seen = {"frames": [pool.reset(seeds)], "reward": [], "terminated": [], "truncated": []}
        active = np.ones(len(seeds), bool)
        for t, step_actions in enumerate(actions):
            if t == 3:
                active[1] = False
            frames, reward, terminated, truncated = pool.step(step_actions, active)
            for key, value in zip(("frames", "reward", "terminated", "truncated"),
                                  (frames, reward, terminated, truncated)):
                seen[key].append(value)
            active &= ~(terminated | truncated)
            if not active.any():
                break
        with pytest.raises(ValueError, match="not in an episode"):
            pool.step(step_actions, np.ones(len(seeds), bool))
    return {key: np.stack(value) for key, value in seen.items()}


def test_pool_backends_agree_and_match_plain_gymnasium():
    rng = np.random.default_rng(0)
    seeds = np.array([11, 12, 13])
    max_steps = 8
    actions = rng.uniform([-1, 0, 0], [1, 1, 1], size=(max_steps, len(seeds), 3)).astype(np.float32)
    serial = drive_pool("serial", 0, seeds, actions, max_steps)
    process = drive_pool("process", 2, seeds, actions, max_steps)
    for key in serial:
        np.testing.assert_array_equal(serial[key], process[key], err_msg=key)

    assert serial["frames"].shape == (max_steps + 1, 3, 64, 64, 3) and serial["frames"].dtype == np.uint8
    assert serial["truncated"][-1, [0, 2]].all() and not serial["terminated"].any()
    # The inactive env's rows are zeros / False from the moment it dropped out.
    assert not serial["frames"][4:, 1].any() and not serial["reward"][3:, 1].any()
    assert not serial["truncated"][:, 1].any()
    # And every active env is exactly what a plain gymnasium loop produces.
    for i in (0, 2):
        total, steps, frames = plain_episode(seeds[i], actions[:, i], max_steps)
        assert steps == max_steps
        np.testing.assert_array_equal(serial["frames"][:, i], frames)
        assert sum(serial["reward"][:, i].tolist()) == total  # summed in the same order: exactly equal


def test_a_batch_smaller_than_the_pool_keeps_every_worker_busy_and_gives_the_same_results():
    """Envs are dealt to workers like cards, so the first N envs of a batch (16 evaluation
    tracks in a pool sized for 32 training episodes) are spread over all workers."""
    rng = np.random.default_rng(1)
    seeds = np.array([21, 22, 23])
    max_steps = 5
    actions = rng.uniform([-1, 0, 0], [1, 1, 1], size=(max_steps, len(seeds), 3)).astype(np.float32)
    with CarRacingPool(6, max_steps, "process", workers=2) as pool:
        # 3 of 6 envs: 2 on worker 0 (envs 0, 2) and 1 on worker 1 (env 1), not all 3 on worker 0.
        assert [index.tolist() for _, index in pool._slices(3)] == [[0, 2], [1]]
        frames = [pool.reset(seeds)]
        for step_actions in actions:
            frames.append(pool.step(step_actions)[0])
    for i in range(len(seeds)):
        np.testing.assert_array_equal(np.stack(frames)[:, i], plain_episode(seeds[i], actions[:, i], max_steps)[2])


def test_pool_rejects_bad_inputs():
    with CarRacingPool(2, 5, "serial") as pool:
        with pytest.raises(ValueError, match="reset"):
            pool.step(np.zeros((2, 3)))
        with pytest.raises(ValueError, match="seeds"):
            pool.reset(np.array([1, 2, 3]))
        with pytest.raises(ValueError, match="seeds"):
            pool.reset(np.array([-1]))
        pool.reset(np.array([1]))  # a smaller batch than the pool is allowed
        with pytest.raises(ValueError, match=r"shape \(1, 3\)"):
            pool.step(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="backend"):
        CarRacingPool(2, 5, "threads")
    if importlib.util.find_spec("ray") is None:
        with pytest.raises(BackendUnavailableError, match="pip install"):
            CarRacingPool(2, 5, "ray")
    with pytest.raises(ValueError, match="closed"):
        pool.reset(np.array([1]))


def test_a_dead_worker_is_a_clear_error_and_closes_the_pool():
    pool = CarRacingPool(2, 5, "process", workers=2)
    pool.reset(np.array([1, 2]))
    victim = pool._runners[1].process
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    with pytest.raises(RuntimeError, match="died"):
        pool.step(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="closed"):
        pool.step(np.zeros((2, 3)))


# --------------------------------------------------------------------------- the loop with a scripted world


class ScriptedWorld:
    """A world whose episode with seed s lasts s % 7 + 1 steps and pays steer + s each step.

    Inactive agents get a huge reward and a 'truncated' flag: the loop must ignore both.
    """

    z_size, hidden_size = 2, 3

    def __init__(self, capacity):
        self.capacity = capacity
        self.batches = []

    def reset(self, seeds):
        self.seeds = np.asarray(seeds)
        self.t = np.zeros(len(seeds), int)
        self.batches.append(len(seeds))
        return np.zeros((len(seeds), 2)), np.zeros((len(seeds), 3))

    def step(self, env_actions, active):
        assert env_actions.shape == (len(self.seeds), 3) and active.shape == (len(self.seeds),)
        self.t[active] += 1
        reward = np.where(active, env_actions[:, 0] + self.seeds, 1e9)
        terminated = active & (self.t == self.seeds % 7 + 1)
        z, h = np.zeros((len(self.seeds), 2)), np.zeros((len(self.seeds), 3))
        return (z, h), reward, terminated, ~active


def scripted_params(members):
    """Controllers that ignore their input and steer tanh(b) with a different b per member."""
    n_in = ScriptedWorld.z_size + ScriptedWorld.hidden_size
    bias = np.zeros((members, 3))
    bias[:, 0] = np.linspace(-1.0, 1.0, members)
    return flatten(np.zeros((members, 3, n_in)), bias), np.tanh(bias[:, 0]).astype(np.float32)


def test_episodes_end_independently_and_waves_do_not_change_results():
    params, steer = scripted_params(3)
    seeds = np.array([[3, 8, 20, 1], [5, 6, 13, 2], [0, 9, 4, 27]])
    expected_length = seeds % 7 + 1
    reference = run_episodes(ScriptedWorld(capacity=64), params, seeds, max_steps=100)
    np.testing.assert_array_equal(reference.lengths, expected_length)
    np.testing.assert_allclose(reference.returns, expected_length * (steer[:, None] + seeds))

    # Waves that split members (5 does not divide K = 4) or keep them whole (8), and a
    # world smaller than the population, all give the same episodes.
    for capacity, max_concurrent in ((64, 5), (64, 8), (3, None)):
        world = ScriptedWorld(capacity)
        waved = run_episodes(world, params, seeds, max_steps=100, max_concurrent=max_concurrent)
        np.testing.assert_array_equal(waved.returns, reference.returns)
        np.testing.assert_array_equal(waved.lengths, reference.lengths)
        assert max(world.batches) <= min(capacity, max_concurrent or capacity) and sum(world.batches) == seeds.size

    capped = run_episodes(ScriptedWorld(64), params, seeds, max_steps=3)
    np.testing.assert_array_equal(capped.lengths, np.minimum(expected_length, 3))


def test_the_progress_bar_counts_every_agent_step_and_changes_nothing(monkeypatch):
    import tqdm

    bars = []

    class Recording:
        def __init__(self, total, desc, **kwargs):
            self.total, self.desc, self.n, self.closed = total, desc, 0, False
            bars.append(self)

        def update(self, n):
            assert n >= 0
            self.n += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm, "tqdm", Recording)
    params, _ = scripted_params(3)
    seeds = np.array([[3, 8, 20, 1], [5, 6, 13, 2], [0, 9, 4, 27]])
    for max_steps in (3, 100):  # most episodes cut by this loop (3), or all ended by the world (100)
        plain = run_episodes(ScriptedWorld(64), params, seeds, max_steps=max_steps)
        shown = run_episodes(ScriptedWorld(64), params, seeds, max_steps=max_steps, max_concurrent=5,
                             progress="tracks")
        np.testing.assert_array_equal(shown.returns, plain.returns)
        np.testing.assert_array_equal(shown.lengths, plain.lengths)
        bar = bars[-1]
        assert bar.desc == "tracks" and bar.closed and bar.n == bar.total == seeds.size * max_steps
    assert len(bars) == 2, "no bar unless asked for"


class KilledWorld(ScriptedWorld):
    """A ScriptedWorld that dies (like a SIGKILLed run) when its ``die_at``-th wave starts."""

    def __init__(self, capacity, die_at=None):
        super().__init__(capacity)
        self.die_at = die_at

    def reset(self, seeds):
        if self.die_at is not None and len(self.batches) == self.die_at:
            raise KeyboardInterrupt("killed")
        return super().reset(seeds)


def test_a_killed_evaluation_resumes_at_its_first_unfinished_wave_with_the_same_result(tmp_path):
    from worldmodels.rollout import checkpoint_for

    params, _ = scripted_params(3)
    seeds = np.array([[3, 8, 20, 1], [5, 6, 13, 2], [0, 9, 4, 27]])
    reference = run_episodes(ScriptedWorld(64), params, seeds, max_steps=100, max_concurrent=5)
    log = checkpoint_for(tmp_path / "metrics.json")
    assert log.name == ".metrics.json.partial"
    with pytest.raises(KeyboardInterrupt):
        run_episodes(KilledWorld(64, die_at=2), params, seeds, 100, 5, checkpoint=log)
    assert log.is_file(), "the two finished waves are kept"

    resumed_world = ScriptedWorld(64)
    resumed = run_episodes(resumed_world, params, seeds, 100, 5, checkpoint=log)
    assert resumed_world.batches == [2], "only the last wave (12 episodes in waves of 5) runs again"
    np.testing.assert_array_equal(resumed.returns, reference.returns)
    np.testing.assert_array_equal(resumed.lengths, reference.lengths)

    # The file belongs to these parameters, seeds, steps and waves only: any other run starts over.
    for other in ({"params": params + 0.1}, {"seeds": seeds + 1}, {"max_steps": 99}, {"max_concurrent": 4}):
        args = {"params": params, "seeds": seeds, "max_steps": 100, "max_concurrent": 5, **other}
        world = ScriptedWorld(64)
        fresh = run_episodes(ScriptedWorld(64), **args)
        again = run_episodes(world, **args, checkpoint=log)
        assert sum(world.batches) == seeds.size, f"{other}: a stale checkpoint was used"
        np.testing.assert_array_equal(again.returns, fresh.returns)
    # A damaged file is not an error: the evaluation starts over.
    log.write_text("{ not json")
    world = ScriptedWorld(64)
    run_episodes(world, params, seeds, 100, 5, checkpoint=log)
    assert sum(world.batches) == seeds.size
    # A checkpointed run keeps waves of at most CHECKPOINT_WAVE episodes, however many the world could run at once.
    from worldmodels.rollout import CHECKPOINT_WAVE

    many = np.arange(2 * CHECKPOINT_WAVE + 3).reshape(1, -1)
    world = ScriptedWorld(256)
    waved = run_episodes(world, params[:1], many, 100, checkpoint=tmp_path / ".many.partial")
    assert world.batches == [CHECKPOINT_WAVE, CHECKPOINT_WAVE, 3]
    np.testing.assert_array_equal(waved.returns, run_episodes(ScriptedWorld(256), params[:1], many, 100).returns)
    with pytest.raises(ValueError, match="checkpoint or record_actions"):
        run_episodes(ScriptedWorld(64), params, seeds, 100, checkpoint=log, record_actions=True)


def test_run_episodes_rejects_mismatched_shapes():
    params, _ = scripted_params(2)
    with pytest.raises(ValueError, match="params must have shape"):
        run_episodes(ScriptedWorld(4), params[:, :-1], np.zeros((2, 1), int), 5)
    with pytest.raises(ValueError, match="seeds must be"):
        run_episodes(ScriptedWorld(4), params, np.zeros((3, 1), int), 5)


# --------------------------------------------------------------------------- the real world


def test_returns_equal_a_plain_gymnasium_loop_with_the_same_actions(models):
    """Record the actions the batched loop took, replay them in plain gymnasium, compare exactly."""
    vae, rnn = models
    rng = np.random.default_rng(3)
    params = random_params(rng, 2, scale=1.0)  # large weights: steering, gas and brake all vary
    seeds = rng.integers(0, 2**31, size=(2, 2))
    max_steps = 25
    with CarRacingPool(3, max_steps, "serial") as pool:  # 4 episodes on 3 envs: two waves
        result = run_episodes(RealWorld(pool, vae, rnn), params, seeds, max_steps=1000, record_actions=True)
    assert isinstance(result, Rollouts) and result.returns.shape == (2, 2)
    for p in range(2):
        for k in range(2):
            actions = result.actions[p][k]
            assert actions.shape == (result.lengths[p, k], 3)
            total, steps, _ = plain_episode(seeds[p, k], actions, max_steps)
            assert steps == result.lengths[p, k] == max_steps
            assert result.returns[p, k] == total  # exactly: same rewards summed in the same order
    assert len({float(r) for r in result.returns.ravel()}) > 1


class RecordingPool:
    """A pool that remembers every frame it hands out (to check which frame each z came from)."""

    def __init__(self, pool):
        self.pool, self.frames = pool, []
        self.num_envs = pool.num_envs

    def reset(self, seeds):
        self.frames.append(self.pool.reset(seeds))
        return self.frames[-1]

    def step_async(self, actions, active):
        self.pool.step_async(actions, active)

    def step_wait(self):
        out = self.pool.step_wait()
        self.frames.append(out[0])
        return out


class RecordingWorld:
    """Delegates to a world and records the (z, h) it returned and the actions it was given."""

    def __init__(self, world):
        self.world, self.z, self.h, self.actions = world, [], [], []
        self.capacity, self.z_size, self.hidden_size = world.capacity, world.z_size, world.hidden_size

    def reset(self, seeds):
        z, h = self.world.reset(seeds)
        self.z.append(z)
        self.h.append(h)
        return z, h

    def step(self, env_actions, active):
        self.actions.append(np.array(env_actions))
        (z, h), *rest = self.world.step(env_actions, active)
        self.z.append(z)
        self.h.append(h)
        return (z, h), *rest


def test_controller_sees_the_lstm_state_before_it_is_updated(models):
    vae, rnn = models
    rng = np.random.default_rng(4)
    params = random_params(rng, 1, scale=1.0)
    steps = 6
    with CarRacingPool(2, steps, "serial") as pool:
        recording_pool = RecordingPool(pool)
        world = RecordingWorld(RealWorld(recording_pool, vae, rnn))
        run_episodes(world, params, np.array([[21, 22]]), max_steps=steps)

    # Recompute the paper's order of operations independently, one agent at a time:
    # z_t = V(frame_t), a_t = C(z_t, h_t), then h_{t+1} = M(h_t, z_t, a_t).
    for agent in range(2):
        state = rnn.initial_state(1)
        for t in range(steps):
            frame = recording_pool.frames[t][agent:agent + 1]
            mu, _ = vae.encoder(frame.astype(np.float32) / 255.0, training=False)
            np.testing.assert_allclose(world.z[t][agent], mu.numpy()[0], rtol=1e-5, atol=1e-5)
            h = state[0].numpy()[0]
            np.testing.assert_allclose(world.h[t][agent], h, rtol=1e-5, atol=1e-6)
            expected = to_env_action(controller_actions(params[0], world.z[t][agent:agent + 1], h[None]))[0]
            np.testing.assert_allclose(world.actions[t][agent], expected, rtol=1e-5, atol=1e-6)
            state = rnn.step(world.z[t][agent:agent + 1], world.actions[t][agent:agent + 1], state)["state"]
    assert not np.any(world.h[0]) and np.any(world.h[1]), "h_0 is M's zero state; h_1 has seen (z_0, a_0)"


# --------------------------------------------------------------------------- early stop (patience)


class TileWorld:
    """A world whose agent on track s finds a tile (+1) at each of its first s steps, then only
    pays -0.1 a step (CarRacing without progress) until ``length`` steps, where it terminates."""

    z_size, hidden_size = 2, 3

    def __init__(self, capacity=64, length=1000):
        self.capacity, self.length = capacity, length

    def reset(self, seeds):
        self.seeds, self.t = np.asarray(seeds), np.zeros(len(seeds), int)
        return np.zeros((len(seeds), 2)), np.zeros((len(seeds), 3))

    def step(self, env_actions, active):
        self.t[active] += 1
        reward = np.where(self.t <= self.seeds, 1.0, -0.1)
        terminated = active & (self.t >= self.length)
        return (np.zeros((len(self.seeds), 2)), np.zeros((len(self.seeds), 3))), reward, terminated, ~active


def test_patience_stops_an_episode_and_books_the_remaining_steps_at_minus_0_1():
    params, _ = scripted_params(2)
    seeds = np.array([[0, 3, 40], [7, 1, 2]])
    max_steps, patience = 50, 5
    full = run_episodes(TileWorld(), params, seeds, max_steps)
    stopped = run_episodes(TileWorld(), params, seeds, max_steps, patience=patience)
    assert full.stopped is None and np.all(full.lengths == max_steps)
    # The last tile at step s, then `patience` steps without one: the episode ends at s + patience ...
    expected_length = np.minimum(seeds + patience, max_steps)
    np.testing.assert_array_equal(stopped.lengths, expected_length)
    np.testing.assert_array_equal(stopped.stopped, expected_length < max_steps)
    # ... and is booked as if it had driven on without a tile: here exactly the full episode's return.
    np.testing.assert_allclose(stopped.returns, full.returns, rtol=0, atol=1e-9)
    # A world that ends the episode itself keeps its own ending: no booking, not "stopped".
    short = run_episodes(TileWorld(length=6), params, np.array([[1], [1]]), max_steps, patience=patience)
    np.testing.assert_array_equal(short.lengths, [[6], [6]])
    assert not short.stopped.any()
    with pytest.raises(ValueError, match="patience"):
        run_episodes(TileWorld(), params, seeds, max_steps, patience=0)


def test_evaluations_never_stop_early():
    from worldmodels.rollout import evaluate

    params, _ = scripted_params(1)
    result = evaluate(TileWorld(), params[0], np.array([0, 1, 2]), max_steps=40)
    assert result["lengths"] == [40, 40, 40]  # no positive reward after step 2, yet every episode runs to the end


def test_an_early_stopped_carracing_episode_is_its_recorded_return_plus_minus_0_1_per_remaining_step(models):
    """Replay the driven steps in plain gymnasium: the return is theirs plus -0.1 per step not driven."""
    vae, rnn = models
    rng = np.random.default_rng(5)
    params = random_params(rng, 2, scale=1.0)
    seeds = rng.integers(0, 2**31, size=(2, 1))
    max_steps, patience = 120, 15
    with CarRacingPool(2, max_steps, "serial") as pool:
        result = run_episodes(RealWorld(pool, vae, rnn), params, seeds, max_steps, record_actions=True,
                              patience=patience)
    assert result.stopped.any(), "random controllers stop finding tiles within 120 steps"
    for p in range(2):
        actions = result.actions[p][0]
        total, steps, _ = plain_episode(seeds[p, 0], actions, max_steps)
        assert steps == result.lengths[p, 0] == len(actions)
        booked = -0.1 * (max_steps - steps) if result.stopped[p, 0] else 0.0
        assert result.returns[p, 0] == pytest.approx(total + booked, abs=1e-9)


def test_sampled_z_is_reproducible_per_track_and_drawn_from_the_posterior(models):
    """z_input='sample': z = mu + exp(logvar / 2) * eps with eps fixed by the track seed, whatever
    the wave or position of the episode; z_input='mean' feeds mu."""
    vae, rnn = models
    rng = np.random.default_rng(6)
    params = random_params(rng, 2, scale=1.0)
    seeds = np.array([[31, 32], [32, 33]])  # track 32 driven by both members, in different positions
    with CarRacingPool(4, 8, "serial") as pool:
        sampled = run_episodes(RealWorld(pool, vae, rnn, z_input="sample"), params, seeds, 8)
        waves = run_episodes(RealWorld(pool, vae, rnn, z_input="sample"), params, seeds, 8, max_concurrent=3)
        world = RecordingWorld(RealWorld(RecordingPool(pool), vae, rnn, z_input="sample"))
        run_episodes(world, params[:1], np.array([[32]]), 3)
        again = RecordingWorld(RealWorld(RecordingPool(pool), vae, rnn, z_input="sample"))
        run_episodes(again, params[1:], np.array([[32]]), 3)
    np.testing.assert_array_equal(sampled.returns, waves.returns)
    frame = world.world.pool.frames[0]
    mu, logvar = (x.numpy() for x in vae.encoder(frame.astype(np.float32) / 255.0, training=False))
    eps = np.random.default_rng([32, 0x7A5EED]).standard_normal(32, dtype=np.float32)
    np.testing.assert_allclose(world.z[0][0], mu[0] + np.exp(0.5 * logvar[0]) * eps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(world.z[0], again.z[0])  # the same track: the same first z for any controller
    assert not np.allclose(world.z[0][0], mu[0])
    with pytest.raises(ValueError, match="z_input"):
        RealWorld(pool, vae, rnn, z_input="mode")
