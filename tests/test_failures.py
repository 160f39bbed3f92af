"""A failing stage ends promptly with one line naming the file or step (worldmodels/cli.py).

A Python exception inside a ``tf.py_function`` on tf.data's reader threads used to leave the
stage alive at 0% CPU with its main thread stuck in TensorFlow's ``CancelThreads`` (the
iterator was destroyed at interpreter shutdown). These tests run the real entry points in
subprocesses, with a reader patched to raise on one file, and check that the process ends
with a non-zero status, one ``error:`` line naming the file, and no traceback on screen.
"""

import subprocess
import sys
import textwrap
import time

import numpy as np

from tests.conftest import REPO
from tests.test_storage import make_rollout
import config
from worldmodels import cli, datasets, storage

# The bound: the hang it reports lasted minutes; a prompt exit takes seconds.
PROMPT_SECONDS = 30

# Makes storage.load_episode raise a SystemError (as numpy's ast did) when it decompresses BAD's
# arrays, and writes the time of the failure to FAILED_AT, so the test times the exit from there.
PATCH = """
import os, sys, threading, time
from pathlib import Path
from worldmodels import storage
_load = storage.load_episode
def load_episode(path, kind="rollout", keys=None):
    if Path(path).name == {bad!r} and keys:
        # Several reader threads may fail at once: each writes whole, then renames.
        tmp = Path({failed_at!r} + f".{{threading.get_ident()}}")
        tmp.write_text(repr(time.time()))
        os.replace(tmp, {failed_at!r})
        raise SystemError("AST constructor recursion depth mismatch (before=45, after=42)")
    return _load(path, kind, keys)
storage.load_episode = load_episode
"""


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def assert_prompt_one_line_error(proc, failed_at, *names):
    ended = time.time()
    assert proc.returncode not in (0, None), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], errors[0]
    assert failed_at.exists(), "the patched reader never ran"
    assert ended - float(failed_at.read_text()) < PROMPT_SECONDS, "the stage did not end promptly after the failure"
    return errors[0]


def test_stage_2_with_a_failing_reader_exits_promptly_naming_the_file(tmp_path):
    paths = [storage.save_episode(tmp_path / "rollouts" / storage.episode_name(i), make_rollout(T=30, seed=i))
             for i in range(4)]
    smoke = config.make_config("smoke").vae
    train, _heldout = datasets.split_episodes(paths, smoke.heldout_fraction, smoke.split_seed)
    bad, failed_at = train[-1].name, tmp_path / "failed_at"  # a training episode: the failure is in a step
    proc = run_python(PATCH.format(bad=bad, failed_at=str(failed_at)) + f"""
import runpy
sys.argv = ["02_train_vae.py", "--preset", "smoke", "--data-dir", {str(tmp_path)!r}]
runpy.run_path("02_train_vae.py", run_name="__main__")
""")
    line = assert_prompt_one_line_error(proc, failed_at, bad, "SystemError", "V training, epoch 1")
    assert proc.returncode == 1
    log = tmp_path / "logs" / "02_train_vae.log"
    assert log.is_file() and str(log) in line
    assert "SystemError" in log.read_text() and "Traceback" in log.read_text()


def test_m_windows_pipeline_with_a_failing_reader_exits_promptly_naming_the_file(tmp_path):
    # M's windows (stage 4's pipeline) under cli.run, as 04_train_rnn.py iterates them.
    T = 12
    for i in range(6):
        series = {"mu": np.zeros((T, 4), np.float32), "logvar": np.zeros((T, 4), np.float32),
                  "action": np.zeros((T, 3), np.float32), "reward": np.zeros(T, np.float32),
                  "done": np.zeros(T, bool), "seed": np.int64(i)}
        storage.save_episode(tmp_path / "series" / storage.episode_name(i), series, "series")
    bad, failed_at = storage.episode_name(4), tmp_path / "failed_at"
    proc = run_python(PATCH.format(bad=bad, failed_at=str(failed_at)) + f"""
from worldmodels import cli, sequences
def main(argv):
    paths = storage.list_episodes(Path({str(tmp_path)!r}) / "series")
    for batch in sequences.sequence_dataset(paths, 5, 2, episodes_in_flight=4, repeat=True):
        pass
cli.run(main, ["--data-dir", {str(tmp_path)!r}])
""")
    assert_prompt_one_line_error(proc, failed_at, bad, "EpisodeReadError")


def test_watchdog_ends_a_stage_whose_reader_failure_was_never_reported(tmp_path):
    failed_at = tmp_path / "failed_at"
    proc = run_python(f"""
import time
from pathlib import Path
from worldmodels import cli, storage
cli.WATCHDOG_SECONDS = 1.0
def main(argv):
    try:
        with storage.reading("episode_000007.npz"):
            Path({str(failed_at)!r}).write_text(repr(time.time()))
            raise MemoryError("out of memory")
    except storage.EpisodeReadError:
        pass  # as if the error were lost in a stuck thread
    time.sleep(120)
cli.run(main, [])
""", timeout=60)
    line = assert_prompt_one_line_error(proc, failed_at, "episode_000007.npz", "MemoryError")
    assert "did not stop by itself" in line


def test_ctrl_c_prints_the_short_message_not_a_traceback():
    proc = run_python("""
from worldmodels import cli
def main(argv):
    raise KeyboardInterrupt
cli.run(main, [])
""", timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in proc.stderr and cli.INTERRUPTED in proc.stderr


def test_a_user_error_is_one_line_with_status_2_and_a_bug_names_its_log(tmp_path):
    proc = run_python(f"""
from worldmodels import cli, storage
def main(argv):
    raise storage.MissingDataError("no rollouts folder at x")
cli.run(main, ["--data-dir", {str(tmp_path)!r}])
""", timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no rollouts folder at x"
    proc = run_python(f"""
from worldmodels import cli
def main(argv):
    raise RuntimeError("first line\\nsecond line")
cli.run(main, ["--data-dir={tmp_path}"])
""", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: RuntimeError: first line (traceback in {tmp_path / 'logs' / 'c.log'})"
    assert "second line" in (tmp_path / "logs" / "c.log").read_text()


def test_one_line_names_the_training_step_from_the_whole_chain():
    try:
        try:
            error = ValueError("boom")
            error.add_note("M training, epoch 4, step 17")
            raise error
        except ValueError as exc:
            raise storage.CorruptFileError("series/episode_000003.npz: truncated") from exc
    except storage.CorruptFileError as exc:
        line = cli.one_line(exc)
    assert line == "M training, epoch 4, step 17: series/episode_000003.npz: truncated"


def test_a_failed_worker_episode_names_itself_across_the_process_boundary(tmp_path, monkeypatch):
    import pickle

    import pytest

    from worldmodels import collect

    def broken(*args):
        raise RuntimeError("the physics engine gave up")

    monkeypatch.setattr(collect, "record_episode", broken)
    job = collect.EpisodeJob(index=5, base_seed=0, max_steps=10, policy="brownian", folder=str(tmp_path),
                             compresslevel=1)
    with pytest.raises(RuntimeError) as error:
        collect.run_job(job)
    returned = pickle.loads(pickle.dumps(error.value))  # as multiprocessing hands it back
    assert cli.one_line(returned).startswith("episode 5 (seed ") and "the physics engine gave up" in cli.one_line(returned)
