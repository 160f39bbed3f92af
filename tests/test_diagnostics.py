"""worldmodels/diagnostics.py: the exploit gap, the latent error against steps and the rank correlation."""

import math

import numpy as np
import pytest
from PIL import Image

from models.mdn_rnn import MDNRNN
from worldmodels import diagnostics
from worldmodels.diagnostics import ReplayModel, diagnostics_figure, exploit_gap, latent_error, rank_correlation

Z, HIDDEN = 8, 16  # a small M keeps the tests fast


def episodes(rng, lengths):
    """Random series episodes of the given lengths (mu (T, Z), action (T, 3), reward (T,))."""
    return [{"mu": rng.normal(size=(t, Z)).astype(np.float32),
             "action": rng.uniform([-1, 0, 0], 1, size=(t, 3)).astype(np.float32),
             "reward": rng.normal(size=t).astype(np.float32)} for t in lengths]


def test_the_gap_is_zero_when_the_dream_replays_the_real_episode():
    data = episodes(np.random.default_rng(0), [30, 12, 25])
    replay = ReplayModel(data)
    for start, horizon in ((5, 10), (0, 40), (8, 1)):
        gap = exploit_gap(replay, data, start, horizon, temperature=1.0)
        np.testing.assert_array_equal(gap["gaps"], np.zeros(3))
        assert gap["mean"] == 0.0 and gap["start"] == start
        np.testing.assert_array_equal(gap["steps"], [min(horizon, t - start) for t in (30, 12, 25)])
        assert np.all(gap["real"] != 0)  # the returns compared are not trivially zero
    # Its predicted next z is the real one, with or without feedback.
    curves = latent_error(replay, data, 5, 40)
    np.testing.assert_array_equal(curves["open_loop"], np.zeros(24))
    np.testing.assert_array_equal(curves["teacher_forced"], np.zeros(24))


def test_a_shifted_replay_is_caught():
    """The replay refuses actions out of order, and a start past the shortest episode is clipped to it."""
    data = episodes(np.random.default_rng(1), [20, 20])
    shifted = [dict(e, action=np.roll(e["action"], 1, axis=0)) for e in data]
    with pytest.raises(ValueError, match="not the recorded ones"):
        exploit_gap(ReplayModel(shifted), data, 3, 5)
    assert exploit_gap(ReplayModel(data), data, 50, 5)["start"] == 19


def hand_gap(model, episode, start, horizon):
    """One episode, batch 1: M reads frames 0..s-1, then feeds its mixture mean back under the recorded actions."""
    state = model.initial_state(1)
    for t in range(start):
        state = model.step(episode["mu"][t:t + 1], episode["action"][t:t + 1], state)["state"]
    z, predicted, real = episode["mu"][start:start + 1], 0.0, 0.0
    for t in range(start, min(start + horizon, len(episode["mu"]))):
        out = model.step(z, episode["action"][t:t + 1], state)
        state = out["state"]
        pi = np.exp(out["log_pi"].numpy()[0])
        z = (np.sum(pi * out["mu"].numpy()[0], axis=-1) / pi.sum(axis=-1))[None].astype(np.float32)
        predicted += float(out["reward"][0])
        real += float(episode["reward"][t])
    return predicted - real


def test_the_gap_of_a_real_m_equals_a_hand_computation():
    rng = np.random.default_rng(2)
    model = MDNRNN(z_size=Z, hidden_units=HIDDEN, seed=3)
    data = episodes(rng, [15, 9, 13])
    gap = exploit_gap(model, data, 4, 8, temperature=None)
    want = [hand_gap(model, e, 4, 8) for e in data]
    np.testing.assert_allclose(gap["gaps"], want, rtol=1e-4, atol=1e-4)
    assert math.isclose(gap["mean"], float(np.mean(want)), rel_tol=1e-4, abs_tol=1e-4)
    # Sampled open loop at a temperature is reproducible from its seed, and differs from the mean feedback.
    first, again = (exploit_gap(model, data, 4, 8, temperature=1.0, seed=5)["gaps"] for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, gap["gaps"])


def test_teacher_forced_error_is_the_sequence_models_and_open_loop_drifts():
    """Teacher forcing from the prefix state equals M's sequence call on the real frames; open loop from
    the same state agrees at one step ahead and not beyond."""
    rng = np.random.default_rng(4)
    model = MDNRNN(z_size=Z, hidden_units=HIDDEN, seed=5)
    data = episodes(rng, [14, 10])
    start, horizon = 3, 8
    curves = latent_error(model, data, start, horizon, temperature=1.0)
    errors = []
    for e in data:
        out = model(np.concatenate([e["mu"], e["action"]], axis=-1)[None], training=False)
        log_pi, mu, _ = model.split(out["mdn"])
        mean = diagnostics.mixture_mean(log_pi.numpy()[0], mu.numpy()[0])  # (T, Z), the prediction of frame t + 1
        errors.append([np.sum(np.square(mean[start + k - 1] - e["mu"][start + k])) for k in range(1, horizon + 1)
                       if start + k < len(e["mu"])])
    want = [np.mean([err[k] for err in errors if k < len(err)]) for k in range(horizon)]
    np.testing.assert_array_equal(curves["steps"], np.arange(1, horizon + 1))
    np.testing.assert_allclose(curves["teacher_forced"], want, rtol=1e-4)
    assert math.isclose(curves["open_loop"][0], curves["teacher_forced"][0], rel_tol=1e-5)
    assert not np.allclose(curves["open_loop"][1:], curves["teacher_forced"][1:])


def test_rank_correlation_with_ties_against_a_hand_example():
    # Ranks with ties averaged: dream [1, 2.5, 2.5, 4], real [2, 1, 3, 4]; centred [-1.5, 0, 0, 1.5] and
    # [-0.5, -1.5, 0.5, 1.5]: covariance 0.75 + 2.25 = 3, norms sqrt(4.5) and sqrt(5).
    rho = rank_correlation([10.0, 20.0, 20.0, 35.0], [-3.0, -7.0, 0.5, 9.0])
    assert math.isclose(rho, 3.0 / math.sqrt(4.5 * 5.0))
    np.testing.assert_array_equal(diagnostics.ranks([3.0, 1.0, 3.0, 3.0]), [3.0, 1.0, 3.0, 3.0])
    assert rank_correlation([1, 2, 3], [30, 20, 10]) == -1.0
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="n >= 2"):
        rank_correlation([1.0], [2.0])


def test_bad_input_is_a_clear_error():
    data = episodes(np.random.default_rng(6), [10])
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        exploit_gap(ReplayModel(data), data, 2, 0)
    with pytest.raises(ValueError, match="start must be an integer >= 0"):
        exploit_gap(ReplayModel(data), data, -1, 3)
    with pytest.raises(ValueError, match="action must have shape"):
        exploit_gap(ReplayModel(data), [dict(data[0], action=data[0]["action"][:5])], 2, 3)


def test_diagnostics_figure_writes_a_png(tmp_path):
    data = episodes(np.random.default_rng(7), [20, 16])
    replay = ReplayModel(data)
    curves = latent_error(MDNRNN(z_size=Z, hidden_units=HIDDEN, seed=0), data, 2, 10)
    out = diagnostics_figure(tmp_path / "diag.png", curves, exploit_gap(replay, data, 2, 10)["gaps"])
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 0


def test_an_iterations_table_from_before_the_diagnostics_reads_with_nan(tmp_path):
    from worldmodels import iterate, storage

    old = [key for key in iterate.FIELDS if key not in diagnostics.FIELDS]
    path = tmp_path / "iterations.csv"
    path.write_text(",".join(old) + "\n" + ",".join("1" if key == "iteration" else "2.5" for key in old) + "\n")
    iterate.append_row(path, {key: (2 if key == "iteration" else 0.5) for key in iterate.FIELDS})
    rows = iterate.read_rows(path)
    assert [row["iteration"] for row in rows] == ["1", "2"]
    assert all(rows[0][key] == "nan" for key in diagnostics.FIELDS)
    assert rows[0]["real_score"] == "2.5" and rows[1]["exploit_gap_same_actions"] == "0.5"
    path.write_text("iteration,something_else\n1,2\n")
    with pytest.raises(storage.CorruptFileError, match="not an iterations table"):
        iterate.read_rows(path)


def test_the_command_scores_ms_heldout_split_as_stage_4_and_the_diagnostics_do(smoke_rnn, tmp_path):
    """``python -m worldmodels.diagnostics``: the numbers of a direct computation, on M's held-out split."""
    import json

    import config
    from tests.conftest import assert_user_error, run_plain
    from worldmodels import artifacts, sequences

    out, figure = tmp_path / "m.json", tmp_path / "m.png"
    proc = run_plain("-m", "worldmodels.diagnostics", "--data-dir", str(smoke_rnn), "--out", str(out),
                     "--figure", str(figure))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    split = json.loads((smoke_rnn / "rnn" / "split.json").read_text())
    paths = [smoke_rnn / "series" / name for name in split["heldout"]]
    assert result["episodes"] == [str(p) for p in paths] and figure.stat().st_size > 0

    cfg = config.load_config(smoke_rnn / "rnn" / "config.json")
    rnn = artifacts.load_rnn(smoke_rnn, cfg)
    want = sequences.evaluate_model(rnn, paths, cfg.rnn.sequence_length, cfg.rnn.batch_size, sample_seed=cfg.rnn.seed)
    want.update(diagnostics.diagnose(cfg, rnn, paths))
    assert result["metrics"]["z_nll"] == pytest.approx(want["z_nll"], rel=1e-6)
    for key in diagnostics.FIELDS:
        np.testing.assert_allclose(result["metrics"][key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert f"z NLL {want['z_nll']:.3f}" in proc.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run_plain("-m", "worldmodels.diagnostics", "--data-dir", str(empty)), "config.json")
    assert_user_error(run_plain("-m", "worldmodels.diagnostics", "--data-dir", str(smoke_rnn),
                                str(tmp_path / "missing.npz")), "no series to score M on")
    # --ensemble: M against a copy of itself never disagrees; a folder without M is a one-line error.
    same = tmp_path / "same.json"
    proc = run_plain("-m", "worldmodels.diagnostics", "--data-dir", str(smoke_rnn), "--ensemble", str(smoke_rnn),
                     "--out", str(same))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(same.read_text())["metrics"]["disagreement_teacher"] == 0.0 and "disagreement of 2 Ms" in proc.stdout
    assert_user_error(run_plain("-m", "worldmodels.diagnostics", "--data-dir", str(smoke_rnn), "--ensemble",
                                str(empty)), "04_train_rnn.py")


def test_ensemble_disagreement_is_the_spread_of_teacher_forced_predictions():
    from worldmodels.dream import disagreement

    rng = np.random.default_rng(7)
    models = [MDNRNN(z_size=Z, hidden_units=HIDDEN, seed=seed) for seed in (1, 2, 3)]
    data = episodes(rng, [12, 8])
    start, horizon = 3, 7
    spread = diagnostics.ensemble_disagreement(models, data, start, horizon)
    # By hand: each model's sequence call on the real frames predicts frame t + 1 at step t (teacher forcing).
    per_episode = []
    for e in data:
        means = []
        for model in models:
            out = model(np.concatenate([e["mu"], e["action"]], axis=-1)[None], training=False)
            log_pi, mu, _ = model.split(out["mdn"])
            means.append(diagnostics.mixture_mean(log_pi.numpy()[0], mu.numpy()[0])[start:min(start + horizon, len(e["mu"]))])
        per_episode.append(disagreement(np.stack(means)))
    want = [np.mean([u[k] for u in per_episode if k < len(u)]) for k in range(horizon)]
    np.testing.assert_allclose(spread["u"], want, rtol=1e-4)
    assert spread["mean"] == pytest.approx(np.mean(np.concatenate(per_episode)), rel=1e-4)
    assert min(want) > 1e-4
    # Copies of one M never disagree; one model alone is a clear error.
    assert diagnostics.ensemble_disagreement([models[0]] * 2, data, start, horizon)["mean"] == 0.0
    with pytest.raises(ValueError, match="at least one further M"):
        diagnostics.ensemble_disagreement(models[:1], data, start, horizon)


def test_pessimism_fit_finds_the_lambda_of_an_overpayment_made_of_disagreement():
    """If every window's overpayment is lambda x its summed u, lambda_match is lambda and the ranks agree; steps
    past a window's end do not count, a window without steps is left out, a flat u ranks nothing."""
    rng = np.random.default_rng(3)
    u = rng.uniform(0.01, 0.05, size=(6, 10))
    steps = np.array([10, 7, 3, 10, 0, 5])
    counted = np.arange(10)[None] < steps[:, None]
    gap = 8.5 * np.where(counted, u, 0.0).sum(axis=1)
    fit = diagnostics.pessimism_fit(np.where(counted, u, 99.0), gap, steps)  # values past the end are ignored
    assert fit["lambda_match"] == pytest.approx(8.5) and fit["rho"] == pytest.approx(1.0)
    assert math.isnan(fit["u"][4]) and math.isnan(fit["gap_per_step"][4])
    np.testing.assert_allclose(fit["u"][[0, 1, 2, 3, 5]], [u[c, :n].mean() for c, n in enumerate(steps) if n])
    assert fit["u_mean"] == pytest.approx(u[counted].mean())
    flat = diagnostics.pessimism_fit(np.full((3, 4), 0.02), np.array([1.0, -1.0, 2.0]), np.array([4, 4, 4]))
    assert math.isnan(flat["rho"]) and flat["lambda_match"] == pytest.approx(2.0 / (0.02 * 12))
    assert math.isnan(diagnostics.pessimism_fit(np.zeros((2, 3)), np.ones(2), np.array([3, 3]))["lambda_match"])
    with pytest.raises(ValueError, match="steps"):
        diagnostics.pessimism_fit(u, gap, steps + 5)


def test_the_command_checks_a_controller_in_its_own_dream_against_reality(smoke_rnn, tmp_path):
    """``--controller``: the numbers of a direct exploit_under_control call (the check is deterministic); with a
    copy of M as the ensemble nothing is charged; a controller of another size is a clear error."""
    import json

    import config
    from models.controller import num_parameters
    from tests.conftest import assert_user_error, run_plain
    from worldmodels import artifacts, recording, repair

    cfg = config.load_config(smoke_rnn / "rnn" / "config.json")
    params = np.random.default_rng(2).normal(size=num_parameters(cfg.vae.z_size, cfg.rnn.hidden_units)) * 0.1
    np.savez(tmp_path / "controller.npz", params=params, generation=np.int64(0))
    out, figure = tmp_path / "c.json", tmp_path / "m.png"
    proc = run_plain("-m", "worldmodels.diagnostics", "--data-dir", str(smoke_rnn), "--controller", str(tmp_path),
                     "--ensemble", str(smoke_rnn), "--windows", "3", "--horizon", "5", "--out", str(out),
                     "--figure", str(figure))
    assert proc.returncode == 0, proc.stderr
    found = json.loads(out.read_text())["metrics"]
    assert found["control_u"] == 0.0 and "replayed in reality" in proc.stdout
    assert (tmp_path / "m_control.png").stat().st_size > 0

    split = json.loads((smoke_rnn / "rnn" / "split.json").read_text())
    rollouts = [smoke_rnn / "rollouts" / name for name in split["heldout"]]
    plan = repair.Plan(3, 1, 5, cfg.dream.temperature, cfg.dream.skip_initial_frames, cfg.data.max_steps,
                       (cfg.iterate.seed, diagnostics.CONTROL_KEY), cfg.rnn.encode_batch_size)
    c = cfg.controller
    want = diagnostics.exploit_under_control(
        artifacts.load_vision(smoke_rnn, cfg), artifacts.load_rnn(smoke_rnn, cfg), params, rollouts, plan,
        recording.Driving(cfg.data.max_steps, 0.0, c.z_input, cfg.env.observation, c.backend, c.workers))
    steps = want["steps"].sum()
    assert steps > 0 and found["control_env_steps"] == want["env_steps"]
    assert found["control_dream_per_step"] == pytest.approx(want["dream_return"].sum() / steps, rel=1e-6)
    assert found["control_real_per_step"] == pytest.approx(want["real_return"].sum() / steps, rel=1e-6)
    np.testing.assert_allclose(want["dream_return"] - want["real_return"], want["reward_gap"], atol=1e-5)

    np.savez(tmp_path / "small.npz", params=params[:10], generation=np.int64(0))
    assert_user_error(run_plain("-m", "worldmodels.diagnostics", "--data-dir", str(smoke_rnn), "--controller",
                                str(tmp_path / "small.npz")), "use the config it was trained with")


class ActionBlind:
    """M that never sees the action (it always reads "no action"): steering cannot move its z."""

    def __init__(self, model):
        self.model, self.hidden_units, self.z_size = model, model.hidden_units, model.z_size

    def step(self, z, action, state):
        return self.model.step(z, np.zeros_like(np.asarray(action)), state)


def test_steering_response_compares_left_and_right_in_m_and_in_reality(smoke_rnn, tmp_path):
    """Reality moves z when the steering differs; an M blind to actions does not move it at all (ratio 0); the
    real curve does not depend on M; the command prints and saves the same numbers."""
    import json

    import config
    from tests.conftest import run_plain
    from worldmodels import artifacts, storage

    cfg = config.load_config(smoke_rnn / "rnn" / "config.json")
    split = json.loads((smoke_rnn / "rnn" / "split.json").read_text())
    rollouts = [{**storage.load_episode(smoke_rnn / "rollouts" / name, "rollout"), "name": name}
                for name in split["heldout"]]
    vae, rnn = artifacts.load_vision(smoke_rnn, cfg), artifacts.load_rnn(smoke_rnn, cfg)
    driving = diagnostics.replay_driving(cfg)
    start, horizon = cfg.dream.skip_initial_frames, 12
    found = diagnostics.steering_response(vae, rnn, rollouts, start, horizon, driving)
    blind = diagnostics.steering_response(vae, ActionBlind(rnn), rollouts, start, horizon, driving)
    assert found["real"].shape == found["model"].shape == (horizon,) and found["start"] == start
    np.testing.assert_array_equal(blind["real"], found["real"])
    np.testing.assert_array_equal(blind["model"], np.zeros(horizon))
    assert found["real"][-1] > 0 and found["model"][-1] > 0
    np.testing.assert_allclose(found["ratio"], found["model"] / found["real"])

    out = tmp_path / "steering.json"
    proc = run_plain("-m", "worldmodels.diagnostics", "--data-dir", str(smoke_rnn), "--steering", str(horizon),
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text())["metrics"]
    for k in (1, 10, horizon):
        assert saved[f"steering_real_{k}"] == pytest.approx(found["real"][k - 1], rel=1e-5)
        assert saved[f"steering_model_{k}"] == pytest.approx(found["model"][k - 1], rel=1e-5)
    assert "full left vs full right" in proc.stdout
    assert saved["steering_r2_z"] == pytest.approx(diagnostics.steering_predictability(
        [storage.load_episode(smoke_rnn / "series" / name, "series") for name in split["heldout"]]))


def test_steering_predictability_is_the_share_of_steering_the_frame_decides():
    """R^2 of a linear fit held out over episodes: steer = w.z + noise with a known share of variance -> that share;
    steering independent of the frame -> about 0; a single episode is split in two halves."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=32)

    def episodes(share):
        out = []
        for _ in range(6):
            mu = rng.normal(size=(1000, 32))
            signal = mu @ w / np.linalg.norm(w)  # variance 1
            steer = np.sqrt(share) * signal + np.sqrt(1 - share) * rng.normal(size=1000)
            out.append({"mu": mu, "action": np.c_[steer, rng.uniform(size=(1000, 2))]})
        return out

    for share in (0.0, 0.5, 0.9):
        assert diagnostics.steering_predictability(episodes(share)) == pytest.approx(share, abs=0.02)
    assert diagnostics.steering_predictability(episodes(0.8)[:1]) == pytest.approx(0.8, abs=0.04)
    with pytest.raises(ValueError, match="with steps"):
        diagnostics.steering_predictability([])
