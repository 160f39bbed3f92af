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
    env = gym.make(ENV_ID, continuous=True, max_episode_steps=max_steps, render_mode=render_mode)
    env.unwrapped._render_road = types.MethodType(_render_road_culled, env.unwrapped)
    return env


# --------------------------------------------------------------------------- faster drawing, same pixels
# CarRacing draws every observation by calling ``_draw_colored_polygon`` for each of ~730
# polygons (the field, 400 grass squares, ~300 road tiles and kerbs); that Python function
# rotates and translates the polygon vertex by vertex and then skips it if it lies far off
# screen, which ~90% do. That loop was 70% of an environment step (profiled: 6.3 of 8.7 ms).
# ``_render_road_culled`` is gymnasium 1.x's ``_render_road`` with one change: a vectorised
# numpy test first drops polygons that are certainly off screen (with a 1-pixel safety margin
# over gymnasium's own bound), and every other polygon goes through gymnasium's unchanged
# ``_draw_colored_polygon``, in the same order, which makes the exact decision and the exact
# drawing. So the pixels are identical (tested against the stock environment); only the
# wasted work is gone.

_CULL_MARGIN = 1.0  # pixels beyond gymnasium's MAX_SHAPE_DIM bound; float rounding is ~1e-12


def _grass_polygons() -> np.ndarray:
    """The 400 grass squares exactly as gymnasium's ``_render_road`` builds them, (400, 4, 2) float64."""
    from gymnasium.envs.box2d.car_racing import GRASS_DIM

    grass = []
    for x in range(-20, 20, 2):
        for y in range(-20, 20, 2):
            grass.append([
                (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + 0),
                (GRASS_DIM * x + 0, GRASS_DIM * y + 0),
                (GRASS_DIM * x + 0, GRASS_DIM * y + GRASS_DIM),
                (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + GRASS_DIM),
            ])
    return np.array(grass, dtype=np.float64)


_GRASS = None


def _maybe_on_screen(polygons: np.ndarray, zoom: float, translation, angle: float) -> np.ndarray:
    """Indices of the polygons (n, 4, 2) that gymnasium might draw: a superset of its own test."""
    from gymnasium.envs.box2d.car_racing import MAX_SHAPE_DIM, WINDOW_H, WINDOW_W

    c, s = np.cos(angle), np.sin(angle)
    x, y = polygons[..., 0], polygons[..., 1]
    px = (x * c - y * s) * zoom + translation[0]
    py = (x * s + y * c) * zoom + translation[1]
    m = MAX_SHAPE_DIM + _CULL_MARGIN
    inside = (px >= -m) & (px <= WINDOW_W + m) & (py >= -m) & (py <= WINDOW_H + m)
    return np.flatnonzero(inside.any(axis=1))


def _render_road_culled(self, zoom, translation, angle):
    """gymnasium's ``CarRacing._render_road`` (same draws, same order) with off-screen polygons
    dropped in one numpy test; bound to each env's unwrapped CarRacing by :func:`make_env`."""
    global _GRASS
    from gymnasium.envs.box2d.car_racing import PLAYFIELD

    bounds = PLAYFIELD
    field = [(bounds, bounds), (bounds, -bounds), (-bounds, -bounds), (-bounds, bounds)]
    self._draw_colored_polygon(self.surf, field, self.bg_color, zoom, translation, angle, clip=False)

    if _GRASS is None:
        _GRASS = _grass_polygons()
    for i in _maybe_on_screen(_GRASS, zoom, translation, angle):
        self._draw_colored_polygon(self.surf, [tuple(p) for p in _GRASS[i].tolist()], self.grass_color,
                                   zoom, translation, angle)

    # The track's vertices are fixed for an episode, but a tile's colour changes in place when
    # the car first touches it, so only the vertices are cached (per road_poly list object).
    cached = getattr(self, "_wm_road_cache", None)
    if cached is None or cached[0] is not self.road_poly or len(cached[1]) != len(self.road_poly):
        vertices = np.array([[(p[0], p[1]) for p in poly] for poly, _ in self.road_poly],
                            dtype=np.float64).reshape(-1, 4, 2)
        cached = self._wm_road_cache = (self.road_poly, vertices)
    for i in _maybe_on_screen(cached[1], zoom, translation, angle):
        poly, color = self.road_poly[i]
        poly = [(p[0], p[1]) for p in poly]
        color = [int(c) for c in color]
        self._draw_colored_polygon(self.surf, poly, color, zoom, translation, angle)


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


def episode_seed(base_seed: int, index: int) -> int:
    """The seed of episode ``index``: a well-mixed function of (base_seed, index), < 2**31."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0] >> 1)
