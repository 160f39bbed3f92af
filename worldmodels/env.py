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

from config import CHOICES  # noqa: E402

ENV_ID = "CarRacing-v3"
FRAME_SIZE = 64
CROP_ROWS = 84  # rows 84..95 of the 96x96 observation are the dashboard
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
    env.unwrapped._render_road = types.MethodType(_render_road_culled, env.unwrapped)
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


def _build_grass_polygons() -> np.ndarray:
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


def grass_polygons() -> np.ndarray:
    """The 400 grass squares (400, 4, 2) float64, built once per process (read-only)."""
    global _GRASS
    if _GRASS is None:
        _GRASS = _build_grass_polygons()
        _GRASS.flags.writeable = False
    return _GRASS


def road_vertices(car_racing) -> np.ndarray:
    """The vertices (n, 4, 2) float64 of ``car_racing.road_poly``, in its order.

    The track's vertices are fixed for an episode, but a tile's colour changes in place when
    the car first touches it, so only the vertices are cached (per road_poly list object).
    """
    cached = getattr(car_racing, "_wm_road_cache", None)
    if cached is None or cached[0] is not car_racing.road_poly or len(cached[1]) != len(car_racing.road_poly):
        vertices = np.array([[(p[0], p[1]) for p in poly] for poly, _ in car_racing.road_poly],
                            dtype=np.float64).reshape(-1, 4, 2)
        cached = car_racing._wm_road_cache = (car_racing.road_poly, vertices)
    return cached[1]


def world_to_pixels(polygons: np.ndarray, zoom: float, translation, angle: float) -> np.ndarray:
    """World points (..., 2), e.g. polygons (n, k, 2) -> drawing-surface pixels of the same shape, as
    ``_draw_colored_polygon`` maps them (rotate by ``angle``, scale by ``zoom``, add ``translation``;
    the vertical flip comes later)."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = polygons[..., 0], polygons[..., 1]
    return np.stack([(x * c - y * s) * zoom + translation[0], (x * s + y * c) * zoom + translation[1]], axis=-1)


def _maybe_on_screen(polygons: np.ndarray, zoom: float, translation, angle: float) -> np.ndarray:
    """Indices of the polygons (n, 4, 2) that gymnasium might draw: a superset of its own test."""
    from gymnasium.envs.box2d.car_racing import MAX_SHAPE_DIM, WINDOW_H, WINDOW_W

    pixels = world_to_pixels(polygons, zoom, translation, angle)
    px, py = pixels[..., 0], pixels[..., 1]
    m = MAX_SHAPE_DIM + _CULL_MARGIN
    inside = (px >= -m) & (px <= WINDOW_W + m) & (py >= -m) & (py <= WINDOW_H + m)
    return np.flatnonzero(inside.any(axis=1))


def _render_road_culled(self, zoom, translation, angle):
    """gymnasium's ``CarRacing._render_road`` (same draws, same order) with off-screen polygons
    dropped in one numpy test; bound to each env's unwrapped CarRacing by :func:`make_env`."""
    from gymnasium.envs.box2d.car_racing import PLAYFIELD

    bounds = PLAYFIELD
    field = [(bounds, bounds), (bounds, -bounds), (-bounds, -bounds), (-bounds, bounds)]
    self._draw_colored_polygon(self.surf, field, self.bg_color, zoom, translation, angle, clip=False)

    grass = grass_polygons()
    for i in _maybe_on_screen(grass, zoom, translation, angle):
        self._draw_colored_polygon(self.surf, [tuple(p) for p in grass[i].tolist()], self.grass_color,
                                   zoom, translation, angle)

    for i in _maybe_on_screen(road_vertices(self), zoom, translation, angle):
        poly, color = self.road_poly[i]
        poly = [(p[0], p[1]) for p in poly]
        color = [int(c) for c in color]
        self._draw_colored_polygon(self.surf, poly, color, zoom, translation, angle)


def preprocess(obs: np.ndarray) -> np.ndarray:
    """Crop the dashboard and resize to 64x64, as the paper does.

    obs: uint8 (96, 96, 3) or a batch (B, 96, 96, 3) -> uint8 (64, 64, 3) or (B, 64, 64, 3).
    Resizing uses Pillow's bilinear filter, which low-pass filters when shrinking (the
    paper's ``scipy.misc.imresize`` was Pillow bilinear too). A (64, 64, 3) frame, the
    observation of ``make_env(observation="fast")``, is already preprocessed and comes back as is.
    """
    obs = np.asarray(obs)
    if obs.ndim == 4:
        return np.stack([preprocess(o) for o in obs]) if len(obs) else np.zeros((0, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    if obs.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {obs.dtype}")
    if obs.shape == (FRAME_SIZE, FRAME_SIZE, 3):
        return obs
    if obs.ndim != 3 or obs.shape[-1] != 3 or obs.shape[0] < CROP_ROWS:
        raise ValueError(f"expected a CarRacing frame of shape (96, 96, 3) or (64, 64, 3), got {obs.shape}")
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
