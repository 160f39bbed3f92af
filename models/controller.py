"""C: the linear controller, evaluated for a whole population of parameter vectors at once.

``a = tanh(W [z_t, h_t] + b)`` with ``z_t`` (32,) the VAE latent, ``h_t`` (256,) the LSTM
hidden state *before* it is updated with ``(z_t, a_t)``, ``W`` (3, 288) and ``b`` (3,):
867 parameters. The outputs lie in [-1, 1]; ``worldmodels.env.to_env_action`` maps them to
CarRacing's (steer, gas, brake).

This module is plain numpy on purpose: CMA-ES workers import it in fresh processes, and a
controller step for 64 members x 16 episodes is one small ``einsum`` that would cost more
as a TensorFlow call than it computes.

Flat parameter layout (the one of the paper's released code, ``carracing/model.py`` in
hardmaru/WorldModelsExperiments, so its published ``.json`` controllers load unchanged)::

    params[0:A]                      = b                      (A,)
    params[A + i * A + j]            = W[j, i]                input i, output j
    i.e. params[A:].reshape(I, A)    = W.T                    (I, A), row-major

with ``I = z_size + hidden`` inputs and ``A = action_size`` outputs: the bias comes first,
then the (inputs x outputs) weight matrix row by row, so that ``a = tanh(x @ W.T + b)``.
"""

from __future__ import annotations

import numpy as np

Z_SIZE = 32
HIDDEN_SIZE = 256
ACTION_SIZE = 3
CONTROLLER_INPUT = Z_SIZE + HIDDEN_SIZE  # 288


def num_parameters(z_size: int = Z_SIZE, hidden: int = HIDDEN_SIZE, action_size: int = ACTION_SIZE) -> int:
    """Number of controller parameters: (z_size + hidden) * action_size + action_size (867 in the paper)."""
    for name, value in (("z_size", z_size), ("hidden", hidden), ("action_size", action_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return (z_size + hidden) * action_size + action_size


NUM_PARAMETERS = num_parameters()  # 867


def unflatten(
    params, z_size: int = Z_SIZE, hidden: int = HIDDEN_SIZE, action_size: int = ACTION_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """Split flat parameters into weights and bias (layout in the module docstring).

    params: (P, N) or (N,) with N = num_parameters(z_size, hidden, action_size).
    Returns W (P, A, I) and b (P, A), or W (A, I) and b (A,) for (N,) input, as views when possible.
    """
    params = np.asarray(params)
    n = num_parameters(z_size, hidden, action_size)
    if params.ndim not in (1, 2) or params.shape[-1] != n:
        raise ValueError(
            f"controller parameters must have shape (N,) or (P, N) with N = {n} "
            f"(z_size={z_size}, hidden={hidden}, action_size={action_size}), got {params.shape}"
        )
    inputs = z_size + hidden
    bias = params[..., :action_size]
    weight = params[..., action_size:].reshape(params.shape[:-1] + (inputs, action_size))
    return np.swapaxes(weight, -1, -2), bias


def flatten(weight, bias) -> np.ndarray:
    """Inverse of :func:`unflatten`: W (..., A, I) and b (..., A) -> params (..., A + A * I)."""
    weight, bias = np.asarray(weight), np.asarray(bias)
    if weight.ndim < 2 or bias.shape != weight.shape[:-1]:
        raise ValueError(f"expected W (..., A, I) and b (..., A), got W {weight.shape} and b {bias.shape}")
    flat_weight = np.swapaxes(weight, -1, -2).reshape(weight.shape[:-2] + (-1,))
    return np.concatenate([bias, flat_weight], axis=-1)


def controller_actions(params, z, h, action_size: int = ACTION_SIZE) -> np.ndarray:
    """tanh(W [z h] + b) for P controllers, each driving K episodes, in one einsum.

    params: (P, N), z: (P, K, z_size), h: (P, K, hidden) -> actions (P, K, action_size);
    or params (N,), z (K, z_size), h (K, hidden) -> (K, action_size) for a single controller.
    z_size and hidden are read from the last axes of z and h; N must equal
    num_parameters(z_size, hidden, action_size). Actions lie in [-1, 1].
    """
    params, z, h = np.asarray(params), np.asarray(z), np.asarray(h)
    if params.ndim not in (1, 2):
        raise ValueError(f"params must have shape (N,) or (P, N), got {params.shape}")
    batch_ndim = params.ndim  # (K,) after a single controller, (P, K) after a population
    expected = "(K, features)" if params.ndim == 1 else "(P, K, features)"
    for name, value in (("z", z), ("h", h)):
        if value.ndim != batch_ndim + 1:
            raise ValueError(
                f"with params of shape {params.shape}, {name} must have shape {expected}, got {value.shape}"
            )
    if z.shape[:-1] != h.shape[:-1]:
        raise ValueError(f"z and h must agree on their leading axes, got z {z.shape} and h {h.shape}")
    if params.ndim == 2 and z.shape[0] != params.shape[0]:
        raise ValueError(f"population sizes differ: params has {params.shape[0]} members, z and h have {z.shape[0]}")
    weight, bias = unflatten(params, z.shape[-1], h.shape[-1], action_size)

    # One contraction over the 288 inputs for every (member, episode) pair; concatenating
    # [z, h] once is cheaper than two einsums because the input is tiny next to numpy's overhead.
    x = np.concatenate([z, h], axis=-1)
    dtype = np.result_type(params.dtype, x.dtype, np.float32)
    if params.ndim == 1:
        pre = np.einsum("ai,ki->ka", weight, x, dtype=dtype) + bias
    else:
        pre = np.einsum("pai,pki->pka", weight, x, dtype=dtype) + bias[:, None, :]
    return np.tanh(pre)
