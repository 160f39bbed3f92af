"""The dream (worldmodels/dream.py) and C trained in it: gymnasium's checker, batched = single, the
temperature, starts from real frames, step limit and done head, 05 --env dream with resume,
the temperature study and the dream notebook."""

import json
import math

import numpy as np
import pytest
import tensorflow as tf
from gymnasium.utils.env_checker import check_env

import config
from models.controller import controller_actions, num_parameters
from models.mdn_rnn import MDNRNN, sample_mixture
from tests.conftest import (REPO, check_notebook, data_dir_with, kill_then_resume_controller, load_npz, read_csv,
                            run_script)
from worldmodels import storage
from worldmodels.dream import (
    KEY_BOUND,
    DreamCarRacing,
    DreamVectorEnv,
    DreamWorld,
    StartStates,
    load_branch_starts,
    load_start_states,
    start_states_for,
)
from worldmodels.env import to_env_action
from worldmodels.rollout import FINAL_EVAL_SEED_OFFSET, heldout_seeds, run_episodes

SMOKE = config.make_config("smoke")
Z, HIDDEN = 32, 16  # a small M keeps the unit tests fast; check_env uses the paper's sizes


def small_model(seed=0, **kwargs):
    return MDNRNN(z_size=Z, hidden_units=HIDDEN, seed=seed, **kwargs)


def set_dense(model, name, bias, kernel=0.0):
    """Make head ``name`` of M output a constant: kernel ``kernel`` everywhere, the given bias."""
    layer = model.net.get_layer(name)
    weight, old_bias = layer.get_weights()
    layer.set_weights([np.full_like(weight, kernel), np.broadcast_to(np.asarray(bias, np.float32), old_bias.shape)])


def done_logit(p):
    return math.log(p / (1.0 - p))


def random_starts(rng, count=6, logvar=-2.0):
    return StartStates(rng.normal(size=(count, Z)).astype(np.float32), np.full((count, Z), logvar, np.float32),
                       tuple(f"episode_{i:06d}.npz" for i in range(count)), np.zeros(count, np.int64))


def write_series(folder, lengths, rng, logvar=-4.0):
    """Synthetic latent series files; frame t of episode e has mu = e + t / 1000 + small noise."""
    folder.mkdir(parents=True, exist_ok=True)
    for e, length in enumerate(lengths):
        mu = (e + np.arange(length)[:, None] / 1000.0 + 1e-3 * rng.normal(size=(length, Z))).astype(np.float32)
        storage.save_episode(folder / storage.episode_name(e), {
            "mu": mu, "logvar": np.full((length, Z), logvar, np.float32),
            "action": rng.uniform(0, 1, size=(length, 3)).astype(np.float32),
            "reward": rng.normal(size=length).astype(np.float32), "done": np.zeros(length, bool),
            "seed": np.int64(e)}, kind="series")


# --------------------------------------------------------------------------- the environment


# The observation space is unbounded on purpose (z and h have no fixed range); the checker warns about it.
@pytest.mark.filterwarnings("ignore:.*observation space (minimum|maximum) value is")
def test_check_env_passes_with_the_papers_spaces():
    rng = np.random.default_rng(0)
    env = DreamCarRacing(MDNRNN(seed=0), random_starts(rng), temperature=1.15, max_steps=20)
    assert env.observation_space.shape == (288,) and env.observation_space.dtype == np.float32
    np.testing.assert_array_equal(env.action_space.low, [-1, 0, 0])
    np.testing.assert_array_equal(env.action_space.high, [1, 1, 1])
    check_env(env, skip_render_check=True)
    obs, info = env.reset(seed=3)
    assert obs.shape == (288,) and not obs[32:].any(), "h_0 is M's zero state"
    assert info["episode"] in env.world.starts.episodes


def test_batched_dream_equals_single_dreams():
    """DreamWorld (B rows, ragged endings), DreamVectorEnv (autoreset) and DreamCarRacing agree."""
    rng = np.random.default_rng(1)
    model = small_model(seed=1, dropout=0.2)  # dropout: each episode has its own mask
    set_dense(model, "done", done_logit(0.08), kernel=0.0)  # episodes end at different steps
    starts = random_starts(rng)
    params = rng.normal(0, 0.5, size=(3, num_parameters(Z, HIDDEN)))
    seeds = np.array([[7, 8], [7, 123], [40, 8]])  # repeated seeds: shared noise rows in one batch
    max_steps, tau = 25, 1.3

    world = DreamWorld(model, starts, tau, max_steps, capacity=6)
    batched = run_episodes(world, params, seeds, max_steps, record_actions=True)
    assert len(set(batched.lengths.ravel().tolist())) > 1, "episodes should end at different steps"
    assert (batched.lengths < max_steps).any() and (batched.lengths == max_steps).any()

    single = DreamCarRacing(model, starts, tau, max_steps)
    for p in range(3):
        for k in range(2):
            obs, _ = single.reset(seed=int(seeds[p, k]))
            total, steps, done = 0.0, 0, False
            while not done:
                action = to_env_action(controller_actions(params[p], obs[None, :Z], obs[None, Z:]))[0]
                np.testing.assert_allclose(action, batched.actions[p][k][steps], rtol=1e-4, atol=1e-5)
                obs, reward, terminated, truncated, _ = single.step(action)
                total, steps, done = total + reward, steps + 1, terminated or truncated
            assert steps == batched.lengths[p, k]
            assert total == pytest.approx(batched.returns[p, k], rel=1e-4, abs=1e-4)

    # The vector env: sub-env i is seeded s + i and dreams, across autoresets, what a single
    # env dreams when reset with s + i and then without a seed.
    vector = DreamVectorEnv(model, starts, 3, tau, max_steps=6)
    obs, _ = vector.reset(seed=50)
    trace = [[o] for o in obs]
    ended = [0, 0, 0]
    actions = np.tile(np.array([[0.3, 0.8, 0.0]], np.float32), (3, 1))
    for _ in range(20):
        obs, reward, terminated, truncated, _ = vector.step(actions)
        for i in range(3):
            trace[i].append(obs[i])
            ended[i] += bool(terminated[i] or truncated[i])
    assert min(ended) >= 2, "every sub-env should have been reset a few times"
    single = DreamCarRacing(model, starts, tau, max_steps=6)
    for i in range(3):
        expected = [single.reset(seed=50 + i)[0]]
        while len(expected) < len(trace[i]):
            obs, _, terminated, truncated, _ = single.step(actions[i])
            expected.append(obs)
            if (terminated or truncated) and len(expected) < len(trace[i]):
                expected.append(single.reset()[0])  # next-step autoreset: the reset obs takes a step
        np.testing.assert_allclose(np.array(trace[i]), np.array(expected), rtol=1e-4, atol=1e-5)


def test_z_is_sample_mixture_with_the_episode_seed():
    """Step 0 of episode s draws z_1 exactly as sample_mixture with the per-row seed (key, 0)."""
    rng = np.random.default_rng(2)
    model, starts, tau = small_model(seed=2), random_starts(rng), 0.7
    seeds = np.array([11, 12, 11])
    world = DreamWorld(model, starts, tau, max_steps=10, capacity=3, done="off")
    z0, _ = world.reset(seeds)
    action = np.array([[0.1, 0.5, 0.0], [-0.7, 0.2, 0.4], [0.9, 1.0, 0.0]], np.float32)
    (z1, h1), *_ = world.step(action)
    for i, seed in enumerate(seeds):
        episode_rng = np.random.default_rng(seed)
        key = episode_rng.integers(KEY_BOUND, dtype=np.int64)
        _, expected_z0 = starts.draw(episode_rng)
        np.testing.assert_array_equal(z0[i], expected_z0)
        out = model.step(z0[i:i + 1], action[i:i + 1], model.initial_state(1))
        expected = sample_mixture(out["log_pi"], out["mu"], out["log_sigma"], tau,
                                  seed=tf.constant([[key, 0]], tf.int64)).numpy()[0]
        np.testing.assert_allclose(z1[i], expected, rtol=1e-5, atol=1e-6)
        # The h returned with z_1 is M's state after (z_0, a_0): what C uses together with z_1.
        np.testing.assert_allclose(h1[i], out["state"][0].numpy()[0], rtol=1e-5, atol=1e-6)


def test_temperature_scales_sigma_and_the_mixture_weights():
    rng = np.random.default_rng(3)
    model = small_model(seed=3)
    starts = random_starts(rng, logvar=-30.0)
    k = model.num_mixtures
    seeds = np.arange(1000)

    def next_z(tau):
        world = DreamWorld(model, starts, tau, max_steps=5, capacity=len(seeds), done="off")
        world.reset(seeds)
        (z, _), *_ = world.step(np.zeros((len(seeds), 3), np.float32))
        return z

    # Equal components N(0, 1): z_{t+1} ~ N(0, tau), so the spread grows as sqrt(tau).
    set_dense(model, "mdn", np.zeros(3 * k * Z))
    spread = {tau: next_z(tau).std() for tau in (0.5, 1.5)}
    assert spread[0.5] == pytest.approx(math.sqrt(0.5), rel=0.03)
    assert spread[1.5] / spread[0.5] == pytest.approx(math.sqrt(3.0), rel=0.04)

    # Separated narrow components with weights pi: component j is picked with softmax(log pi / tau).
    log_pi = np.log(np.array([0.6, 0.25, 0.1, 0.04, 0.01]))
    means = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
    block = np.concatenate([log_pi, means, np.full(k, -20.0)])  # raw log sigma -20: sigma ~ exp(-5)
    set_dense(model, "mdn", np.tile(block, Z))
    for tau in (0.5, 1.5):
        picked = np.rint(next_z(tau) / 2.0).astype(int) + 2
        frequency = np.bincount(picked.ravel(), minlength=k) / picked.size
        expected = np.exp(log_pi / tau) / np.exp(log_pi / tau).sum()
        np.testing.assert_allclose(frequency, expected, atol=0.01)
    # A tiny temperature returns the mean of the most likely component.
    np.testing.assert_allclose(next_z(1e-6), -4.0, atol=1e-3)


def test_starts_are_stored_real_frames_after_the_zoom_with_ms_state_from_the_real_prefix(tmp_path):
    rng = np.random.default_rng(4)
    skip = 5
    write_series(tmp_path / "series", [12, 3, 9], rng, logvar=-30.0)  # episode 1 is shorter than the skip
    starts = load_start_states(tmp_path / "series", skip)
    assert starts.mu.shape == (3, Z) and starts.frames.tolist() == [5, 2, 5]
    for e in range(3):
        stored = storage.load_episode(tmp_path / "series" / starts.episodes[e], "series")
        np.testing.assert_array_equal(starts.mu[e], stored["mu"][starts.frames[e]])
        np.testing.assert_array_equal(starts.logvar[e], stored["logvar"][starts.frames[e]])

    model = small_model()
    world = DreamWorld(model, starts, 1.0, max_steps=5, capacity=300)
    z0, h0 = world.reset(np.arange(300))
    # M starts in the state it reaches on the episode's own frames before the start frame:
    # M.step over (mu_t, action_t) for t < frame, one agent at a time here (batched in the world).
    for e in range(3):
        stored = storage.load_episode(tmp_path / "series" / starts.episodes[e], "series")
        state = (np.zeros((1, model.hidden_units), np.float32),) * 2
        for t in range(starts.frames[e]):
            state = model.step(stored["mu"][t:t + 1], stored["action"][t:t + 1], state)["state"]
        agent = np.flatnonzero(world.start_rows == e)[0]
        assert np.abs(state[0].numpy()[0]).max() > 1e-3
        np.testing.assert_allclose(h0[agent], state[0].numpy()[0], atol=1e-5)
        np.testing.assert_allclose(world._c[agent], state[1].numpy()[0], atol=1e-5)
    no_prefix = load_start_states(tmp_path / "series", 0)
    assert no_prefix.prefix_mu is None and not DreamWorld(model, no_prefix, 1.0, 5, 4).reset(np.arange(4))[1].any()
    np.testing.assert_allclose(z0, starts.mu[world.start_rows], atol=1e-5)  # sigma = exp(-15): z_0 = mu
    assert np.bincount(world.start_rows, minlength=3).min() > 60, "starts are drawn uniformly over episodes"
    env = DreamCarRacing(small_model(), starts, max_steps=5)
    obs, info = env.reset(seed=9)
    row = starts.episodes.index(info["episode"])
    assert info["frame"] == starts.frames[row]
    np.testing.assert_allclose(obs[:Z], starts.mu[row], atol=1e-5)

    # With V's posterior spread, z_0 is a sample of it: (z_0 - mu) / sigma ~ N(0, 1).
    wide = StartStates(starts.mu, np.full_like(starts.logvar, math.log(0.25)), starts.episodes, starts.frames,
                       starts.prefix_mu, starts.prefix_action)
    world = DreamWorld(small_model(), wide, 1.0, max_steps=5, capacity=300)
    z0, _ = world.reset(np.arange(300))
    standard = (z0 - wide.mu[world.start_rows]) / 0.5
    assert abs(standard.mean()) < 0.05 and standard.std() == pytest.approx(1.0, abs=0.05)

    with pytest.raises(storage.MissingDataError, match="03_generate_rnn_data.py"):
        load_start_states(tmp_path / "nothing", skip)


def test_branched_starts_every_k_frames_with_ms_state_from_one_teacher_forced_pass(tmp_path):
    rng = np.random.default_rng(5)
    write_series(tmp_path / "series", [12, 3, 9], rng, logvar=-30.0)
    model = small_model()
    # chunk=2: the first two series are stepped together, the third alone.
    starts = load_branch_starts(tmp_path / "series", 5, 3, model, chunk=2)
    assert starts.frames.tolist() == [5, 8, 11, 2, 5, 8] and starts.prefix_mu is None
    assert [int(name[8:14]) for name in starts.episodes] == [0, 0, 0, 1, 2, 2]
    # Each row equals the one-start table of its own frame (M reading that frame's prefix), and its z is that frame's.
    for row, (name, frame) in enumerate(zip(starts.episodes, starts.frames)):
        stored = storage.load_episode(tmp_path / "series" / name, "series")
        np.testing.assert_array_equal(starts.mu[row], stored["mu"][frame])
        state = (np.zeros((1, HIDDEN), np.float32),) * 2
        for t in range(frame):
            state = model.step(stored["mu"][t:t + 1], stored["action"][t:t + 1], state)["state"]
        np.testing.assert_allclose(starts.hidden[row], state[0].numpy()[0], atol=1e-5)
        np.testing.assert_allclose(starts.cell[row], state[1].numpy()[0], atol=1e-5)
    world = DreamWorld(model, starts, 1.0, max_steps=5, capacity=600)
    _, h0 = world.reset(np.arange(600))
    np.testing.assert_array_equal(h0, starts.hidden[world.start_rows])
    assert np.bincount(world.start_rows, minlength=6).min() > 60, "starts are drawn uniformly over all frames"

    # Several folders (an iteration's dream starts from every series so far): their rows one after the other.
    write_series(tmp_path / "more", [7], rng)
    both = load_branch_starts([tmp_path / "series", tmp_path / "more"], 5, 3, model)
    assert both.frames.tolist() == [5, 8, 11, 2, 5, 8, 5] and both.episodes[-1] == "episode_000000.npz"
    np.testing.assert_array_equal(both.hidden[:6], starts.hidden)

    # Through the config: start_every picks the branched table, which needs M; 0 keeps one start per series.
    branched = config.make_config("smoke", {"dream.start_every": 3})
    assert len(start_states_for(tmp_path, branched, model)) == 6
    assert len(start_states_for(tmp_path, SMOKE)) == 3
    with pytest.raises(ValueError, match="need M"):
        start_states_for(tmp_path, branched)
    with pytest.raises(ValueError, match="made with another M"):
        DreamWorld(MDNRNN(z_size=Z, hidden_units=HIDDEN + 1), starts, 1.0, 5, 4)
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        load_branch_starts(tmp_path / "series", 5, 0, model)
    with pytest.raises(config.ConfigError, match="dream.start_every must be >= 0"):
        config.make_config("smoke", {"dream.start_every": -1})


def test_step_limit_done_head_and_reward_head():
    rng = np.random.default_rng(5)
    model = small_model(seed=5)
    starts = random_starts(rng)
    set_dense(model, "reward", 0.7)
    params = np.zeros((1, num_parameters(Z, HIDDEN)))
    seeds = np.arange(300)[None]

    def lengths(p_done, done="sample", max_steps=60):
        set_dense(model, "done", done_logit(p_done))
        result = run_episodes(DreamWorld(model, starts, 1.0, max_steps, 300, done), params, seeds, 1000)
        np.testing.assert_allclose(result.returns, 0.7 * result.lengths, rtol=1e-5)  # M's reward is paid
        return result.lengths

    assert (lengths(1e-9) == 60).all(), "no done: every episode is truncated at the dream's limit"
    assert (lengths(1 - 1e-6) == 1).all(), "a certain done ends every episode after one step"
    assert (lengths(1 - 1e-6, done="off") == 60).all()
    assert (lengths(0.3, done="threshold") == 60).all() and (lengths(0.7, done="threshold") == 1).all()
    # Bernoulli(p) done: geometric lengths, mean (1 - (1 - p)^60) / p ~ 10 for p = 0.1.
    assert lengths(0.1).mean() == pytest.approx((1 - 0.9**60) / 0.1, rel=0.12)

    with pytest.raises(ValueError, match="reward head"):
        DreamWorld(small_model(reward_head=False), starts)
    with pytest.raises(ValueError, match="temperature"):
        DreamWorld(model, starts, temperature=0.0)


def test_the_action_head_changes_nothing_in_the_dream_and_exposes_ms_predicted_action():
    rng = np.random.default_rng(6)
    starts = random_starts(rng)
    off = small_model(seed=6)
    on = small_model(seed=7, action_head=True)
    for name in ("lstm", "mdn", "reward", "done"):
        on.net.get_layer(name).set_weights(off.net.get_layer(name).get_weights())
    worlds = [DreamWorld(model, starts, 1.0, 50, 4) for model in (off, on)]
    assert worlds[0].predicted_action is None
    seeds = np.arange(4)
    first = [world.reset(seeds) for world in worlds]
    np.testing.assert_array_equal(first[0][0], first[1][0])
    assert not worlds[1].predicted_action.any()
    for t in range(5):
        actions = rng.uniform([-1, 0, 0], [1, 1, 1], size=(4, 3)).astype(np.float32)
        z, h, c = worlds[1]._z.copy(), worlds[1]._h.copy(), worlds[1]._c.copy()
        active = np.array([True, True, t % 2 == 0, True])
        results = [world.step(actions, active) for world in worlds]
        for a, b in zip(results[0][1:], results[1][1:]):  # reward, terminated, truncated
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(results[0][0][0], results[1][0][0])  # z
        np.testing.assert_array_equal(results[0][0][1], results[1][0][1])  # h
        # M's prediction of the next action, from the state and inputs of this step (rows that moved).
        expected = on.step(z[active], actions[active], (h[active], c[active]))["action"].numpy()
        np.testing.assert_allclose(worlds[1].predicted_action[active], expected, atol=1e-5)
    assert worlds[1].predicted_action.any()


# --------------------------------------------------------------------------- 05 --env dream, the study, the notebook

GENERATIONS = 3
TRAIN = ("--env", "dream", "--set", f"controller.generations={GENERATIONS}", "--set", "controller.max_steps=30",
         "--set", "dream.max_steps=40")


@pytest.fixture(scope="module")
def models_dir(smoke_rnn):
    """The smoke pipeline's data dir, with trained ``vae/``, ``rnn/`` and ``series/``."""
    return smoke_rnn


@pytest.fixture(scope="module")
def dream_trained(models_dir, tmp_path_factory):
    data = data_dir_with(models_dir, tmp_path_factory.mktemp("dream_reference"), "vae", "rnn", "series")
    proc = run_script("05_train_controller.py", *TRAIN, "--set", "controller.backend=serial", data_dir=data)
    return data, proc


def test_05_dream_writes_dream_and_real_scores(dream_trained):
    data, proc = dream_trained
    out = data / f"controller_dream_t{SMOKE.dream.temperature:g}"
    assert out.name == "controller_dream_t1.15" and not (data / "controller").exists()
    history = read_csv(out / "history.csv")
    assert [int(row["generation"]) for row in history] == list(range(1, GENERATIONS + 1))
    evals = read_csv(out / "eval.csv")
    assert list(evals[0]) == ["generation", "mean", "std", "dream_mean", "dream_std", "env_steps", "seconds"]
    assert [int(row["generation"]) for row in evals] == list(range(1, GENERATIONS + 1))  # smoke: eval_every=1
    # Real held-out scores: 30-step CarRacing episodes lose 0.1 a frame and gain per tile, never M's numbers.
    assert all(float(row["mean"]) != float(row["dream_mean"]) for row in evals)

    controller = load_npz(out / "controller.npz")
    dream_means = [float(row["dream_mean"]) for row in evals]
    assert float(controller["best_eval_mean"]) == max(dream_means), "a dream controller is selected by its dream score"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["env"] == "dream" and metrics["max_steps"] == 30
    assert metrics["seeds"] == heldout_seeds(SMOKE.controller.seed, 2, FINAL_EVAL_SEED_OFFSET).tolist()
    assert metrics["mean"] == pytest.approx(np.mean(metrics["scores"]))
    assert metrics["dream"]["temperature"] == 1.15 and len(metrics["dream"]["scores"]) == 2
    assert max(metrics["dream"]["lengths"]) <= 40
    assert "final evaluation on 2 held-out tracks" in proc.stdout and "in the dream" in proc.stdout
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = config.load_config(out / "config.json")
    assert cfg.controller.env == "dream" and cfg.dream.max_steps == 40

    rerun = run_script("05_train_controller.py", *TRAIN, data_dir=data)
    assert "nothing to do" in rerun.stdout


def test_05_dream_resumes_after_sigkill_to_the_same_result(dream_trained, models_dir, tmp_path):
    reference = dream_trained[0] / "controller_dream_t1.15"
    data = data_dir_with(models_dir, tmp_path, "vae", "rnn", "series")
    out = data / "controller_dream_t1.15"
    kill_then_resume_controller(data, out, reference, TRAIN, GENERATIONS)


def test_study_temperature_writes_the_table_and_plot(models_dir, tmp_path):
    data = data_dir_with(models_dir, tmp_path, "vae", "rnn", "series")
    args = ("--set", "dream.temperatures=0.5,1.3", "--set", "controller.generations=1",
            "--set", "controller.max_steps=20", "--set", "dream.max_steps=20", "--set", "controller.backend=serial")
    first = run_script("study_temperature.py", *args, data_dir=data)
    study = data / "temperature_study"
    results = json.loads((study / "results.json").read_text())
    assert [row["temperature"] for row in results["rows"]] == [0.5, 1.3]
    for row in results["rows"]:
        metrics = json.loads((data / f"controller_dream_t{row['temperature']:g}" / "metrics.json").read_text())
        assert (row["real_mean"], row["real_std"]) == (metrics["mean"], metrics["std"])
        assert (row["dream_mean"], row["dream_std"]) == (metrics["dream"]["mean"], metrics["dream"]["std"])
        assert metrics["seeds"] == heldout_seeds(SMOKE.controller.seed, 2, FINAL_EVAL_SEED_OFFSET).tolist()
    table = (study / "results.md").read_text()
    assert "| tau | score in dream | score in real env |" in table
    assert f"| 0.5 | {results['rows'][0]['dream_mean']:.1f} +- {results['rows'][0]['dream_std']:.1f} |" in table
    assert (study / "temperature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["real_trained"] is None and "no real-trained controller" in first.stdout

    # A controller trained in the real environment and scored on the same tracks joins the table;
    # one scored on other tracks does not (its numbers would not be comparable).
    real = data / "controller"
    real.mkdir()
    same = {"mean": 12.5, "std": 3.25, "seeds": metrics["seeds"], "max_steps": 20}
    (real / "metrics.json").write_text(json.dumps(same))
    rerun = run_script("study_temperature.py", *args, data_dir=data)
    assert rerun.stdout.count("nothing to do") == 2
    results = json.loads((study / "results.json").read_text())
    assert (results["real_trained"]["real_mean"], results["real_trained"]["real_std"]) == (12.5, 3.25)
    assert "| trained in the real env (`05_train_controller.py`) | - | 12.5 +- 3.2 |" in (study / "results.md").read_text()
    (real / "metrics.json").write_text(json.dumps(dict(same, seeds=[1, 2])))
    other = run_script("study_temperature.py", *args, data_dir=data)
    assert "other tracks" in other.stdout and json.loads((study / "results.json").read_text())["real_trained"] is None


def test_dream_notebook_executes(models_dir, tmp_path):
    data = data_dir_with(models_dir, tmp_path, "vae", "rnn", "series")
    check_notebook(REPO / "notebooks" / "dream_episode.ipynb", data)
    from PIL import Image

    with Image.open(data / "dream" / "dream_episode.gif") as gif:
        assert gif.n_frames >= 2


def test_05_dream_without_series_is_a_clear_error(models_dir, tmp_path):
    data = data_dir_with(models_dir, tmp_path, "vae", "rnn")
    proc = run_script("05_train_controller.py", "--env", "dream", data_dir=data, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "series" in proc.stderr and "03_generate_rnn_data.py" in proc.stderr


def test_pessimism_pays_m_reward_minus_lambda_times_the_ms_disagreement(tmp_path):
    rng = np.random.default_rng(6)
    write_series(tmp_path / "series", [12, 9], rng)
    starts = load_start_states(tmp_path / "series", 5)
    model, other, third = small_model(0, reward_head=True), small_model(1, reward_head=True), small_model(2, reward_head=True)
    actions = rng.uniform(-1, 1, size=(4, 3)).astype(np.float32)
    plain = DreamWorld(model, starts, 1.0, max_steps=6, capacity=4)
    plain.reset(np.arange(4))
    # An ensemble of copies of M never disagrees: the same rewards as without one, whatever lambda.
    same = DreamWorld(model, starts, 1.0, max_steps=6, capacity=4, ensemble=[model], pessimism=5.0)
    same.reset(np.arange(4))
    world = DreamWorld(model, starts, 1.0, max_steps=6, capacity=4, ensemble=[other, third], pessimism=2.0)
    z0, _ = world.reset(np.arange(4))
    # Brute force: every M reads the real prefix from its zero state, then (z_t, a_t) step by step.
    states = []
    for member in (model, other, third):
        h = np.zeros((4, HIDDEN), np.float32)
        c = np.zeros((4, HIDDEN), np.float32)
        for row in range(4):
            stored = storage.load_episode(tmp_path / "series" / starts.episodes[world.start_rows[row]], "series")
            state = (np.zeros((1, HIDDEN), np.float32),) * 2
            for t in range(starts.frames[world.start_rows[row]]):
                state = member.step(stored["mu"][t:t + 1], stored["action"][t:t + 1], state)["state"]
            h[row], c[row] = state[0].numpy()[0], state[1].numpy()[0]
        states.append([h, c])
    z = z0
    for _ in range(3):
        means = []
        for i, member in enumerate((model, other, third)):
            out = member.step(z, actions, tuple(states[i]))
            log_pi, mu = out["log_pi"].numpy().astype(np.float64), out["mu"].numpy().astype(np.float64)
            weights = np.exp(log_pi) / np.exp(log_pi).sum(axis=-1, keepdims=True)
            means.append((weights * mu).sum(axis=-1))
            states[i] = [s.numpy() for s in out["state"]]
        u = np.sqrt(np.mean(np.var(np.stack(means), axis=0), axis=-1))
        (z_plain, _), r_plain, *_ = plain.step(actions)
        (_, _), r_same, *_ = same.step(actions)
        (z, _), r, *_ = world.step(actions)
        np.testing.assert_array_equal(z, z_plain)  # the ensemble only measures: M's dream is unchanged
        np.testing.assert_allclose(r_same, r_plain, atol=1e-6)
        assert u.min() > 1e-4
        np.testing.assert_allclose(world.disagreement, u, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r, r_plain - 2.0 * u, rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="give the further Ms"):
        DreamWorld(model, starts, 1.0, 6, 4, pessimism=1.0)
    with pytest.raises(ValueError, match="branched start table"):
        DreamWorld(model, load_branch_starts(tmp_path / "series", 5, 3, model), 1.0, 6, 4, ensemble=[other])
    with pytest.raises(config.ConfigError, match="dream.ensemble"):
        config.make_config("smoke", {"dream.pessimism": 1.0})
    with pytest.raises(config.ConfigError, match="dream.pessimism must be >= 0"):
        config.make_config("smoke", {"dream.pessimism": -1.0, "dream.ensemble": "x"})


def test_05_dream_with_an_ensemble_reads_its_ms_and_names_a_missing_one(models_dir, tmp_path):
    data = data_dir_with(models_dir, tmp_path / "run", "vae", "rnn", "series")
    missing = run_script("05_train_controller.py", *TRAIN, "--set", f"dream.ensemble={tmp_path / 'nowhere'}",
                         "--set", "dream.pessimism=1", data_dir=data, check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert "nowhere" in missing.stderr and "04_train_rnn.py" in missing.stderr
    proc = run_script("05_train_controller.py", "--env", "dream", "--set", "controller.generations=1",
                      "--set", "controller.max_steps=30", "--set", "dream.max_steps=40",
                      "--set", f"dream.ensemble={models_dir}", "--set", "dream.pessimism=1", data_dir=data)
    assert "2 Ms, reward minus 1 x their disagreement" in proc.stdout
    cfg = config.load_config(data / f"controller_dream_t{SMOKE.dream.temperature:g}" / "config.json")
    assert cfg.dream.pessimism == 1.0 and cfg.dream.ensemble == str(models_dir)
