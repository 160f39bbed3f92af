"""The CarRacing-v3 environment, frame preprocessing and the controller-to-action map.

Everything here runs headless: CarRacing draws its observations on an off-screen pygame
surface, and ``SDL_VIDEODRIVER=dummy`` keeps pygame from looking for a display even when
a human render mode is requested. This module never imports TensorFlow, so environment
worker processes stay small and start fast.
"""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ENV_ID = "CarRacing-v3"
FRAME_SIZE = 64
CROP_ROWS = 84  # rows 84..95 of the 96x96 observation are the dashboard
ACTION_LOW = np.array([-1.0, 0.0, 0.0], dtype=np.float32)
ACTION_HIGH = np.array([1.0, 1.0, 1.0], dtype=np.float32)


def make_env(max_steps: int = 1000, render_mode: str | None = None) -> gym.Env:
    """A CarRacing-v3 env with continuous actions and a ``max_steps`` time limit.

    ``render_mode=None`` is enough for observations (they are drawn off-screen);
    ``"rgb_array"`` adds full-size frames for videos.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    return gym.make(ENV_ID, continuous=True, max_episode_steps=max_steps, render_mode=render_mode)


def preprocess(obs: np.ndarray) -> np.ndarray:
    """Crop the dashboard and resize to 64x64, as the paper does.

    obs: uint8 (96, 96, 3) or a batch (B, 96, 96, 3) -> uint8 (64, 64, 3) or (B, 64, 64, 3).
    Resizing uses Pillow's bilinear filter, which low-pass filters when shrinking (the
    paper's ``scipy.misc.imresize`` was Pillow bilinear too).
    """
    obs = np.asarray(obs)
    if obs.ndim == 4:
        return np.stack([preprocess(o) for o in obs]) if len(obs) else np.zeros((0, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    if obs.ndim != 3 or obs.shape[-1] != 3 or obs.shape[0] < CROP_ROWS:
        raise ValueError(f"expected a CarRacing frame of shape (96, 96, 3), got {obs.shape}")
    if obs.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {obs.dtype}")
    image = Image.fromarray(obs[:CROP_ROWS])
    return np.asarray(image.resize((FRAME_SIZE, FRAME_SIZE), Image.BILINEAR), dtype=np.uint8)


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


POLICIES = {"brownian": BrownianPolicy, "uniform": UniformPolicy}


def episode_seed(base_seed: int, index: int) -> int:
    """The seed of episode ``index``: a well-mixed function of (base_seed, index), < 2**31."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0] >> 1)
