"""The CarRacing-v3 environment, frame preprocessing and the controller-to-action map.

Everything here runs headless: CarRacing draws its observations on an off-screen pygame
surface, and ``SDL_VIDEODRIVER=dummy`` keeps pygame from looking for a display even when
a human render mode is requested. This module never imports TensorFlow, so environment
worker processes stay small and start fast.
"""

from __future__ import annotations

import os
import types

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from config import CHOICES  # noqa: E402
# The drawing helpers live in worldmodels.drawing, shared with worldmodels.fast_render (which this
# module binds for observation="fast"); they are re-exported here for the modules that use them.
from worldmodels.drawing import (CROP_ROWS, FRAME_SIZE, grass_polygons, preprocess,  # noqa: E402,F401
                                 render_road_culled, road_vertices, world_to_pixels)

ENV_ID = "CarRacing-v3"
ACTION_LOW = np.array([-1.0, 0.0, 0.0], dtype=np.float32)
ACTION_HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)


# How an env draws its observation (``env.observation`` in config.py): "stock" is gymnasium's
# 96x96 state (drawn culled, identical pixels), "fast" is the 64x64 frame drawn directly by
# worldmodels.fast_render (README: "The fast observation").
OBSERVATIONS = CHOICES["env.observation"]


def check_observation(observation: str) -> None:
    """Raise ValueError naming the choices unless ``observation`` is one of :data:`OBSERVATIONS`."""
    if observation not in OBSERVATIONS:
        raise ValueError(f"unknown observation {observation!r}; choose one of {', '.join(OBSERVATIONS)}")


def make_env(max_steps: int = 1000, render_mode: str | None = None, observation: str = "stock") -> gym.Env:
    """A CarRacing-v3 env with continuous actions and a ``max_steps`` time limit.

    ``render_mode=None`` is enough for observations (they are drawn off-screen);
    ``"rgb_array"`` adds full-size frames for videos (always gymnasium's drawing).
    ``observation``: "stock" gives gymnasium's uint8 (96, 96, 3) state; "fast" gives the
    uint8 (64, 64, 3) frame that :func:`preprocess` would make of it, drawn directly at small
    size (see :func:`set_observation`). Either way, pass observations through :func:`preprocess`.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    check_observation(observation)
    env = gym.make(ENV_ID, continuous=True, max_episode_steps=max_steps, render_mode=render_mode)
    env.unwrapped._render_road = types.MethodType(render_road_culled, env.unwrapped)
    if observation != "stock":
        set_observation(env, observation)
    return env


def set_observation(env: gym.Env, observation: str) -> None:
    """Switch how ``env`` (made by :func:`make_env`) draws its observations, from its next step or reset on.

    "fast" replaces only the ``"state_pixels"`` drawing of CarRacing's ``_render`` (physics and
    rewards are untouched); "stock" restores gymnasium's own ``_render``, so the same env can
    train on fast frames and report its final score on stock ones.
    """
    check_observation(observation)
    car_racing = env.unwrapped
    stock_space = car_racing.__dict__.setdefault("_wm_stock_space", car_racing.observation_space)
    if observation == "fast":
        from worldmodels import fast_render

        car_racing._render = types.MethodType(fast_render.render, car_racing)
        car_racing.observation_space = fast_render.OBSERVATION_SPACE
    else:
        car_racing.__dict__.pop("_render", None)
        car_racing.observation_space = stock_space


def to_env_action(a: np.ndarray) -> np.ndarray:
    """Map controller outputs in [-1, 1]^3 to CarRacing's (steer, gas, brake).

    steer = a0, gas = (a1 + 1) / 2, brake = clip(a2, 0, 1). Braking only for positive a2 is
    the paper's choice; the ``(a2 + 1) / 2`` mapping of some reproductions brakes half the
    time and the car barely moves. Works on (3,) or (..., 3) arrays.
    """
    a = np.asarray(a, dtype=np.float32)
    if a.shape[-1:] != (3,):
        raise ValueError(f"controller outputs must end in a dimension of 3 (steer, gas, brake), got shape {a.shape}")
    a = np.clip(a, -1.0, 1.0)
    out = np.empty_like(a)
    out[..., 0] = a[..., 0]
    out[..., 1] = (a[..., 1] + 1.0) / 2.0
    out[..., 2] = np.clip(a[..., 2], 0.0, 1.0)
    return out


class BrownianPolicy:
    """Temporally correlated random actions: an Ornstein-Uhlenbeck process in controller space.

    Independent uniform actions make the car jitter in place (steering averages out, gas and
    brake cancel), so the recorded frames show little track. Here each controller output u
    follows ``u <- u + theta (m - u) + s N(0, 1)`` clipped to [-1, 1], with a correlation time
    of ~1/theta = 10 steps, means m = (0, 0.3, -0.6) and step noise s = (0.25, 0.2, 0.2), and is
    mapped with :func:`to_env_action`. The car therefore mostly accelerates (gas ~0.65 on
    average), steers in smooth sweeps of both signs, and brakes now and then (~10% of steps),
    so it drives far along the track, leaves it, and recovers: the varied frames V and M need.
    """

    theta = 0.1
    mean = np.array([0.0, 0.3, -0.6])
    noise = np.array([0.25, 0.2, 0.2])

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.u = self.mean.copy()

    def __call__(self) -> np.ndarray:
        self.u = np.clip(self.u + self.theta * (self.mean - self.u) + self.noise * self.rng.standard_normal(3), -1, 1)
        return to_env_action(self.u)


class UniformPolicy:
    """Independent uniform actions over CarRacing's action box (a baseline; see :class:`BrownianPolicy`)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self) -> np.ndarray:
        return self.rng.uniform(ACTION_LOW, ACTION_HIGH).astype(np.float32)


def episode_seed(base_seed: int, index: int) -> int:
    """The seed of episode ``index``: a well-mixed function of (base_seed, index), < 2**31."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0] >> 1)
