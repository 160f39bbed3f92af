"""Does the dream transfer? Three diagnostics of M against reality (issue #19, item 5).

Shapes: N = episodes, T = an episode's frames, Z = ``z_size`` (32), H = M's hidden units,
K = mixture components, L = the horizon (steps after the start frame).

* :func:`exploit_gap`: start M in the state it reaches on a real episode's prefix (frames
  0..s-1, as the dream does, :func:`worldmodels.dream.read_prefix`), feed it the *same recorded
  actions* from frame s on, its own z in open loop, and sum its predicted rewards over L steps;
  the gap is that predicted return minus the real return of the same steps. A controller that
  exploits M's errors drives where M over-pays, so the gap of its own episodes grows.
* :func:`latent_error`: the squared error of M's predicted next z (its mixture mean) against
  V's posterior mean of the real next frame, k = 1..L steps after the start, in open loop (M
  fed its own sampled z) and teacher-forced (M fed V's real z every step).
* :func:`rank_correlation`: Spearman's rho between the dream and the real scores of a set of
  controllers: a dream that ranks controllers as reality does is enough to select them.

* :func:`exploit_under_control`: the exploit where it happens, under C's own steering: C drives
  L steps in M's dream from real states, its dream actions are replayed in the real environment
  from the same states (``worldmodels.repair``'s machinery, nothing saved), and each window's
  predicted minus real return is set beside its latent drift and, with further Ms, beside their
  disagreement u (:func:`pessimism_fit`): does the pessimistic dream's signal see the overpayment,
  and at which lambda would it charge as much as is overpaid?
* :func:`steering_response`: does M know what steering does? Full left against full right from
  the same real states, in M's open loop and in the real environment (replayed to the state);
  :func:`steering_predictability`: how much of the data's steering the frames decide.

:func:`diagnose` computes the first two for a config's M on stored series (a row of the iterative
procedure's ``iterations.csv``: :data:`FIELDS`), and ``python -m worldmodels.diagnostics`` scores a
data dir's M on its held-out series with them and with stage 4's numbers, so that two Ms trained
otherwise on the same data (with and without scheduled sampling, another dropout) compare number
for number::

    python -m worldmodels.diagnostics --data-dir D --out m.json --figure m.png
    python -m worldmodels.diagnostics --data-dir D --ensemble D1,D2 --controller D/controller_dream_t1
    python -m worldmodels.diagnostics --data-dir D --steering 20

Episodes are dicts of a stored series (``storage.SERIES_SCHEMA``): ``mu`` (T, Z), ``action``
(T, 3), ``reward`` (T,); ``reward[t]`` is paid for ``action[t]`` taken at frame t, which is
what M's reward head predicts from (z_t, a_t). All episodes start at one frame
s = min(``start``, shortest T - 1), so that every prefix has the same length and M reads all
of them in one batch; each episode is scored over its own min(L, T - s) steps.

"M" is anything with M's step interface (``hidden_units``, ``step(z, action, (h, c))`` ->
``log_pi``, ``mu``, ``log_sigma`` (B, Z, K), ``reward`` (B,), ``state``): an ``MDNRNN`` with
a reward head, or :class:`ReplayModel`, which replays the real episodes and so has a gap of
exactly zero (the check that the bookkeeping of steps is right). M runs without dropout.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from models.controller import ACTION_SIZE
from worldmodels import storage
from worldmodels.dream import disagreement, mixture_mean, read_prefix  # noqa: F401  (mixture_mean: part of this API)

# :func:`diagnose`: the horizon of the exploit gap and of the latent error in steps after
# dream.skip_initial_frames (a tenth of an episode: long enough for the open loop to drift, short enough
# that the drift is still informative), the steps ahead reported, and the names of its numbers (columns
# of ``iterations.csv``).
HORIZON = 100
STEPS = (1, 10, 50)
# --controller: mixed into the seed of its start choice and dream, a stream apart from the iterations' repairs.
CONTROL_KEY = 0xC0DE
FIELDS = ("exploit_gap_same_actions",) + tuple(f"latent_error_{mode}_{k}" for mode in ("open", "teacher") for k in STEPS)


@dataclasses.dataclass(frozen=True)
class Batch:
    """N episodes padded to a common length, with the common start frame.

    ``mu`` (N, T, Z) and ``action`` (N, T, 3) float32, ``reward`` (N, T) float64, zero after
    an episode's end; ``lengths`` (N,) int64 frames per episode; ``start`` the frame s at
    which M leaves the real prefix (0 <= s < min(lengths)).
    """

    mu: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    lengths: np.ndarray
    start: int


def make_batch(episodes, start: int) -> Batch:
    """Pad ``episodes`` (dicts with ``mu`` (T, Z), ``action`` (T, 3), ``reward`` (T,)) into a :class:`Batch`."""
    if int(start) != start or start < 0:
        raise ValueError(f"start must be an integer >= 0, got {start!r}")
    episodes = list(episodes)
    if not episodes:
        raise ValueError("need at least one episode")
    lengths = np.array([len(e["mu"]) for e in episodes], np.int64)
    widths = {np.shape(e["mu"])[1:] for e in episodes}
    if len(widths) != 1 or min(lengths) < 1:
        raise ValueError(f"episodes must have mu of shape (T, Z), T >= 1, one Z; got widths {sorted(widths)}, "
                         f"lengths {lengths.tolist()}")
    for i, e in enumerate(episodes):
        if np.shape(e["action"]) != (lengths[i], ACTION_SIZE) or np.shape(e["reward"]) != (lengths[i],):
            raise ValueError(f"episode {i}: action must have shape (T, {ACTION_SIZE}) and reward (T,) with "
                             f"T = {lengths[i]} (its mu's), got {np.shape(e['action'])} and {np.shape(e['reward'])}")
    n, longest, z_size = len(episodes), int(lengths.max()), widths.pop()[0]
    mu = np.zeros((n, longest, z_size), np.float32)
    action = np.zeros((n, longest, ACTION_SIZE), np.float32)
    reward = np.zeros((n, longest), np.float64)
    for i, e in enumerate(episodes):
        mu[i, :lengths[i]], action[i, :lengths[i]], reward[i, :lengths[i]] = e["mu"], e["action"], e["reward"]
    return Batch(mu, action, reward, lengths, min(int(start), int(lengths.min()) - 1))


def run_from_start(model, batch: Batch, horizon: int, temperature: float | None = 1.0, seed: int = 0,
                   teacher: bool = False) -> dict[str, np.ndarray]:
    """M from its state at ``batch.start`` (after the real prefix) for ``horizon`` steps of the recorded actions.

    Step j feeds (z, a_{s+j}): z_s is V's mu at frame s; later z are M's own draws at
    ``temperature`` (stateless seed (seed, j); None feeds M's mixture mean instead), or with
    ``teacher`` V's mu of the real frame. Returns ``reward`` (N, L) M's predicted rewards,
    ``mean`` (N, L, Z) its mixture means of z_{s+j+1}, and ``valid`` (N, L) bool, true where
    step s + j is inside the episode.
    """
    import tensorflow as tf

    from models.mdn_rnn import sample_mixture

    if int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
    s, n = batch.start, len(batch.lengths)
    state = read_prefix(model, batch.mu[:, :s], batch.action[:, :s], np.full(n, s))
    steps = min(int(horizon), batch.mu.shape[1] - s)
    z = batch.mu[:, s]
    rewards, means = [], []
    for j in range(steps):
        out = model.step(z, batch.action[:, s + j], state)
        state = out["state"]
        rewards.append(np.asarray(out["reward"], np.float64))
        means.append(mixture_mean(out["log_pi"], out["mu"]))
        if teacher:
            z = batch.mu[:, min(s + j + 1, batch.mu.shape[1] - 1)]
        elif temperature is None:
            z = means[-1].astype(np.float32)
        else:
            z = sample_mixture(out["log_pi"], out["mu"], out["log_sigma"], temperature,
                               seed=tf.constant([seed, j], tf.int64)).numpy()
    valid = s + np.arange(steps)[None] < batch.lengths[:, None]
    return {"reward": np.stack(rewards, axis=1), "mean": np.stack(means, axis=1), "valid": valid}


def exploit_gap(model, episodes, start: int, horizon: int, temperature: float | None = 1.0,
                seed: int = 0) -> dict:
    """Predicted minus real return of the recorded actions from frame ``start``, over ``horizon`` steps.

    Returns ``gaps`` (N,) per episode (each over its own min(L, T - s) steps), ``predicted``
    and ``real`` (N,) the two returns, ``mean`` the mean gap, ``start`` the common start frame
    s and ``steps`` (N,) the steps scored. Arguments as :func:`run_from_start`.
    """
    batch = make_batch(episodes, start)
    run = run_from_start(model, batch, horizon, temperature, seed)
    valid, s = run["valid"], batch.start
    real = np.where(valid, batch.reward[:, s:s + valid.shape[1]], 0.0).sum(axis=1)
    predicted = np.where(valid, run["reward"], 0.0).sum(axis=1)
    gaps = predicted - real
    return {"gaps": gaps, "predicted": predicted, "real": real, "mean": float(gaps.mean()), "start": s,
            "steps": valid.sum(axis=1)}


def latent_error(model, episodes, start: int, horizon: int, temperature: float | None = 1.0,
                 seed: int = 0) -> dict:
    """Squared error of M's predicted z_{s+k} (mixture mean) against V's mu, k = 1..L steps ahead.

    Returns ``steps`` (L',) = 1..L' (L' <= L, the steps some episode reaches), ``open_loop`` and
    ``teacher_forced`` (L',): the error summed over Z, averaged over the episodes that have
    frame s + k (NaN where none has), and ``start`` the common start frame s. Open loop draws
    M's z at ``temperature`` (None: its mixture mean); teacher forcing feeds V's mu.
    """
    batch = make_batch(episodes, start)
    s = batch.start
    curves = {}
    for name, teacher in (("open_loop", False), ("teacher_forced", True)):
        run = run_from_start(model, batch, horizon, temperature, seed, teacher)
        ahead = run["mean"].shape[1]
        target = batch.mu[:, s + 1:s + 1 + ahead].astype(np.float64)
        error = np.sum(np.square(run["mean"][:, :target.shape[1]] - target), axis=-1)  # (N, L')
        has = s + 1 + np.arange(target.shape[1])[None] < batch.lengths[:, None]
        counts = has.sum(axis=0)
        with np.errstate(invalid="ignore"):
            curves[name] = np.where(counts > 0, np.where(has, error, 0.0).sum(axis=0) / counts, np.nan)
    return {"steps": np.arange(1, len(curves["open_loop"]) + 1), **curves, "start": s}


def ensemble_disagreement(models, episodes, start: int, horizon: int) -> dict:
    """The dream's pessimism signal on real data: u of M and further Ms (``models``, M >= 2) teacher-forced.

    Every model reads the real prefix, then the real frames (V's mu) and recorded actions for ``horizon`` steps
    from ``start``; u per step is :func:`worldmodels.dream.disagreement` of their mixture means of the next z.
    Returns ``steps`` (L',) = 1..L', ``u`` (L',) averaged over the episodes that reach each step, ``mean`` over
    every valid step, ``start``. What the dream's ``dream.pessimism`` charges on data the Ms have seen: a lambda is
    read against it (the charge on a driven episode is lambda x ``mean`` a step).
    """
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"need M and at least one further M, got {len(models)} model(s)")
    batch = make_batch(episodes, start)
    runs = [run_from_start(model, batch, horizon, teacher=True) for model in models]
    means = np.stack([run["mean"] for run in runs])  # (M, N, L, Z)
    count, n, steps, z_size = means.shape
    u = disagreement(means.reshape(count, n * steps, z_size)).reshape(n, steps).astype(np.float64)
    valid = runs[0]["valid"]
    reached = valid.sum(axis=0)
    keep = reached > 0
    curve = np.where(valid, u, 0.0).sum(axis=0)[keep] / reached[keep]
    return {"steps": np.arange(1, int(keep.sum()) + 1), "u": curve, "mean": float(u[valid].mean()),
            "start": batch.start}


def pessimism_fit(u, reward_gap, steps) -> dict:
    """Does the Ms' disagreement see where the dream over-pays? Windows of C's own dream against reality.

    ``u`` (N, L): the disagreement at each dream step of window c; ``reward_gap`` (N,): M's predicted minus the
    real return of the window's first ``steps[c]`` steps (the real replay may end early); only those steps of
    ``u`` count. Returns ``u`` (N,) each window's mean u, ``gap_per_step`` (N,), ``rho`` Spearman's rho of the
    two (NaN if either is constant), ``lambda_match`` = sum(gap) / sum(u): the pessimism at which the dream's
    charge on these windows equals their overpayment, and ``u_mean`` over every counted step. Windows without
    steps are left out (NaN in the per-window arrays).
    """
    u = np.asarray(u, np.float64)
    gap, steps = np.asarray(reward_gap, np.float64), np.asarray(steps, np.int64)
    if u.ndim != 2 or gap.shape != (len(u),) or steps.shape != (len(u),) or np.any(steps > u.shape[1]):
        raise ValueError(f"need u (N, L), reward_gap (N,) and steps (N,) <= L, got {u.shape}, {gap.shape}, "
                         f"{steps.shape}")
    counted = np.arange(u.shape[1])[None] < steps[:, None]
    has = steps > 0
    total = np.where(counted, u, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        window = np.where(has, total / steps, np.nan)
        per_step = np.where(has, gap / steps, np.nan)
    rho = rank_correlation(window[has], per_step[has]) if has.sum() >= 2 else math.nan
    charged = float(total[has].sum())
    return {"u": window, "gap_per_step": per_step, "rho": rho,
            "lambda_match": float(gap[has].sum()) / charged if charged > 0 else math.nan,
            "u_mean": charged / float(steps[has].sum()) if has.any() else math.nan}


def exploit_under_control(vae, rnn, params, paths, plan, driving, ensemble=()) -> dict:
    """C's own dream against reality from real states, and whether the Ms' disagreement sees the exploit.

    The measurement of ``worldmodels.repair`` without saving anything: ``plan.candidates`` windows of
    ``plan.horizon`` steps, C ``params`` (N_params,) driving in M's (``rnn``) dream from real states of the
    recorded rollouts ``paths`` (with the further Ms ``ensemble`` reading the same dream), the dream's actions
    replayed in the real environment (``driving``: a ``worldmodels.recording.Driving``). Returns the per-window
    ``rows``, ``t0``, ``steps``, ``latent``, ``reward_gap`` (N,) of ``repair.disagreement``, ``dream_return`` and
    ``real_return`` (N,), the real steps used (``env_steps``), ``rho_latent`` Spearman's rho of a window's latent
    error with its overpayment a step and, with an ensemble, :func:`pessimism_fit`'s.
    """
    from worldmodels import repair

    rows, t0 = repair.starts_of(paths, plan)
    found = repair.measure(paths, rows, t0, params, vae, rnn, plan, driving, ensemble)
    dreamed, real, measured = found["dreamed"], found["real"], found["measured"]
    counted = np.arange(plan.horizon)[None] < real["steps"][:, None]
    out = {"rows": rows, "t0": t0, "steps": real["steps"], **measured,
           "dream_return": np.where(counted, dreamed["reward"], 0.0).sum(axis=1),
           "real_return": np.where(counted, real["reward"], 0.0).sum(axis=1),
           "env_steps": int(np.sum(t0) + np.sum(real["steps"]))}
    # Does the dream's drift from reality (its z against V's of the real frames) go with the overpayment?
    has = real["steps"] > 0
    out["rho_latent"] = rank_correlation(measured["latent"][has], measured["reward_gap"][has] / real["steps"][has]) \
        if has.sum() >= 2 else math.nan
    if len(ensemble):
        out.update(pessimism_fit(dreamed["disagreement"], measured["reward_gap"], real["steps"]))
    return out


def ranks(values) -> np.ndarray:
    """Ranks 1..n of ``values`` (n,), ties given the mean of the ranks they span (float64)."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values), np.float64)
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def rank_correlation(dream_scores, real_scores) -> float:
    """Spearman's rho between the dream and real scores (n,) of n >= 2 controllers, ties averaged.

    The Pearson correlation of the ranks, in [-1, 1]; NaN when either set of scores is constant
    (no order to compare).
    """
    dream, real = np.asarray(dream_scores, np.float64), np.asarray(real_scores, np.float64)
    if dream.ndim != 1 or dream.shape != real.shape or len(dream) < 2:
        raise ValueError(f"need two score arrays of one shape (n,), n >= 2, got {dream.shape} and {real.shape}")
    if not (np.all(np.isfinite(dream)) and np.all(np.isfinite(real))):
        raise ValueError("scores must be finite")
    a, b = ranks(dream) - (len(dream) + 1) / 2, ranks(real) - (len(real) + 1) / 2
    norm = math.sqrt(float(np.sum(a * a) * np.sum(b * b)))
    return float(np.sum(a * b) / norm) if norm > 0 else math.nan


class ReplayModel:
    """A stand-in for M that replays real episodes: it predicts the recorded reward and next mu.

    Built from the same episodes (and order) that are then scored; every call must step all N
    rows, which :func:`run_from_start` does. Its state is a clock: h[:, 0] counts the steps
    since the zero state, so step t of row i returns ``reward[i, t]`` and a one-component
    mixture at ``mu[i, t + 1]`` (zero after the episode). It refuses an action that is not the
    recorded one, so a zero gap also says that the recorded actions were fed in order.
    """

    hidden_units = 1

    def __init__(self, episodes):
        self.batch = make_batch(episodes, 0)
        self.z_size = self.batch.mu.shape[2]

    def step(self, z, action, state):
        import tensorflow as tf

        h, c = (np.asarray(x, np.float32) for x in state)
        t = int(h[0, 0])
        n, longest = self.batch.mu.shape[:2]
        if len(h) != n or not np.all(h[:, 0] == t):
            raise ValueError(f"the replay steps all {n} episodes together, got {len(h)} rows or unequal clocks")
        recorded = self.batch.action[:, t] if t < longest else np.zeros((n, ACTION_SIZE), np.float32)
        if not np.array_equal(np.asarray(action, np.float32), recorded):
            raise ValueError(f"step {t}: the actions are not the recorded ones")
        following = self.batch.mu[:, t + 1] if t + 1 < longest else np.zeros((n, self.z_size), np.float32)
        reward = self.batch.reward[:, t] if t < longest else np.zeros(n)
        return {"log_pi": np.zeros((n, self.z_size, 1), np.float32), "mu": following[..., None],
                "log_sigma": np.full((n, self.z_size, 1), -30.0, np.float32), "reward": reward,
                "state": (tf.constant(h + 1.0), tf.constant(c))}


def diagnostics_figure(out, latent: dict, gaps) -> Path:
    """Two panels: M's latent error against steps ahead, open loop and teacher-forced (``latent``, the
    dict of :func:`worldmodels.diagnostics.latent_error`), and the exploit gap (N,) of each episode."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3))
    left, right = fig.subplots(1, 2)
    left.plot(latent["steps"], latent["open_loop"], "o-", ms=3, label="open loop (M's own z)")
    left.plot(latent["steps"], latent["teacher_forced"], "s--", ms=3, label="teacher-forced (V's z)")
    left.set_xlabel(f"steps ahead of frame {latent['start']}")
    left.set_ylabel("squared error of predicted z")
    left.legend(fontsize=8)
    gaps = np.asarray(gaps, np.float64)
    right.bar(np.arange(len(gaps)), gaps, color=np.where(gaps > 0, "tab:red", "tab:blue"))
    right.axhline(0.0, color="k", lw=0.8)
    right.set_xlabel("episode")
    right.set_ylabel("predicted - real return")
    right.set_title(f"exploit gap, mean {gaps.mean():+.2f}", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return storage.save_figure(fig, out)


# :func:`steering_response`: the two probes (CarRacing actions [steer, gas, brake]): full left and full right, no gas
# or brake, so that only the steering differs.
STEER_PROBES = (np.array([-1.0, 0.0, 0.0], np.float32), np.array([1.0, 0.0, 0.0], np.float32))


def steering_response(vae, model, rollouts, start: int, horizon: int, driving, batch: int = 1000) -> dict:
    """Does M know what steering does? Full left against full right from the same real states, in M and in reality.

    From frame s = min(``start``, shortest T - 1) of each recorded rollout (dicts with ``obs`` (T, 64, 64, 3),
    ``action``, ``reward``, ``seed``), M (its state after the real prefix, as the dream starts) is fed each probe of
    :data:`STEER_PROBES` for ``horizon`` steps in open loop on its mixture means, and the real environment,
    re-created at frame s by replaying the recorded prefix (``worldmodels.repair.replay``), is driven with the same
    actions. Returns ``steps`` (L,) = 1..L, ``model`` and ``real`` (L,): the squared distance summed over Z between
    the left and the right z, k steps after s (M's predicted mixture means; V's mu of the real frames), averaged
    over the rollouts whose replay reaches step k (NaN where none does), ``ratio`` = model / real, ``start`` and
    ``env_steps`` the real steps of both replays (prefixes included).
    M that reads the action predicts what was done next in its data and moves its z by steering as reality does
    (ratio ~1); M that learned the data's driver instead of the car (its actions follow from its frames) moves
    it little (ratio << 1), and then a dream pays any steering as if the driver had steered.
    """
    from worldmodels import repair

    if int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon must be a positive integer, got {horizon!r}")
    series = [{"mu": vae.encode(e["obs"], chunk_size=batch)[0], "action": e["action"], "reward": e["reward"]}
              for e in rollouts]
    s = make_batch(series, start).start
    n, horizon = len(rollouts), int(min(horizon, min(len(e["action"]) for e in rollouts) - s))
    predicted, real, reached, env_steps = [], [], [], 0
    with driving.pool(n) as pool:  # replay re-creates the tracks' states for each probe
        replays = []
        for probe in STEER_PROBES:
            replays.append(repair.replay(pool, list(rollouts), np.arange(n), np.full(n, s),
                                         np.tile(probe, (n, horizon, 1))))
    for probe, replayed in zip(STEER_PROBES, replays):
        steered = [dict(e, action=np.concatenate([e["action"][:s], np.tile(probe, (len(e["action"]) - s, 1))]))
                   for e in series]
        predicted.append(run_from_start(model, make_batch(steered, s), horizon, temperature=None)["mean"])
        mu = np.full((n, horizon, predicted[-1].shape[-1]), np.nan)
        for c, frames in enumerate(replayed["frames"]):
            if len(frames):
                mu[c, :len(frames)] = vae.encode(frames, chunk_size=batch)[0]
        real.append(mu)
        reached.append(replayed["steps"])
        env_steps += n * s + int(replayed["steps"].sum())
    valid = np.arange(horizon)[None] < np.minimum(*reached)[:, None]  # (N, L): both replays reach step k
    counts = valid.sum(axis=0)
    distance = {name: np.sum(np.square(pair[0].astype(np.float64) - pair[1]), axis=-1)
                for name, pair in (("model", predicted), ("real", real))}
    with np.errstate(invalid="ignore", divide="ignore"):
        curves = {name: np.where(counts > 0, np.where(valid, d, 0.0).sum(axis=0) / counts, np.nan)
                  for name, d in distance.items()}
        ratio = curves["model"] / curves["real"]
    return {"steps": np.arange(1, horizon + 1), **curves, "ratio": ratio, "start": s, "env_steps": env_steps}


def steering_predictability(episodes) -> float:
    """How much of the data's steering its frames decide: the held-out R^2 of a least-squares linear fit of the
    steering ``action[t, 0]`` on V's posterior mean ``mu[t]`` (plus a constant), two-fold over episodes (fit on
    one half, scored on the other, and the other way round; the pooled residual over the pooled variance).

    ``episodes``: dicts with ``mu`` (T, Z) and ``action`` (T, 3) (a single one is split into its two halves in
    time). About 1 means a driver whose steering follows from the frame (C is linear in [z, h]); M cannot then
    tell what steering does from what the frame would have done anyway. About 0: steering seen apart from the frames (random actions, lapses).
    """
    episodes = list(episodes)
    if len(episodes) == 1:
        half = len(episodes[0]["mu"]) // 2
        episodes = [{key: episodes[0][key][part] for key in ("mu", "action")}
                    for part in (slice(None, half), slice(half, None))]
    if not episodes or min(len(e["mu"]) for e in episodes) == 0:
        raise ValueError("steering_predictability needs episodes with steps")
    folds = (episodes[::2], episodes[1::2])
    design = [np.concatenate([np.c_[e["mu"], np.ones(len(e["mu"]))] for e in fold]).astype(np.float64)
              for fold in folds]
    steer = [np.concatenate([np.asarray(e["action"], np.float64)[:, 0] for e in fold]) for fold in folds]
    residual = total = 0.0
    for fit, score in ((0, 1), (1, 0)):
        weights = np.linalg.lstsq(design[fit], steer[fit], rcond=None)[0]
        residual += float(np.sum(np.square(steer[score] - design[score] @ weights)))
        total += float(np.sum(np.square(steer[score] - steer[score].mean())))
    return 1.0 - residual / total if total > 0 else float("nan")


def load_for_steering(paths, start: int, horizon: int) -> list[dict]:
    """The rollouts ``paths`` as :func:`steering_response` reads them, each cut to its first ``start + horizon + 1``
    frames (all it uses), so that many full episodes need not sit in memory at once."""
    keep = int(start) + int(horizon) + 1
    out = []
    for path in paths:
        e = storage.load_episode(path, "rollout")
        out.append({"obs": e["obs"][:keep], "action": e["action"][:keep], "reward": e["reward"][:keep],
                    "seed": e["seed"], "name": Path(path).name})
    return out


def control_figure(out, found: dict) -> Path:
    """Each window of :func:`exploit_under_control` as a point: its mean disagreement u against its overpayment a
    step (dream minus real reward), with the line lambda_match x u through the origin."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3.5))
    ax = fig.subplots()
    ax.scatter(found["u"], found["gap_per_step"], s=12, alpha=0.7)
    grid = np.linspace(0.0, np.nanmax(found["u"]), 50)
    ax.plot(grid, found["lambda_match"] * grid, "k--", lw=0.8,
            label=f"lambda_match {found['lambda_match']:.3g} x u")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("mean disagreement u of the window (latent units)")
    ax.set_ylabel("dream minus real reward a step")
    ax.set_title(f"C's own dream vs reality, Spearman rho {found['rho']:+.2f}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return storage.save_figure(fig, out)


def diagnose(cfg, rnn, paths, figure=None) -> dict:
    """The :data:`FIELDS` of M (``rnn``) on the series ``paths``, from frame ``dream.skip_initial_frames`` of ``cfg``.

    The exploit gap of the same recorded actions from the same state (M's open loop at
    ``dream.temperature``, seeded by ``iterate.seed``, over :data:`HORIZON` steps) and the latent
    error at :data:`STEPS` steps ahead (NaN past the episodes' ends); both curves and the gap per
    episode are drawn to ``figure`` (None: not drawn).
    """
    episodes = [storage.load_episode(path, "series", keys=("mu", "action", "reward")) for path in paths]
    args = (rnn, episodes, cfg.dream.skip_initial_frames, HORIZON, cfg.dream.temperature, cfg.iterate.seed)
    gap, latent = exploit_gap(*args), latent_error(*args)
    if figure is not None:
        diagnostics_figure(figure, latent, gap["gaps"])
    row = {"exploit_gap_same_actions": gap["mean"]}
    for mode, curve in (("open", latent["open_loop"]), ("teacher", latent["teacher_forced"])):
        row.update({f"latent_error_{mode}_{k}": float(curve[k - 1]) if k <= len(curve) else math.nan for k in STEPS})
    return row


def rollouts_behind(data_dir, paths, option: str) -> list[Path]:
    """The recorded rollouts (stage 1's files, whose frames a real replay needs) of the series ``paths``."""
    from worldmodels import artifacts

    rollouts = [artifacts.rollouts_dir(data_dir) / Path(p).name for p in paths]
    missing = [str(p) for p in rollouts if not p.is_file()]
    if missing:
        raise storage.MissingDataError(f"{option} replays from the recorded rollouts, and {missing[0]} is missing "
                                       f"({len(missing)} of {len(rollouts)})")
    return rollouts


def replay_driving(cfg):
    """How the diagnostics' real replays run: episodes of ``data.max_steps``, frames drawn as the recording was."""
    from worldmodels import recording

    return recording.Driving.of_config(cfg, cfg.data.max_steps, 0.0)


def steering_check(args, cfg, rnn, paths) -> dict:
    """``--steering L``: :func:`steering_response` from the rollouts behind ``paths``, printed; its numbers for the
    JSON (``steering_model_k``, ``steering_real_k``, ``steering_ratio_k`` at k in :data:`STEPS` up to L)."""
    from worldmodels import artifacts

    rollouts = load_for_steering(rollouts_behind(args.data_dir, paths, "--steering"), cfg.dream.skip_initial_frames,
                                 args.steering)
    found = steering_response(artifacts.load_vision(args.data_dir, cfg), rnn, rollouts, cfg.dream.skip_initial_frames,
                              args.steering, replay_driving(cfg), cfg.rnn.encode_batch_size)
    ahead = [k for k in dict.fromkeys(STEPS + (len(found["steps"]),)) if k <= len(found["steps"])]
    row = {f"steering_{name}_{k}": float(found[name][k - 1]) for k in ahead for name in ("model", "real", "ratio")}
    told = ", ".join(f"{k}: M {row[f'steering_model_{k}']:.2f} / real {row[f'steering_real_{k}']:.2f}"
                     for k in sorted(ahead))
    print(f"full left vs full right from frame {found['start']} of {len(rollouts)} episodes, squared distance of the "
          f"two z k steps on ({told})")
    row["steering_r2_z"] = steering_predictability(
        [storage.load_episode(path, "series", keys=("mu", "action")) for path in paths])
    print(f"the episodes' steering is {100 * row['steering_r2_z']:.0f}% predictable from the frame alone (held-out R^2 "
          "of a linear fit on z)")
    return row


def controller_check(args, cfg, rnn, others, paths) -> dict:
    """``--controller``: :func:`exploit_under_control` from the rollouts behind the series ``paths``, printed and
    drawn (beside ``--figure`` as ``<stem>_control.png``); returns its numbers for the JSON (``control_*``)."""
    from worldmodels import artifacts, repair

    rollouts = rollouts_behind(args.data_dir, paths, "--controller")
    params, _ = artifacts.load_controller(artifacts.controller_file(args.controller), "params", cfg.vae.z_size,
                                          cfg.rnn.hidden_units)
    vae = artifacts.load_vision(args.data_dir, cfg)
    plan = repair.Plan(args.windows, 1, args.horizon, cfg.dream.temperature, cfg.dream.skip_initial_frames,
                       cfg.data.max_steps, (cfg.iterate.seed, CONTROL_KEY), cfg.rnn.encode_batch_size)
    found = exploit_under_control(vae, rnn, params, rollouts, plan, replay_driving(cfg), others)
    steps = max(int(found["steps"].sum()), 1)
    row = {"control_windows": int(args.windows), "control_horizon": int(args.horizon),
           "control_dream_per_step": float(found["dream_return"].sum() / steps),
           "control_real_per_step": float(found["real_return"].sum() / steps),
           "control_latent": float(np.nanmean(found["latent"])), "control_rho_latent": found["rho_latent"],
           "control_env_steps": found["env_steps"]}
    print(f"C {args.controller} in M's dream from {args.windows} real states, {args.horizon} steps each, its actions "
          f"replayed in reality: M paid {row['control_dream_per_step']:.3f} a step, reality "
          f"{row['control_real_per_step']:.3f}; latent error {row['control_latent']:.2f} (Spearman rho with a window's "
          f"overpayment {found['rho_latent']:+.2f})")
    if others:
        row.update({"control_u": found["u_mean"], "control_rho": found["rho"],
                    "control_lambda_match": found["lambda_match"]})
        print(f"  the Ms' disagreement in C's dream {found['u_mean']:.4f} a step; Spearman rho of a window's u with its "
              f"overpayment {found['rho']:+.2f}; lambda at which the charge equals the overpayment "
              f"{found['lambda_match']:.3g}")
        if args.figure:
            control_figure(args.figure.with_name(args.figure.stem + "_control.png"), found)
    return row


def main(argv=None) -> int:
    """``python -m worldmodels.diagnostics``: a data dir's M against reality on series it did not train on.

    Stage 4's numbers (z NLL on V's sampled z, reward MSE on the tile steps, done AUC) and
    :func:`diagnose`'s, on M's held-out split by default, printed and optionally saved.
    """
    import argparse

    import config
    from worldmodels import artifacts, sequences

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, required=True, help="the data dir whose M (rnn/) is scored")
    parser.add_argument("episodes", type=Path, nargs="*", help="series files or folders (default: M's held-out split)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON")
    parser.add_argument("--figure", type=Path, help="also draw the latent error curves and the gaps (.png)")
    parser.add_argument("--ensemble", default="", help="comma-separated data dirs of further Ms (rnn/): also measure "
                        "their disagreement with M on the episodes, teacher-forced (dream.pessimism's signal)")
    parser.add_argument("--controller", type=Path, help="a stage-5 controller (controller.npz or its folder) trained "
                        "in this M: also dream it from real states of the rollouts of the episodes and replay its "
                        "dream actions in the real environment (the exploit under its own steering; with --ensemble, "
                        "whether the Ms' disagreement sees it)")
    parser.add_argument("--windows", type=int, default=64, help="--controller: real start states (default 64)")
    parser.add_argument("--horizon", type=int, default=50, help="--controller: steps dreamt and replayed (default 50)")
    parser.add_argument("--steering", type=int, default=0, help="also steer full left and full right for this many "
                        "steps from real states, in M and in the real environment: does M move z as steering does?")
    args = parser.parse_args(argv)
    folder = args.data_dir / artifacts.RNN[0]
    cfg = config.load_config(folder / artifacts.CONFIG_FILE)
    if args.episodes:
        paths = [p for where in args.episodes for p in (storage.list_episodes(where) if where.is_dir() else [where])]
    else:
        paths = [artifacts.series_dir(args.data_dir) / name
                 for name in config.read_json(folder / artifacts.SPLIT_FILE)["heldout"]]
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise storage.MissingDataError(f"no series to score M on: {', '.join(missing[:3]) or 'none given'}"
                                       + (" (run 03_generate_rnn_data.py first)" if missing else ""))
    rnn = artifacts.load_rnn(args.data_dir, cfg)
    found = sequences.evaluate_model(rnn, paths, cfg.rnn.sequence_length, cfg.rnn.batch_size, sample_seed=cfg.rnn.seed)
    found.update(diagnose(cfg, rnn, paths, args.figure))
    others = [artifacts.load_rnn(folder, cfg) for folder in artifacts.folder_list(args.ensemble)]
    if others:
        episodes = [storage.load_episode(path, "series", keys=("mu", "action", "reward")) for path in paths]
        spread = ensemble_disagreement([rnn] + others, episodes, cfg.dream.skip_initial_frames, HORIZON)
        found["disagreement_teacher"] = spread["mean"]
        print(f"disagreement of {len(others) + 1} Ms, teacher-forced over {HORIZON} steps: {spread['mean']:.4f} "
              f"(latent units; the dream's pessimism charges lambda x this a step on such data)")
    if args.controller is not None:
        found.update(controller_check(args, cfg, rnn, others, paths))
    if args.steering > 0:
        found.update(steering_check(args, cfg, rnn, paths))
    result = {"data_dir": str(args.data_dir), "episodes": [str(p) for p in paths],
              "rnn": {key: getattr(cfg.rnn, key) for key in ("dropout", "scheduled_sampling", "seed")},
              "temperature": cfg.dream.temperature, "start": cfg.dream.skip_initial_frames, "horizon": HORIZON,
              "metrics": found}
    if args.out:
        storage.atomic_write_json(args.out, result)
    latent = ", ".join(f"{k}: {found[f'latent_error_open_{k}']:.3f} open / {found[f'latent_error_teacher_{k}']:.3f} "
                       "teacher-forced" for k in STEPS)
    print(f"M of {args.data_dir} on {len(paths)} episodes: z NLL {found['z_nll']:.3f} nats/dim (sampled z), reward MSE "
          f"on tiles {found.get('reward_mse_tiles')}, done AUC {found.get('done_auc')}; predicted minus real return of "
          f"the same actions over {HORIZON} steps {found['exploit_gap_same_actions']:+.2f}; latent error k steps "
          f"ahead ({latent})")
    return 0


if __name__ == "__main__":
    from worldmodels import cli

    cli.run(main)
