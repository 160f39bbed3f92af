"""Curiosity in ``06_iterate.py``'s collection: the collecting controller is chosen by real return plus M's surprise.

The seed report's idea: reward transitions that M predicts badly, so that the data collected
next holds what the dream gets wrong. The bonus of one step is beta times M's negative
log-likelihood of the observed transition z_t -> z_{t+1}: the mixture M's step returned from
(z_t, a_t) in the real world (:attr:`~worldmodels.rollout.RealWorld.prediction`), evaluated at the
z_{t+1} then seen, with ``models.mdn_rnn.mixture_log_prob`` (the code of M's training loss) and
averaged over the Z latent dimensions as M's ``z_nll`` is (nats per dimension). A transition counts
when both its frames are recorded (t + 1 < T: not the step that ends the episode), as in M's training.

How the bonus drives the choice (:func:`select`, per iteration with ``iterate.curiosity_variants``
K > 0): the candidates are C itself and K variants C + sigma eps (sigma = ``controller.sigma_init``,
as far from C as a first CMA generation around it); each drives one real episode of
``iterate.curiosity_steps`` steps, all on the same track with the same z and action noise, seen
through V and the previous M exactly as the collection sees it; the fitness is
return + beta * sum_t NLL_t (beta = ``iterate.curiosity``) and the fittest collects the iteration's
episodes (the dream search still starts from C).

Why variants and not a few CMA generations in the real environment with that fitness: on 2 CPU
cores real steps are the cost. The K + 1 short episodes run as one batch, (K + 1) * steps real steps
(K = 8, 200 steps: 1800, ~3% of the `small` preset's 64-episode collection); one CMA generation of
the `small` population (16 members x 2 tracks of 1000 steps) costs 32,000, half a collection, and a
few generations would cost more than the data they choose.
"""

from __future__ import annotations

import numpy as np

from worldmodels import recording, rollout

# Mixed into (iterate.seed, iteration) to seed the variants' perturbations.
VARIANT_KEY = 0xC0210


class SurpriseWorld:
    """A world that sums, per agent, M's NLL of each observed transition (module docstring).

    Wraps a :class:`~worldmodels.rollout.RealWorld` (or anything with its ``prediction``). Each
    ``reset`` starts a new wave: ``nll[w]`` (B,) float64 sums the per-dimension NLL of the
    counted transitions of wave ``w``'s agents, ``transitions[w]`` (B,) counts them.
    """

    def __init__(self, world):
        self.world = world
        self.capacity, self.z_size, self.hidden_size = world.capacity, world.z_size, world.hidden_size
        self.nll: list[np.ndarray] = []
        self.transitions: list[np.ndarray] = []

    def reset(self, seeds):
        self.nll.append(np.zeros(len(seeds)))
        self.transitions.append(np.zeros(len(seeds), np.int64))
        return self.world.reset(seeds)

    def step(self, env_actions, active):
        out = self.world.step(env_actions, active)
        (z, _), _, terminated, truncated = out
        rows, log_pi, mu, log_sigma = self.world.prediction
        going = ~(np.asarray(terminated, bool) | np.asarray(truncated, bool))[rows]
        nll = transition_nll(z[rows], log_pi, mu, log_sigma)
        self.nll[-1][rows[going]] += nll[going]
        self.transitions[-1][rows[going]] += 1
        return out


def transition_nll(z_next, log_pi, mu, log_sigma) -> np.ndarray:
    """M's NLL of ``z_next`` (n, Z) under its mixture (n, Z, K), averaged over Z: float64 (n,) nats per dimension."""
    from models.mdn_rnn import mixture_log_prob

    log_prob = mixture_log_prob(np.asarray(z_next, np.float32), log_pi, mu, log_sigma).numpy()
    return -np.mean(log_prob.astype(np.float64), axis=-1)


def variants(params: np.ndarray, count: int, sigma: float, seed) -> np.ndarray:
    """C (N,) and ``count`` perturbations C + sigma eps, eps ~ N(0, I) from ``default_rng(seed)``: (count + 1, N)."""
    params = np.asarray(params, np.float64)
    eps = np.random.default_rng(seed).standard_normal((int(count), len(params)))
    return np.concatenate([params[None], params[None] + float(sigma) * eps])


def score(world, surprise: SurpriseWorld, candidates: np.ndarray, track: int, steps: int) -> dict:
    """Drive each of ``candidates`` (P, N) for one episode of ``steps`` on ``track`` in ``world`` (which
    holds ``surprise``); returns ``returns``, ``nll`` (summed per dimension NLL), ``transitions``,
    ``lengths``: each (P,)."""
    first = len(surprise.nll)
    result = rollout.run_episodes(world, candidates, np.full((len(candidates), 1), int(track), np.int64), steps,
                                  progress="curiosity")
    return {"returns": result.returns[:, 0], "lengths": result.lengths[:, 0],
            "nll": np.concatenate(surprise.nll[first:]), "transitions": np.concatenate(surprise.transitions[first:])}


def select(params: np.ndarray, vae, rnn, driving: recording.Driving, count: int, sigma: float, beta: float,
           track: int, seed) -> dict:
    """Score C and ``count`` variants (:func:`variants` with ``seed``) on ``track`` for ``driving.max_steps``
    steps, as ``recording.drive_and_record`` drives; returns :func:`score`'s arrays plus ``candidates``
    (P, N), ``fitness`` (P,) = return + beta * nll and ``chosen`` (the fittest's index, 0 = C itself)."""
    candidates = variants(params, count, sigma, seed)
    with driving.pool(min(len(candidates), recording.WAVE)) as pool:
        surprise = SurpriseWorld(rollout.RealWorld(pool, vae, rnn, driving.z_input))
        scores = score(recording.NoisyWorld(surprise, driving.noise), surprise, candidates, track, driving.max_steps)
    fitness = scores["returns"] + float(beta) * scores["nll"]
    return {**scores, "candidates": candidates, "fitness": fitness, "chosen": np.int64(np.argmax(fitness))}
