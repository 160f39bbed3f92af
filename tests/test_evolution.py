"""Resumable CMA-ES: improvement, weight-decay sign, determinism, resume after an exception
and after SIGKILL, checkpoint validation and history.csv."""

import csv
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from worldmodels.evolution import (
    CHECKPOINT_NAME,
    HISTORY_FIELDS,
    HISTORY_NAME,
    Evolution,
    IncompatibleCheckpointError,
    penalised_fitness,
)
from worldmodels.storage import CorruptFileError

REPO = Path(__file__).resolve().parents[1]
N = 6
POPSIZE = 8
TARGET = np.linspace(-1.0, 1.0, N)


def noisy_quadratic(solutions, generation, rng):
    """Higher is better. The noise comes from ``rng``, so a resumed run matches only if its state is restored."""
    return -np.sum((solutions - TARGET) ** 2, axis=1) + rng.normal(scale=0.01, size=len(solutions))


def make(tmp_path, name="run", **kwargs):
    kwargs = {"popsize": POPSIZE, "seed": 3, **kwargs}
    return Evolution(kwargs.pop("num_params", N), tmp_path / name, **kwargs)


def without_elapsed(rows):
    return [{k: v for k, v in row.items() if k != "elapsed"} for row in rows]


def test_cma_improves_a_quadratic(tmp_path):
    evolution = make(tmp_path, popsize=16, sigma0=0.3)
    start = np.sum((evolution.mean - TARGET) ** 2)
    evolution.run(noisy_quadratic, 40)
    assert np.sum((evolution.mean - TARGET) ** 2) < 0.05 * start
    history = evolution.history
    assert history[-1]["mean"] > history[0]["mean"]
    assert evolution.best_fitness == max(row["best"] for row in history)
    assert -np.sum((evolution.best_solution - TARGET) ** 2) > history[0]["best"]


def test_weight_decay_penalises_large_weights(tmp_path):
    solutions = np.array([[0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_allclose(penalised_fitness([1.0, 1.0], solutions, 0.1), [1.0, 1.0 - 0.1 * 25.0])

    # With a flat fitness only the decay drives the search: it must pull the mean towards 0.
    # (The flipped sign of the old wrapper would push it away.)
    def flat(solutions, generation, rng):
        return np.zeros(len(solutions))

    x0 = np.full(N, 2.0)
    decayed = make(tmp_path, "decay", weight_decay=0.1, x0=x0, sigma0=0.3)
    plain = make(tmp_path, "plain", weight_decay=0.0, x0=x0, sigma0=0.3)
    decayed.run(flat, 30)
    plain.run(flat, 30)
    assert np.linalg.norm(decayed.mean) < 0.5 * np.linalg.norm(x0)
    assert np.linalg.norm(decayed.mean) < np.linalg.norm(plain.mean)
    with pytest.raises(ValueError, match="weight_decay"):
        make(tmp_path, "negative", weight_decay=-0.1)


def test_same_seed_same_search_and_global_rng_is_isolated(tmp_path):
    def greedy_for_global_rng(solutions, generation, rng):
        np.random.random(100)  # code under fitness_fn may use np.random; the search must not care
        return noisy_quadratic(solutions, generation, rng)

    first = make(tmp_path, "a")
    first.run(noisy_quadratic, 8)
    np.random.seed(123)
    second = make(tmp_path, "b")
    second.run(greedy_for_global_rng, 8)
    other_seed = make(tmp_path, "c", seed=4)
    other_seed.run(noisy_quadratic, 8)
    np.testing.assert_array_equal(first.mean, second.mean)
    assert not np.allclose(first.mean, other_seed.mean)

    # Evolution hands the caller's global RNG back untouched.
    np.random.seed(7)
    expected = np.random.random(3)
    np.random.seed(7)
    make(tmp_path, "d").run(lambda s, g, r: -np.sum(s**2, axis=1), 3)
    np.testing.assert_array_equal(np.random.random(3), expected)


def test_rows_checkpoint_and_history_csv(tmp_path):
    returned, rows = [], []

    def recording(solutions, generation, rng):
        assert solutions.shape == (POPSIZE, N) and generation == len(returned) + 1
        # A later checkpoint must exist only after the previous generation completed.
        assert len(rows) == generation - 1
        returned.append(noisy_quadratic(solutions, generation, rng))
        return returned[-1], {"env_steps": 10 * generation}  # extras land in the history row

    evolution = make(tmp_path)
    evolution.run(recording, 5, on_generation=rows.append)

    assert [row["generation"] for row in rows] == [1, 2, 3, 4, 5] and evolution.generation == 5
    assert rows == evolution.history
    for row, fitness in zip(rows, returned):
        assert tuple(row) == HISTORY_FIELDS
        assert (row["best"], row["mean"], row["worst"]) == (fitness.max(), fitness.mean(), fitness.min())
        assert row["std"] == pytest.approx(fitness.std())
    assert rows[-1]["sigma"] == evolution.sigma
    assert [row["env_steps"] for row in rows] == [10, 20, 30, 40, 50]
    assert all(b["elapsed"] >= a["elapsed"] > 0 for a, b in zip(rows, rows[1:]))

    with open(tmp_path / "run" / HISTORY_NAME, newline="") as f:
        table = list(csv.DictReader(f))
    assert [tuple(r) for r in table] == [HISTORY_FIELDS] * 5
    assert [{k: float(v) for k, v in r.items()} for r in table] == rows
    assert not [p for p in (tmp_path / "run").iterdir() if p.name not in (CHECKPOINT_NAME, HISTORY_NAME)]


def test_resume_after_exception_matches_uninterrupted_run(tmp_path):
    reference = make(tmp_path, "reference")
    reference.run(noisy_quadratic, 12)

    def crash_at_7(solutions, generation, rng):
        if generation == 7:
            raise KeyboardInterrupt("simulated crash")
        return noisy_quadratic(solutions, generation, rng)

    crashed = make(tmp_path, "crashed")
    with pytest.raises(KeyboardInterrupt):
        crashed.run(crash_at_7, 12)
    assert crashed.generation == 6

    resumed = make(tmp_path, "crashed")  # a new process would do exactly this
    assert resumed.generation == 6
    resumed.run(noisy_quadratic, 12)
    np.testing.assert_array_equal(resumed.mean, reference.mean)
    np.testing.assert_array_equal(resumed.best_solution, reference.best_solution)
    assert without_elapsed(resumed.history) == without_elapsed(reference.history)

    # The object that saw the exception rolled back to generation 6 and can continue too.
    crashed.run(noisy_quadratic, 12)
    np.testing.assert_array_equal(crashed.mean, reference.mean)


def test_finished_run_rerun_does_nothing(tmp_path):
    make(tmp_path).run(noisy_quadratic, 3)
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    before = checkpoint.read_bytes()

    def must_not_run(solutions, generation, rng):
        raise AssertionError("fitness_fn called on a finished run")

    again = make(tmp_path)
    again.run(must_not_run, 3)
    again.run(must_not_run, 2)  # a smaller total is already reached as well
    assert again.generation == 3 and checkpoint.read_bytes() == before


def test_bad_fitness_is_rejected_without_advancing(tmp_path):
    evolution = make(tmp_path)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        evolution.run(lambda s, g, r: np.zeros(len(s) - 1), 1)
    with pytest.raises(ValueError, match="non-finite"):
        evolution.run(lambda s, g, r: np.full(len(s), np.nan), 1)
    assert evolution.generation == 0 and not (tmp_path / "run" / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_a_checkpoint", "old_format"])
def test_damaged_checkpoint_is_reported_by_name(tmp_path, damage):
    make(tmp_path).run(noisy_quadratic, 2)
    checkpoint = tmp_path / "run" / CHECKPOINT_NAME
    data = checkpoint.read_bytes()
    if damage == "truncate":
        checkpoint.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        checkpoint.write_bytes(b"\x00not a pickle" * 10)
    elif damage == "not_a_checkpoint":
        checkpoint.write_bytes(pickle.dumps([1, 2, 3]))
    else:
        state = pickle.loads(data)
        state["format_version"] = 0
        checkpoint.write_bytes(pickle.dumps(state))
    with pytest.raises(CorruptFileError, match=re.escape(str(checkpoint))):
        make(tmp_path)


@pytest.mark.parametrize(
    "change", [{"num_params": N + 1}, {"popsize": POPSIZE + 2}, {"seed": 4}, {"weight_decay": 0.01}]
)
def test_checkpoint_with_other_settings_is_refused(tmp_path, change):
    make(tmp_path).run(noisy_quadratic, 1)
    key = next(iter(change))
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(str(tmp_path / "run" / CHECKPOINT_NAME))) as info:
        make(tmp_path, **change)
    assert key in str(info.value) and isinstance(info.value, ValueError)


SCRIPT = """
import sys, time
from test_evolution import POPSIZE, N, noisy_quadratic
from worldmodels.evolution import Evolution

def slow(solutions, generation, rng):
    time.sleep(0.03)  # leaves time to be killed between, and during, checkpoints
    return noisy_quadratic(solutions, generation, rng)

Evolution(N, sys.argv[1], popsize=POPSIZE, seed=3).run(slow, int(sys.argv[2]))
"""


def completed_generations(folder):
    history = folder / HISTORY_NAME
    return max(0, len(history.read_text().splitlines()) - 1) if history.exists() else 0


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    generations = 24
    script = tmp_path / "evolve.py"
    script.write_text(SCRIPT)
    folder = tmp_path / "killed"
    command = [sys.executable, str(script), str(folder), str(generations)]
    # The script imports the project and this test module from the repository, as pytest does.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}

    for kill_after in (3, 9):  # killed twice, each time after at least `kill_after` generations
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 60
        while completed_generations(folder) < kill_after:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the evolution script made no progress"
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL
        assert kill_after <= completed_generations(folder) < generations

    finished = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert finished.returncode == 0, finished.stderr

    resumed = Evolution(N, folder, popsize=POPSIZE, seed=3)
    reference = make(tmp_path, "reference")
    reference.run(noisy_quadratic, generations)
    assert resumed.generation == generations
    np.testing.assert_array_equal(resumed.mean, reference.mean)
    assert without_elapsed(resumed.history) == without_elapsed(reference.history)
    assert completed_generations(folder) == generations
    assert not list(folder.glob(".*.tmp"))


def test_unknown_extras_and_old_rows_without_them(tmp_path):
    with pytest.raises(ValueError, match="unknown extras"):
        make(tmp_path).run(lambda s, g, rng: (noisy_quadratic(s, g, rng), {"steps": 1}), 1)
    # Rows without extras (a fitness_fn that returns only fitness, or an older checkpoint) write nan.
    evolution = make(tmp_path / "plain")
    evolution.run(noisy_quadratic, 1)
    with open(tmp_path / "plain" / "run" / HISTORY_NAME, newline="") as f:
        assert next(csv.DictReader(f))["env_steps"] == "nan"
