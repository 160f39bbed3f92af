"""CMA-ES (ask/tell, ``cma`` package) that survives SIGKILL and resumes bit for bit.

One generation: ``solutions = ask()`` (P, N) -> ``fitness_fn(solutions, generation, rng)``
(P,), higher is better -> weight decay -> ``tell`` -> checkpoint -> ``on_generation(row)``.

Resumability. After every generation the whole search state is pickled into
``<checkpoint_dir>/evolution.pkl`` with :func:`worldmodels.storage.atomic_write_bytes`, so
the file on disk is always one complete generation. The state is the CMA object, the
generation number, both random states (CMA's and the ``np.random.Generator`` handed to
``fitness_fn``), the history and the best solution. A run killed at any moment - even in
the middle of a generation or of a write - restarts from the last complete generation and,
because it redraws the same solutions and gives ``fitness_fn`` the same ``rng`` state,
reaches exactly the CMA mean of an uninterrupted run (given a deterministic fitness_fn).

Randomness. ``cma`` draws its samples from numpy's *global* legacy RNG (``np.random``),
which anything else in the process may also consume, and pickling a CMA object silently
copies that RNG into a private one. So instead of cma's ``seed`` option we give cma a
``randn`` that always reads the global RNG, and swap in our own saved MT19937 state around
every cma call (and restore the caller's state afterwards). The search is then a function of
``seed`` alone, and whatever ``fitness_fn`` does with ``np.random`` cannot change it.

Weight decay. cma minimises, so the value told to cma is the cost
``-(fitness - weight_decay * ||theta||^2)`` with ``||theta||^2`` the sum of squares of each
solution. (estool's wrapper, used by the paper's code, added ``-decay * mean(theta^2)`` to
the already negated fitness, i.e. it rewarded large weights: the sign bug in REFERENCE.md.)
The history and ``best_solution`` report the raw fitness, the selection uses the penalised one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import pickle
import time
from pathlib import Path
from typing import Callable

import cma
import numpy as np

from worldmodels.storage import CorruptFileError, atomic_write_bytes, atomic_write_text, remove_stale_temporaries

FORMAT_VERSION = 1
CHECKPOINT_NAME = "evolution.pkl"
HISTORY_NAME = "history.csv"
HISTORY_FIELDS = ("generation", "best", "mean", "std", "worst", "sigma", "elapsed", "env_steps")
# Filled in by fitness_fn's extras (see Evolution.run); "nan" in rows of older checkpoints.
EXTRA_FIELDS = ("env_steps",)
_STATE_KEYS = frozenset(
    {"format_version", "settings", "generation", "es", "cma_random_state", "rng_state",
     "history", "best_solution", "best_fitness", "elapsed"}
)

FitnessFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


class IncompatibleCheckpointError(CorruptFileError):
    """An intact checkpoint that was made with different settings (num_params, popsize, ...)."""


def penalised_fitness(fitness, solutions, weight_decay: float) -> np.ndarray:
    """fitness (P,) - weight_decay * sum(solutions**2, axis=1), solutions (P, N): what selection maximises."""
    solutions = np.asarray(solutions, dtype=np.float64)
    return np.asarray(fitness, dtype=np.float64) - weight_decay * np.sum(solutions * solutions, axis=1)


def _global_randn(*shape) -> np.ndarray:
    """cma's sampler: standard normals from numpy's global RNG, looked up at call time.

    A module-level function pickles by name, so an unpickled CMA object keeps reading the
    global RNG (whose state :class:`Evolution` swaps in) instead of a stale private copy.
    """
    return np.random.randn(*shape)


class Evolution:
    """Resumable CMA-ES maximising ``fitness_fn`` over ``num_params``-dimensional vectors.

    Constructing it resumes from ``<checkpoint_dir>/evolution.pkl`` if that file exists
    (raising :class:`CorruptFileError` for a damaged file and
    :class:`IncompatibleCheckpointError` for one made with other settings); otherwise it
    starts a new search at ``x0`` (default zeros; ignored when resuming) with step size
    ``sigma0``. ``seed`` alone determines the search (see the module docstring).
    """

    def __init__(
        self,
        num_params: int,
        checkpoint_dir,
        *,
        popsize: int = 64,
        sigma0: float = 0.1,
        seed: int = 0,
        weight_decay: float = 0.0,
        x0=None,
    ):
        if int(num_params) != num_params or num_params < 2:
            raise ValueError(f"num_params must be an integer >= 2 (cma does not do 1-D), got {num_params!r}")
        if int(popsize) != popsize or popsize < 2:
            raise ValueError(f"popsize must be an integer >= 2, got {popsize!r}")
        if not (math.isfinite(sigma0) and sigma0 > 0):
            raise ValueError(f"sigma0 must be a positive finite number, got {sigma0!r}")
        if int(seed) != seed or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(
                f"weight_decay must be a finite number >= 0 (it penalises ||theta||^2), got {weight_decay!r}"
            )
        self.settings = {
            "num_params": int(num_params),
            "popsize": int(popsize),
            "sigma0": float(sigma0),
            "seed": int(seed),
            "weight_decay": float(weight_decay),
        }
        self.checkpoint_dir = Path(checkpoint_dir)
        self.checkpoint_path = self.checkpoint_dir / CHECKPOINT_NAME
        self.history_path = self.checkpoint_dir / HISTORY_NAME
        remove_stale_temporaries(self.checkpoint_dir)

        if self.checkpoint_path.exists():
            self._last_state = self.checkpoint_path.read_bytes()
            self._restore(self._load_state(self._last_state))
        else:
            self._restore(self._initial_state(x0))
            self._last_state = self._dump_state()

    # ------------------------------------------------------------------ public API

    @property
    def generation(self) -> int:
        """Number of completed generations (0 before the first)."""
        return self._generation

    @property
    def mean(self) -> np.ndarray:
        """Current CMA mean (N,): the solution to evaluate and deploy."""
        return np.array(self._es.mean, dtype=np.float64)

    @property
    def sigma(self) -> float:
        """Current CMA step size."""
        return float(self._es.sigma)

    @property
    def best_solution(self) -> np.ndarray | None:
        """Solution (N,) with the highest raw fitness seen so far (None before the first generation)."""
        return None if self._best_solution is None else self._best_solution.copy()

    @property
    def best_fitness(self) -> float:
        """Raw fitness of :attr:`best_solution` (-inf before the first generation)."""
        return self._best_fitness

    @property
    def history(self) -> list[dict]:
        """One row per completed generation with the keys of ``HISTORY_FIELDS``."""
        return [dict(row) for row in self._history]

    def run(
        self,
        fitness_fn: FitnessFn,
        generations: int,
        on_generation: Callable[[dict], None] | None = None,
    ) -> np.ndarray:
        """Evolve until ``generations`` generations in total are complete; returns :attr:`mean`.

        ``generations`` is a total, not an increment, so rerunning a finished (or killed) run
        with the same arguments does nothing (or only the missing generations).
        ``fitness_fn(solutions (P, N) float64, generation (1-based int), rng) -> (P,)`` must
        return finite values, higher is better; drawing episode seeds from ``rng`` keeps them
        reproducible across restarts. It may instead return ``(fitness (P,), extras)`` with
        ``extras`` a dict of :data:`EXTRA_FIELDS` (e.g. ``env_steps``, the environment steps the
        generation took), recorded in its history row and checkpointed with it.
        ``on_generation(row)`` runs after each checkpoint.
        """
        if int(generations) != generations or generations < 0:
            raise ValueError(f"generations must be an integer >= 0, got {generations!r}")
        # The history file may lag the checkpoint by one generation if a kill landed between
        # the two writes; rewriting it here makes the pair consistent again.
        if self._generation > 0:
            self._write_history()
        while self._generation < generations:
            try:
                row = self._step(fitness_fn)
            except BaseException:
                # Roll back to the last complete generation so this object behaves exactly
                # like one freshly constructed from the checkpoint (ask() consumed randomness).
                self._restore(pickle.loads(self._last_state))
                raise
            self._last_state = self._dump_state()
            atomic_write_bytes(self.checkpoint_path, self._last_state)
            self._write_history()
            if on_generation is not None:
                on_generation(dict(row))
        return self.mean

    # ------------------------------------------------------------------ one generation

    def _step(self, fitness_fn: FitnessFn) -> dict:
        start = time.perf_counter()
        generation = self._generation + 1
        with self._cma_random():
            asked = self._es.ask()
        solutions = np.array(asked, dtype=np.float64)
        # fitness_fn gets a copy so that nothing it does can alter what cma is told.
        fitness = fitness_fn(solutions.copy(), generation, self._rng)
        extras = {}
        if isinstance(fitness, tuple):
            fitness, extras = fitness
            unknown = set(extras) - set(EXTRA_FIELDS)
            if unknown:
                raise ValueError(f"fitness_fn returned unknown extras {sorted(unknown)}; known: {EXTRA_FIELDS}")
        fitness = np.asarray(fitness, dtype=np.float64)
        if fitness.shape != (len(asked),):
            raise ValueError(
                f"fitness_fn must return shape ({len(asked)},), got {fitness.shape} (generation {generation})"
            )
        if not np.all(np.isfinite(fitness)):
            raise ValueError(f"fitness_fn returned non-finite values in generation {generation}: {fitness}")

        costs = -penalised_fitness(fitness, solutions, self.settings["weight_decay"])
        with self._cma_random():
            self._es.tell(asked, costs.tolist())

        best = int(np.argmax(fitness))
        if fitness[best] > self._best_fitness:
            self._best_fitness = float(fitness[best])
            self._best_solution = solutions[best].copy()
        self._elapsed += time.perf_counter() - start
        self._generation = generation
        row = {
            "generation": generation,
            "best": float(fitness.max()),
            "mean": float(fitness.mean()),
            "std": float(fitness.std()),
            "worst": float(fitness.min()),
            "sigma": self.sigma,
            "elapsed": self._elapsed,  # seconds spent in run(), summed over restarts
            **extras,
        }
        self._history.append(row)
        return row

    @contextlib.contextmanager
    def _cma_random(self):
        """Run cma with our own global-RNG state and give the caller's state back afterwards."""
        outer = np.random.get_state()
        np.random.set_state(self._cma_random_state)
        try:
            yield
        finally:
            self._cma_random_state = np.random.get_state()
            np.random.set_state(outer)

    # ------------------------------------------------------------------ state

    def _initial_state(self, x0) -> dict:
        n = self.settings["num_params"]
        x0 = np.zeros(n) if x0 is None else np.asarray(x0, dtype=np.float64)
        if x0.shape != (n,) or not np.all(np.isfinite(x0)):
            raise ValueError(f"x0 must be a finite vector of shape ({n},), got shape {x0.shape}")
        cma_seed, fitness_seed = np.random.SeedSequence(self.settings["seed"]).spawn(2)
        options = {
            "popsize": self.settings["popsize"],
            "randn": _global_randn,
            "seed": float("nan"),  # NaN: cma leaves the global RNG alone; we seed it ourselves.
            "verbose": -9,
            "verb_log": 0,  # no outcmaes/ files in the working directory
            "verb_disp": 0,
        }
        es = cma.CMAEvolutionStrategy(x0, self.settings["sigma0"], options)
        return {
            "format_version": FORMAT_VERSION,
            "settings": dict(self.settings),
            "generation": 0,
            "es": es,
            "cma_random_state": np.random.RandomState(np.random.MT19937(cma_seed)).get_state(),
            "rng_state": np.random.default_rng(fitness_seed).bit_generator.state,
            "history": [],
            "best_solution": None,
            "best_fitness": -math.inf,
            "elapsed": 0.0,
        }

    def _dump_state(self) -> bytes:
        return pickle.dumps(
            {
                "format_version": FORMAT_VERSION,
                "settings": dict(self.settings),
                "generation": self._generation,
                "es": self._es,
                "cma_random_state": self._cma_random_state,
                "rng_state": self._rng.bit_generator.state,
                "history": self._history,
                "best_solution": self._best_solution,
                "best_fitness": self._best_fitness,
                "elapsed": self._elapsed,
            },
            protocol=pickle.HIGHEST_PROTOCOL,
        )

    def _load_state(self, data: bytes) -> dict:
        path = self.checkpoint_path
        try:
            state = pickle.loads(data)
        except Exception as exc:  # any unpickling failure means the file cannot be used
            raise CorruptFileError(
                f"{path} is not a readable evolution checkpoint ({type(exc).__name__}: {exc}); "
                "delete it to start the search again"
            ) from exc
        if not isinstance(state, dict) or not _STATE_KEYS <= state.keys():
            raise CorruptFileError(f"{path} does not contain an evolution checkpoint")
        if state["format_version"] != FORMAT_VERSION:
            raise CorruptFileError(
                f"{path} has checkpoint format {state['format_version']!r}, this code reads {FORMAT_VERSION}"
            )
        saved = state["settings"]
        differences = [f"{key}={saved.get(key)!r} (now {value!r})" for key, value in self.settings.items()
                       if saved.get(key) != value]
        if differences:
            raise IncompatibleCheckpointError(
                f"{path} was made with different settings: {', '.join(differences)}; "
                "use another checkpoint_dir or the original settings"
            )
        return state

    def _restore(self, state: dict) -> None:
        self._es = state["es"]
        self._generation = int(state["generation"])
        self._cma_random_state = state["cma_random_state"]
        self._rng = np.random.Generator(np.random.PCG64())
        self._rng.bit_generator.state = state["rng_state"]
        self._history = [dict(row) for row in state["history"]]
        self._best_solution = None if state["best_solution"] is None else np.array(state["best_solution"])
        self._best_fitness = float(state["best_fitness"])
        self._elapsed = float(state["elapsed"])

    def _write_history(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, restval="nan", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._history)
        atomic_write_text(self.history_path, buffer.getvalue())
