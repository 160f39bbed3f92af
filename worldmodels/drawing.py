"""How CarRacing-v3's observation is drawn and shrunk: the culled road drawing and ``preprocess``.

Shared by :mod:`worldmodels.env` (``make_env`` binds :func:`render_road_culled`; every stage
passes frames through :func:`preprocess`) and :mod:`worldmodels.fast_render` (the same scene
drawn at small size), so that neither imports the other's module for it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FRAME_SIZE = 64
CROP_ROWS = 84  # rows 84..95 of the 96x96 observation are the dashboard


# --------------------------------------------------------------------------- faster drawing, same pixels
# CarRacing draws every observation by calling ``_draw_colored_polygon`` for each of ~730
# polygons (the field, 400 grass squares, ~300 road tiles and kerbs); that Python function
# rotates and translates the polygon vertex by vertex and then skips it if it lies far off
# screen, which ~90% do. That loop was 70% of an environment step (profiled: 6.3 of 8.7 ms).
# ``render_road_culled`` is gymnasium 1.x's ``_render_road`` with one change: a vectorised
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


def render_road_culled(self, zoom, translation, angle):
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
