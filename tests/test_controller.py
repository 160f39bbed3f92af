"""The linear controller C: parameter count, the paper's flat layout, batching, shape errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.controller import (
    CONTROLLER_INPUT,
    NUM_PARAMETERS,
    controller_actions,
    flatten,
    num_parameters,
    unflatten,
)


def test_parameter_count_matches_paper():
    assert CONTROLLER_INPUT == 288
    assert num_parameters() == NUM_PARAMETERS == 867
    assert num_parameters(z_size=32, hidden=256, action_size=3) == 867


def paper_action(flat, z, h):
    """One controller step exactly as the paper's carracing/model.py computes it."""
    bias = flat[:3]
    weight = flat[3:].reshape(CONTROLLER_INPUT, 3)
    return np.tanh(np.dot(np.concatenate([z, h]), weight) + bias)


def test_batched_actions_equal_per_agent_loop_with_paper_layout():
    rng = np.random.default_rng(0)
    population, episodes = 5, 4
    params = rng.normal(scale=0.1, size=(population, NUM_PARAMETERS))
    z = rng.normal(size=(population, episodes, 32)).astype(np.float32)
    h = rng.uniform(-1, 1, size=(population, episodes, 256)).astype(np.float32)

    actions = controller_actions(params, z, h)

    assert actions.shape == (population, episodes, 3)
    expected = np.array([[paper_action(params[p], z[p, k], h[p, k]) for k in range(episodes)]
                         for p in range(population)])
    np.testing.assert_allclose(actions, expected, rtol=1e-6, atol=1e-6)
    # A single controller with (K, ...) inputs gives its row of the population result.
    np.testing.assert_allclose(controller_actions(params[2], z[2], h[2]), actions[2], rtol=1e-6, atol=1e-6)


def test_layout_bias_first_then_weights_input_major():
    params = np.zeros(NUM_PARAMETERS)
    params[1] = 0.5  # bias of output 1
    params[3 + 40 * 3 + 2] = 0.25  # weight from input 40 (= h[8]) to output 2
    weight, bias = unflatten(params)
    assert weight.shape == (3, 288) and bias.shape == (3,)
    assert bias[1] == 0.5 and weight[2, 40] == 0.25
    assert np.count_nonzero(weight) == 1 and np.count_nonzero(bias) == 1

    z = np.zeros((1, 32))
    h = np.zeros((1, 256))
    h[0, 8] = 2.0
    np.testing.assert_allclose(controller_actions(params, z, h)[0], np.tanh([0.0, 0.5, 0.5]))


def test_unflatten_population_shapes_and_flatten_round_trip():
    params = np.random.default_rng(1).normal(size=(7, NUM_PARAMETERS))
    weight, bias = unflatten(params)
    assert weight.shape == (7, 3, 288) and bias.shape == (7, 3)
    np.testing.assert_array_equal(flatten(weight, bias), params)


def test_actions_stay_in_unit_interval_even_for_huge_weights():
    rng = np.random.default_rng(2)
    params = rng.normal(scale=100.0, size=(3, NUM_PARAMETERS))
    actions = controller_actions(params, rng.normal(size=(3, 6, 32)), rng.normal(size=(3, 6, 256)))
    assert np.all(np.abs(actions) <= 1.0)
    assert np.any(np.abs(actions) > 0.99)  # saturated, not squashed to zero


@pytest.mark.parametrize(
    "params_shape, z_shape, h_shape, message",
    [
        ((4, 866), (4, 2, 32), (4, 2, 256), "N = 867"),
        ((4, 867), (3, 2, 32), (3, 2, 256), "population sizes differ"),
        ((4, 867), (4, 2, 32), (4, 3, 256), "leading axes"),
        ((4, 867), (2, 32), (2, 256), r"\(P, K, features\)"),
        ((867,), (4, 2, 32), (4, 2, 256), r"\(K, features\)"),
        ((2, 4, 867), (2, 4, 1, 32), (2, 4, 1, 256), r"\(N,\) or \(P, N\)"),
        ((4, 867), (4, 2, 31), (4, 2, 256), "z_size=31"),
    ],
)
def test_wrong_shapes_raise_value_error(params_shape, z_shape, h_shape, message):
    with pytest.raises(ValueError, match=message):
        controller_actions(np.zeros(params_shape), np.zeros(z_shape), np.zeros(h_shape))


def test_unflatten_rejects_wrong_length():
    with pytest.raises(ValueError, match="867"):
        unflatten(np.zeros(868))


def test_module_does_not_import_tensorflow():
    # CMA-ES workers import the controller; it must stay cheap (no TensorFlow start-up).
    code = "import sys, models.controller; print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
