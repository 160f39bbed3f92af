"""worldmodels/storage.py: atomic writes, round-trips, and clear errors for bad files."""


import numpy as np
import pytest

from worldmodels import storage


def make_rollout(T=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.integers(0, 256, (T, 64, 64, 3), dtype=np.uint8),
        "action": rng.normal(size=(T, 3)).astype(np.float32),
        "reward": rng.normal(size=T).astype(np.float32),
        "terminated": np.zeros(T, bool),
        "truncated": np.r_[np.zeros(T - 1, bool), True],
        "seed": np.int64(seed),
    }


def test_round_trip(tmp_path):
    ep = make_rollout()
    path = storage.save_episode(tmp_path / storage.episode_name(3), ep)
    loaded = storage.load_episode(path)
    for key in ep:
        np.testing.assert_array_equal(loaded[key], ep[key])
        assert loaded[key].dtype == np.asarray(ep[key]).dtype
    assert set(storage.load_episode(path, keys=["obs"])) == {"obs"}
    assert storage.episode_index(path) == 3
    # np.load reads our files too, so users can inspect them with plain numpy.
    with np.load(path) as z:
        np.testing.assert_array_equal(z["obs"], ep["obs"])


def test_series_round_trip(tmp_path):
    T = 7
    series = {"mu": np.zeros((T, 32), np.float32), "logvar": np.zeros((T, 32), np.float32),
              "action": np.zeros((T, 3), np.float32), "reward": np.zeros(T, np.float32),
              "done": np.zeros(T, bool), "seed": np.int64(1)}
    path = storage.save_episode(tmp_path / "episode_000000.npz", series, "series")
    assert storage.load_episode(path, "series")["mu"].shape == (T, 32)


def test_truncated_file_is_reported_by_name(tmp_path):
    path = storage.save_episode(tmp_path / "episode_000000.npz", make_rollout())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(storage.CorruptFileError, match="episode_000000.npz.*truncated or corrupt"):
        storage.load_episode(path)
    assert not storage.check_episode(path)


def test_corrupt_bytes_are_reported_by_name(tmp_path):
    path = storage.save_episode(tmp_path / "episode_000001.npz", make_rollout(T=50))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(64)  # zero a block inside the compressed frames
    path.write_bytes(bytes(data))
    with pytest.raises(storage.CorruptFileError, match="episode_000001.npz"):
        storage.load_episode(path)


def test_wrong_shapes_and_missing_arrays(tmp_path):
    bad = make_rollout()
    bad["obs"] = bad["obs"][:, :32]
    np.savez(tmp_path / "a.npz", **bad)
    with pytest.raises(storage.CorruptFileError, match="'obs' has shape .*expected \\(T, 64, 64, 3\\)"):
        storage.load_episode(tmp_path / "a.npz")
    short = make_rollout()
    short["reward"] = short["reward"][:-1]
    np.savez(tmp_path / "b.npz", **short)
    with pytest.raises(storage.CorruptFileError, match="'reward' has shape"):
        storage.load_episode(tmp_path / "b.npz")
    partial = make_rollout()
    del partial["action"]
    np.savez(tmp_path / "c.npz", **partial)
    with pytest.raises(storage.CorruptFileError, match="missing arrays \\['action'\\]"):
        storage.load_episode(tmp_path / "c.npz")


def test_save_rejects_bad_arrays(tmp_path):
    ep = make_rollout()
    ep["obs"] = ep["obs"].astype(np.float32)
    with pytest.raises(ValueError, match="dtype"):
        storage.save_episode(tmp_path / "x.npz", ep)
    assert not (tmp_path / "x.npz").exists()


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(storage.MissingDataError, match="no rollouts folder.*run 01"):
        storage.list_episodes(tmp_path / "nope", "rollouts", "run 01")
    (tmp_path / "empty").mkdir()
    with pytest.raises(storage.MissingDataError, match="holds no rollouts"):
        storage.list_episodes(tmp_path / "empty", "rollouts")
    with pytest.raises(storage.MissingDataError):
        storage.load_episode(tmp_path / "nothing.npz")


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    path = tmp_path / "x.json"
    storage.atomic_write_json(path, {"a": 1})

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        storage.atomic_write(path, failing)
    assert storage.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~storage._UMASK)


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".episode_000000.npz.abc.tmp").write_bytes(b"half")
    (tmp_path / "keep.npz").write_bytes(b"x")
    assert storage.remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.npz"]


def test_corrupt_json(tmp_path):
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(storage.CorruptFileError, match="c.json is not valid JSON"):
        storage.read_json(tmp_path / "c.json")


def test_a_stopwatch_adds_up_runs_and_keeps_the_time_of_a_killed_one(tmp_path):
    import subprocess
    import sys
    import time

    path = tmp_path / "seconds.json"
    with storage.Stopwatch(path, every=0.05) as watch:
        time.sleep(0.2)
    first = storage.read_json(path)["seconds"]
    assert 0.2 <= first < 2.0 and watch.seconds == first
    # A run killed with SIGKILL (no exit handler runs) keeps what the thread saved last.
    code = (f"import time; from worldmodels import storage\n"
            f"with storage.Stopwatch({str(path)!r}, every=0.05):\n    time.sleep(60)\n")
    spawned = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", code])
    # Kill it once it has saved 0.5 s or more (polled: its start-up time on a loaded machine is unknown).
    deadline = spawned + 60.0
    while storage.read_json(path)["seconds"] < first + 0.5 and time.monotonic() < deadline:
        time.sleep(0.05)
    child.kill()
    child.wait()
    killed = storage.read_json(path)["seconds"]
    assert first + 0.5 <= killed < first + (time.monotonic() - spawned)
    with storage.Stopwatch(path, every=10.0) as watch:  # the next run starts from the saved total
        assert watch.seconds >= killed
    assert storage.read_json(path)["seconds"] >= killed
    path.write_text("{not json")  # a damaged file counts as nothing rather than stopping the work
    with storage.Stopwatch(path) as watch:
        pass
    assert watch.seconds < 1.0
