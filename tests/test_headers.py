"""worldmodels/storage.py reads .npy headers without ``ast``, so tf.data's reader threads can read at once.

numpy parses a header with ``ast.literal_eval``, whose AST constructor is not thread-safe
(cpython gh-106905: ``SystemError: AST constructor recursion depth mismatch`` killed a stage-4
run); the stress test forbids ``ast`` outright, so it fails on numpy's parser whether or not
the race happens to strike.
"""

import ast
import io
import threading

import numpy as np
import pytest

from worldmodels import datasets, sequences, storage
from tests.test_storage import make_rollout

ARRAYS = [np.zeros((3, 4), np.float32), np.arange(5, dtype=np.int64), np.int64(7), np.ones((2, 3), bool),
          np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.zeros((0, 3), np.uint8), np.array(["ab", "c"])]


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
@pytest.mark.parametrize("index", range(len(ARRAYS)))
def test_read_npy_matches_numpy(index, version):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(ARRAYS[index]), version=version)
    buffer.seek(0)
    array = storage.read_npy(buffer)
    expected = np.asanyarray(ARRAYS[index])
    assert array.dtype == expected.dtype and array.shape == expected.shape
    np.testing.assert_array_equal(array, expected)
    assert array.flags.writeable


@pytest.mark.parametrize("header", [
    "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",   # objects would need pickle
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2), }",   # not a tuple
    "{'descr': '<f4', 'shape': (2,), }",                          # a key missing
    "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
    "__import__('os')",
])
def test_malformed_headers_are_refused(header):
    with pytest.raises(ValueError):
        storage._parse_header_text(header)


def test_truncated_array_data_is_an_error():
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.zeros(100, np.float32))
    with pytest.raises(EOFError):
        storage.read_npy(io.BytesIO(buffer.getvalue()[:-4]))


def test_sixteen_threads_read_headers_and_arrays_at_once_without_ast(tmp_path, monkeypatch):
    paths = [storage.save_episode(tmp_path / storage.episode_name(i), make_rollout(T=3, seed=i)) for i in range(48)]

    def forbidden(*args, **kwargs):
        raise AssertionError("ast.literal_eval is not thread-safe (cpython gh-106905) and must not parse headers")

    monkeypatch.setattr(ast, "literal_eval", forbidden)
    errors, start = [], threading.Barrier(16)

    def reader(worker):
        try:
            start.wait()
            for round_ in range(5):
                for path in paths[worker % 3::3]:
                    assert datasets.episode_length(path) == 3
                    episode = storage.load_episode(path, keys=("obs", "seed"))
                    assert int(episode["seed"]) == storage.episode_index(path)
        except BaseException as exc:  # noqa: BLE001 - every failure of a thread is the test's failure
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_series_header_reads_without_ast(tmp_path, monkeypatch):
    T = 4
    series = {"mu": np.zeros((T, 8), np.float32), "logvar": np.zeros((T, 8), np.float32),
              "action": np.zeros((T, 3), np.float32), "reward": np.zeros(T, np.float32),
              "done": np.zeros(T, bool), "seed": np.int64(0)}
    path = storage.save_episode(tmp_path / storage.episode_name(0), series, "series")
    monkeypatch.setattr(ast, "literal_eval", None)
    assert sequences.series_shape(path) == (T, 8)
    assert sequences.check_series([path], z_size=8) == [T]
