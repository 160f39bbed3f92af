"""Repairing the dream where the controller exploits it (issue #19, "A dream that transfers").

Shapes: E = recorded episodes, N = candidate starts, K = windows kept, L = the horizon
(``iterate.repair_horizon``), Z = ``z_size``, H = M's hidden units.

A controller trained in M's dream drives where M is wrong: under C's own steering the imagined
state stops tracking the car relative to the road after a few dozen steps, and C learns to
exploit that. lucid-dream-racer found the cure: replay in the simulator the actions C chose in
the dream, from the same real state, and train M on the windows where dream and reality differ
most (its dream-trained drivers went from ~250 to ~630). :func:`repair` does this for one
iteration of ``06_iterate.py`` (``worldmodels.iterate``):

1. **Starts** (:func:`choose_starts`): N pairs (recorded episode, frame t0), episode ``c % E``
   for candidate c, t0 uniform in [``dream.skip_initial_frames``, min(T - 1, max_steps - L)].
2. **The dream** (:func:`dream_from_starts`): M reads the real prefix (V's mu of frames
   0..t0-1 and the recorded actions, ``dream.read_prefix`` as the dream does), z_t0 is drawn
   from V's posterior of frame t0, and C drives L steps in M's dream at ``dream.temperature``
   (:class:`PinnedDream`, done head off): its actions (N, L, 3), dream z (N, L, Z) after each
   action and M's rewards (N, L).
3. **The real replay** (:func:`replay`): CarRacing's state cannot be set, but it is
   reproducible: the track seed plus the recorded action prefix re-create the exact real state
   at t0 (physics and drawing are deterministic; every replayed frame of the prefix is checked
   against the recording, a mismatch is an error). Then the dream's actions are applied, and
   the real frames after each are kept (the env's time limit or a crash may end a window early).
4. **Disagreement** (:func:`disagreement`): per candidate, the squared error summed over Z of
   the dream z after each action against V's mu of the real frame after it, averaged over the
   window's real steps; beside it the reward gap, M's predicted return of the window minus the
   real one (the exploit, measured under C's own steering).
5. **Saving**: the K candidates of largest disagreement (ties: the lower index) are saved as
   real episodes in stage 1's layout, tagged with the policy :data:`REPAIR_POLICY`: the recorded
   prefix (frames 0..t0 and its actions, rewards) followed by the replayed window, so that M,
   which is trained from its zero state at frame 0, reads the window in the context it had in
   the dream. The last step of a window that did not crash is marked ``truncated``. Then
   the summary of what was measured (an iteration's :data:`REPAIR_FILE`), written last.

Deterministic, so resumable: the same starts, dream seeds, V and M batches (N candidates at
once; V per episode and per window) give the same files; a call finds its work done when
its summary exists, and otherwise recomputes everything and saves only missing episodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.controller import ACTION_SIZE
from worldmodels import envpool, rollout, storage
from worldmodels.dream import DreamWorld, StartStates

REPAIR_POLICY = "repair"
REPAIR_FILE = "repair.npz"
# Mixed into the seed of the start choice, a stream apart from the others of an iteration.
START_KEY = 0x2E9A1


@dataclass(frozen=True)
class Plan:
    """What :func:`repair` does: ``candidates`` starts, of which the ``keep`` of largest disagreement are
    saved, each dreamed and replayed for ``horizon`` steps at ``temperature``, starting no earlier than frame
    ``skip`` (the dream's ``dream.skip_initial_frames``), within episodes of at most ``max_steps`` steps;
    ``seed`` seeds the start choice and the dream, ``encode_batch`` is V's batch."""

    candidates: int
    keep: int
    horizon: int
    temperature: float
    skip: int
    max_steps: int
    seed: tuple[int, ...]
    encode_batch: int = 1000

    def __post_init__(self):
        if not 1 <= self.keep <= self.candidates or self.horizon < 1 or self.max_steps < 1:
            raise ValueError(f"need 1 <= keep <= candidates, horizon >= 1, max_steps >= 1; got keep {self.keep}, "
                             f"candidates {self.candidates}, horizon {self.horizon}, max_steps {self.max_steps}")


# --------------------------------------------------------------------------- starts


def choose_starts(lengths, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """``(rows (N,), t0 (N,))`` int64: candidate c starts in recorded episode ``c % E`` (of T = ``lengths[row]``
    steps) at frame t0 uniform in [min(skip, T - 1), max(that, min(T - 1, max_steps - horizon))]."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.ndim != 1 or len(lengths) == 0 or np.any(lengths < 1):
        raise ValueError(f"need the lengths (E,) of E >= 1 recorded episodes, got {lengths}")
    rng = np.random.default_rng([*plan.seed, START_KEY])
    rows = np.arange(plan.candidates, dtype=np.int64) % len(lengths)
    t0 = np.empty(plan.candidates, np.int64)
    for c, row in enumerate(rows):
        low = min(plan.skip, lengths[row] - 1)
        high = max(low, min(lengths[row] - 1, plan.max_steps - plan.horizon))
        t0[c] = rng.integers(low, high + 1)
    return rows, t0


def start_states(vae, episodes: list[dict], rows, t0, batch: int) -> StartStates:
    """The dream's start table: row c holds V's posterior of frame ``t0[c]`` of episode ``rows[c]`` and, as
    its prefix, V's mu of frames 0..t0-1 with the recorded actions (each episode encoded in one call)."""
    mus, logvars = {}, {}
    for row in sorted(set(int(r) for r in rows)):
        mus[row], logvars[row] = vae.encode(episodes[row]["obs"], chunk_size=batch)
    steps, z_size = int(np.max(t0)), mus[int(rows[0])].shape[1]
    prefix_mu = np.zeros((len(rows), steps, z_size), np.float32)
    prefix_action = np.zeros((len(rows), steps, ACTION_SIZE), np.float32)
    for c, (row, t) in enumerate(zip(rows, t0)):
        prefix_mu[c, :t], prefix_action[c, :t] = mus[int(row)][:t], episodes[int(row)]["action"][:t]
    return StartStates(np.stack([mus[int(r)][t] for r, t in zip(rows, t0)]),
                       np.stack([logvars[int(r)][t] for r, t in zip(rows, t0)]),
                       tuple(str(episodes[int(r)].get("name", r)) for r in rows), np.asarray(t0, np.int64),
                       prefix_mu if steps else None, prefix_action if steps else None)


# --------------------------------------------------------------------------- the dream


class PinnedDream(DreamWorld):
    """A :class:`~worldmodels.dream.DreamWorld` whose episode i starts from row i of its start table (the
    dream itself draws a random row): ``reset(seeds (N,))`` dreams once from every start, z_0 drawn from
    V's posterior of the start frame and M in the state it reached on the start's prefix."""

    def begin(self, rows, rngs) -> None:
        super().begin(rows, rngs)
        rows = np.asarray(rows, np.int64).reshape(-1)
        starts = self.starts
        for row, rng in zip(rows, rngs):
            eps = rng.standard_normal(self.z_size)
            self._z[row] = starts.mu[row] + np.exp(0.5 * starts.logvar[row].astype(np.float64)) * eps
        self.start_rows[rows] = rows
        self._h[rows], self._c[rows] = self._h0[rows], self._c0[rows]
        for (h, c), (h0, c0) in zip(self._member_state, self._member0[1:]):  # an ensemble's Ms at the same starts
            h[rows], c[rows] = h0[rows], c0[rows]


class Tape:
    """A world (``worldmodels.rollout``) that records, per step, the actions it is given and the z and
    rewards its world returns, and a dream's ``disagreement`` u of its Ms (zero without an ensemble); all
    rows, ``arrays()`` stacks them to (B, steps, ...)."""

    KEYS = ("actions", "z", "reward", "disagreement")

    def __init__(self, world):
        self.world = world
        self.capacity, self.z_size, self.hidden_size = world.capacity, world.z_size, world.hidden_size
        self.reset_tape()

    def reset_tape(self) -> None:
        for key in self.KEYS:
            setattr(self, key, [])

    def reset(self, seeds):
        self.reset_tape()
        return self.world.reset(seeds)

    def step(self, env_actions, active):
        (z, h), reward, terminated, truncated = self.world.step(env_actions, active)
        self.actions.append(np.array(env_actions, np.float32))
        self.z.append(np.array(z, np.float32))
        self.reward.append(np.array(reward, np.float64))
        self.disagreement.append(np.array(getattr(self.world, "disagreement", np.zeros(len(z))), np.float64))
        return (z, h), reward, terminated, truncated

    def arrays(self) -> dict[str, np.ndarray]:
        return {key: np.stack(getattr(self, key), axis=1) for key in self.KEYS}


def dream_from_starts(rnn, starts: StartStates, params: np.ndarray, plan: Plan, ensemble=()) -> dict[str, np.ndarray]:
    """C ``params`` (N_params,) driving ``plan.horizon`` steps in M's dream from every start at once.

    Returns ``actions`` (N, L, 3) float32 (CarRacing's action space), ``z`` (N, L, Z) the dream z after
    each action, ``reward`` (N, L) M's rewards and ``disagreement`` (N, L) the u of M and the further Ms
    ``ensemble`` at each step (``worldmodels.dream.disagreement``; zeros without them; the rewards are M's
    own, no pessimism is charged). Dream episode c is seeded by ``(plan.seed, c)``.
    """
    count = len(starts)
    world = Tape(PinnedDream(rnn, starts, plan.temperature, plan.horizon, count, done="off", ensemble=list(ensemble)))
    seeds = np.random.SeedSequence([*plan.seed, START_KEY, 1]).generate_state(count, np.uint64) >> np.uint64(2)
    rollout.run_episodes(world, np.asarray(params, np.float64)[None], seeds.astype(np.int64)[None], plan.horizon)
    return world.arrays()


# --------------------------------------------------------------------------- the real replay


def _step_actions(episodes, rows, t0, actions, t: int):
    """The actions (N, 3) of replay step ``t``: the recorded prefix before t0, then the dream's."""
    out = np.zeros((len(rows), ACTION_SIZE), np.float32)
    for c, (row, start) in enumerate(zip(rows, t0)):
        out[c] = episodes[int(row)]["action"][t] if t < start else actions[c, min(t - start, actions.shape[1] - 1)]
    return out


def replay(pool, episodes: list[dict], rows, t0, actions) -> dict:
    """Re-create the real state at ``t0[c]`` of episode ``rows[c]`` and apply the dream's ``actions[c]`` (L, 3).

    ``pool``: a ``CarRacingPool`` (``num_envs`` >= N) drawing frames as the recording did. Every frame of
    the prefix (0..t0) must equal the recorded one, else ValueError. Returns ``frames``: N arrays (n_c, 64,
    64, 3) uint8 of the real frames after each applied action; ``reward`` (N, L) float32, ``terminated``
    and ``truncated`` (N, L) bool (zero past n_c), and ``steps`` (N,) the window steps n_c <= L.
    """
    rows, t0 = np.asarray(rows), np.asarray(t0)
    count, horizon = len(rows), actions.shape[1]
    frames = [[] for _ in range(count)]
    reward = np.zeros((count, horizon), np.float32)
    terminated, truncated = np.zeros((count, horizon), bool), np.zeros((count, horizon), bool)
    current = pool.reset(np.array([episodes[int(r)]["seed"] for r in rows], np.int64))
    active = np.ones(count, bool)
    for t in range(int(np.max(t0)) + horizon):
        for c in np.flatnonzero(active & (t <= t0)):
            if not np.array_equal(current[c], episodes[int(rows[c])]["obs"][t]):
                raise ValueError(f"replaying the recorded actions of episode {episodes[int(rows[c])].get('name')} "
                                 f"did not reproduce its frame {t}: the environment is not deterministic here")
        active &= t < t0 + horizon
        if not active.any():
            break
        current, r, term, trunc = pool.step(_step_actions(episodes, rows, t0, actions, t), active)
        for c in np.flatnonzero(active & (t >= t0)):
            j = t - t0[c]
            frames[c].append(current[c].copy())
            reward[c, j], terminated[c, j], truncated[c, j] = r[c], term[c], trunc[c]
        active &= ~((term | trunc) & (t >= t0))
        if np.any((term | trunc)[active & (t < t0)]):
            raise ValueError("a replayed prefix ended before its start frame: the environment is not deterministic")
    steps = np.array([len(f) for f in frames], np.int64)
    return {"frames": [np.stack(f) if f else np.zeros((0,) + envpool.FRAME_SHAPE, np.uint8) for f in frames],
            "reward": reward, "terminated": terminated, "truncated": truncated, "steps": steps}


# --------------------------------------------------------------------------- measuring and saving


def disagreement(vae, dreamed: dict, real: dict, batch: int = 1000) -> dict[str, np.ndarray]:
    """Dream against reality per candidate, over the window's n_c real steps.

    ``latent`` (N,): the mean over those steps of sum_Z (dream z - V's mu of the real frame)^2, V
    encoding each window's frames in one call (NaN for a window without steps); ``reward_gap`` (N,):
    M's predicted return of those steps minus the real one. ``dreamed`` as :func:`dream_from_starts`
    returns it, ``real`` as :func:`replay`.
    """
    count = len(real["steps"])
    latent, gap = np.full(count, np.nan), np.zeros(count)
    for c, n in enumerate(real["steps"]):
        if n == 0:
            continue
        mu, _ = vae.encode(real["frames"][c], chunk_size=batch)
        error = np.sum(np.square(dreamed["z"][c, :n].astype(np.float64) - mu.astype(np.float64)), axis=-1)
        latent[c] = float(error.mean())
        gap[c] = float(np.sum(dreamed["reward"][c, :n], dtype=np.float64) - np.sum(real["reward"][c, :n],
                                                                                 dtype=np.float64))
    return {"latent": latent, "reward_gap": gap}


def chosen(latent, keep: int) -> np.ndarray:
    """Indices (K,) of the ``keep`` largest disagreements (NaN last; ties: the lower index), ascending."""
    order = np.argsort(-np.nan_to_num(np.asarray(latent, np.float64), nan=-np.inf), kind="stable")
    return np.sort(order[:keep])


def repair_episode(episode: dict, t0: int, actions, real: dict, c: int) -> dict[str, np.ndarray]:
    """The arrays of candidate ``c``'s repair episode (stage 1's layout): the recorded prefix of ``episode``
    up to frame ``t0`` and its n_c replayed window steps, the last marked truncated unless it crashed."""
    n = int(real["steps"][c])
    truncated = real["truncated"][c, :n].copy()
    if n and not real["terminated"][c, n - 1]:
        truncated[n - 1] = True
    return {"obs": np.concatenate([episode["obs"][:t0 + 1], real["frames"][c][:max(n - 1, 0)]]),
            "action": np.concatenate([episode["action"][:t0], actions[c, :n]]).astype(np.float32),
            "reward": np.concatenate([episode["reward"][:t0], real["reward"][c, :n]]).astype(np.float32),
            "terminated": np.concatenate([episode["terminated"][:t0], real["terminated"][c, :n]]),
            "truncated": np.concatenate([episode["truncated"][:t0], truncated]),
            "seed": np.int64(episode["seed"]), "policy": np.str_(REPAIR_POLICY)}




def load_episodes(paths, rows) -> list[dict | None]:
    """The rollouts ``paths`` that ``rows`` use (the others None), each with its file ``name``."""
    used = set(int(r) for r in rows)
    return [{**storage.load_episode(p, "rollout"), "name": Path(p).name} if i in used else None
            for i, p in enumerate(paths)]


def starts_of(paths, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 on the recorded rollouts ``paths`` (E,): :func:`choose_starts` on their lengths."""
    return choose_starts([storage.array_shape(p, "action")[0] for p in paths], plan)


def measure(paths, rows, t0, params: np.ndarray, vae, rnn, plan: Plan, driving, ensemble=()) -> dict:
    """Steps 2-4 of the module docstring from the starts ``rows``, ``t0`` (N,) of :func:`starts_of` ``(paths,
    plan)``, nothing saved: the ``episodes`` they use (:func:`load_episodes`), C's dream (``dreamed``, with the
    further Ms ``ensemble`` reading it: :func:`dream_from_starts`), its ``real`` replay (:func:`replay`, in
    ``driving``'s pool) and their ``measured`` :func:`disagreement`."""
    episodes = load_episodes(paths, rows)
    dreamed = dream_from_starts(rnn, start_states(vae, episodes, rows, t0, plan.encode_batch), params, plan, ensemble)
    with driving.pool(len(rows), plan.max_steps) as pool:
        real = replay(pool, episodes, rows, t0, dreamed["actions"])
    return {"episodes": episodes, "dreamed": dreamed, "real": real,
            "measured": disagreement(vae, dreamed, real, plan.encode_batch)}


def repair(folder, summary_path, paths, first: int, params: np.ndarray, vae, rnn, plan: Plan, driving) -> dict:
    """Run steps 1-5 of the module docstring on the recorded rollouts ``paths`` (E,), saving the kept windows
    as ``folder/episode_<first + k>.npz`` (k < K) and then the summary at ``summary_path`` (done if it exists).

    ``driving``: a ``worldmodels.recording.Driving`` (the pool's backend, workers, observation, zlib level);
    ``vae``, ``rnn``: V and the M that C was trained in. Returns the summary: ``rows``, ``t0``, ``steps``,
    ``latent``, ``reward_gap`` (N,), ``chosen`` (K,) and ``env_steps`` (the real steps of every replay).
    With the summary saved but some of its kept episodes missing, the dream and the replays run again and the
    missing episodes of the saved choice are written; the summary is not rewritten.
    """
    folder, summary_path = Path(folder), Path(summary_path)
    saved = None
    if summary_path.is_file():
        with np.load(summary_path) as kept:
            saved = {key: kept[key] for key in kept.files}
        if all((folder / storage.episode_name(first + k)).exists() for k in range(len(saved["chosen"]))):
            return saved
    rows, t0 = starts_of(paths, plan)
    if saved is not None and not (np.array_equal(rows, saved["rows"]) and np.array_equal(t0, saved["t0"])):
        raise storage.CorruptFileError(
            f"{summary_path} was measured on other episodes than those in {folder} (its starts differ); delete "
            f"{summary_path} and the folder's repair episodes to repair again")
    found = measure(paths, rows, t0, params, vae, rnn, plan, driving)
    episodes, dreamed, real, measured = found["episodes"], found["dreamed"], found["real"], found["measured"]
    # A summary already measured (the repair episodes were lost, e.g. after a carry to another machine) keeps
    # its choice: the same candidates are saved again, as replayed now (on another CPU the dream's floats, and so
    # its actions, may differ in the last bits).
    keep = chosen(measured["latent"], plan.keep) if saved is None else saved["chosen"]
    for k, c in enumerate(keep):
        path = folder / storage.episode_name(first + k)
        if not path.exists():
            episode = repair_episode(episodes[int(rows[c])], int(t0[c]), dreamed["actions"], real, int(c))
            storage.save_episode(path, episode, "rollout", driving.compresslevel)
    if saved is not None:
        return saved
    summary = {"rows": rows, "t0": t0, "steps": real["steps"], **measured, "chosen": keep,
               "env_steps": np.int64(np.sum(t0) + np.sum(real["steps"]))}
    storage.save_npz(summary_path, summary)
    return summary
