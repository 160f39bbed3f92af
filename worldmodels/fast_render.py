"""The agent's 64x64 CarRacing observation drawn directly at small size (``observation="fast"``).

CarRacing draws every step on a 1000 x 800 surface, flips it, shrinks it to 96 x 96 with
pygame's area-averaging ``smoothscale``, and :func:`worldmodels.drawing.preprocess` then crops
rows 0..83 (the dashboard is below) and shrinks them to 64 x 64 with Pillow's bilinear filter.
Drawing the large surface is ~95% of a step. :func:`render_observation` draws the same scene
from the same world state: the field, the grass squares and the road tiles (with their current
colours) with the same colours and in the same order, and the car through gymnasium's own
``Car.draw``, under the same camera (position, angle, zoom, including the first second's
zoom-in). It draws only the 1000 x 700 window region that survives the crop, on a canvas
``DOWNSCALE`` times smaller per side, and passes it through the same two filters (area shrink
to 96 x 84, then :func:`~worldmodels.drawing.preprocess`'s bilinear shrink to 64 x 64). So the
only difference left is where polygon edges fall on the coarser grid: a fraction of one
64-pixel, measured by ``benchmarks/parity_fast_obs.py`` and bounded in tests/test_fast_render.py.

Bound to an env by :func:`worldmodels.env.set_observation`; the physics and the rewards are
untouched, because only ``CarRacing._render("state_pixels")`` is replaced.
"""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
import pygame  # noqa: E402
from gymnasium import spaces  # noqa: E402
from gymnasium.envs.box2d.car_racing import PLAYFIELD, SCALE, STATE_W, WINDOW_H, WINDOW_W, ZOOM, CarRacing  # noqa: E402
from pygame import gfxdraw  # noqa: E402

from worldmodels.drawing import CROP_ROWS, FRAME_SIZE, grass_polygons, preprocess, road_vertices, world_to_pixels  # noqa: E402

# Chosen by measurement (a prototype of this renderer over 150 states of 2 tracks, mean |difference|
# from the stock frame in levels, drawing time per frame on the shared 2-core machine): DOWNSCALE
# 1 -> 0.03, 2.0 ms; 2 -> 0.11, 0.8 ms; 4 -> 0.28, 0.7 ms; 8 -> 1.1. At 4, shrinking the canvas
# straight to 64x64 with smoothscale gave 0.45 and with Pillow's bilinear 2.1, against 0.28 for
# the stock pipeline's two filters; at 2, gymnasium's anti-aliased outline on top of the fill gave
# 0.125 and pygame.draw.polygon 0.144, against 0.106 for gfxdraw's fill alone.
DOWNSCALE = 2
KEPT_ROWS = WINDOW_H * CROP_ROWS // STATE_W  # 700: window rows (after the flip) that the crop keeps
CANVAS = (WINDOW_W // DOWNSCALE, KEPT_ROWS // DOWNSCALE)  # (width, height) = (500, 350)
# The area shrink's target: the 96-pixel-wide state's kept rows, as in the stock pipeline.
STATE_CROP = (STATE_W, CROP_ROWS)

OBSERVATION_SPACE = spaces.Box(low=0, high=255, shape=(FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8)

_PLAYFIELD_POLYGON = np.array([[(PLAYFIELD, PLAYFIELD), (PLAYFIELD, -PLAYFIELD),
                                (-PLAYFIELD, -PLAYFIELD), (-PLAYFIELD, PLAYFIELD)]], dtype=np.float64)


def camera(car_racing: CarRacing) -> tuple[float, tuple[float, float], float]:
    """(zoom, translation, angle) of the window, computed exactly as ``CarRacing._render`` does."""
    angle = -car_racing.car.hull.angle
    # The first second zooms in from 0.1 * SCALE to ZOOM * SCALE.
    zoom = 0.1 * SCALE * max(1 - car_racing.t, 0) + ZOOM * SCALE * min(car_racing.t, 1)
    position = car_racing.car.hull.position
    scroll = pygame.math.Vector2((-position[0] * zoom, -position[1] * zoom)).rotate_rad(angle)
    return zoom, (WINDOW_W / 2 + scroll[0], WINDOW_H / 4 + scroll[1]), angle


def _scene(car_racing: CarRacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The grass squares, then the road tiles, as gymnasium draws them: vertices (n, 4, 2), centres
    (n, 2) and radii (n,) of circles around them; cached per track (road_vertices' own cache)."""
    road = road_vertices(car_racing)
    cached = car_racing.__dict__.get("_wm_scene")
    if cached is None or cached[0] is not road:
        vertices = np.concatenate([grass_polygons(), road])
        centres = vertices.mean(axis=1)
        radii = np.linalg.norm(vertices - centres[:, None], axis=-1).max(axis=1)
        cached = car_racing._wm_scene = (road, vertices, centres, radii)
    return cached[1:]


def _on_canvas(centres: np.ndarray, radii: np.ndarray, zoom: float, translation, angle: float) -> np.ndarray:
    """Indices of the polygons whose bounding circle (centres (n, 2), radii (n,)) touches the canvas
    (1-pixel margin): a superset of the polygons with a pixel on it, found without their vertices."""
    width, height = CANVAS
    pixels = world_to_pixels(centres, zoom, translation, angle)
    reach = radii * zoom + 1
    x, y = pixels[:, 0], pixels[:, 1]
    return np.flatnonzero((x + reach >= 0) & (x - reach <= width) & (y + reach >= 0) & (y - reach <= height))


def _field_covers_canvas(zoom: float, translation, angle: float) -> bool:
    """Whether the playfield square covers the whole canvas (plus a 1-pixel margin), so a plain fill
    with its colour equals drawing it: the canvas corners, mapped back to the world, lie inside it."""
    width, height = CANVAS
    corners = (np.array([(-1, -1), (width + 1, -1), (-1, height + 1), (width + 1, height + 1)], np.float64)
               - np.asarray(translation)) / zoom
    c, s = np.cos(angle), np.sin(angle)
    x = corners[:, 0] * c + corners[:, 1] * s
    y = -corners[:, 0] * s + corners[:, 1] * c
    return bool(np.all(np.abs(x) <= PLAYFIELD) and np.all(np.abs(y) <= PLAYFIELD))


def render_observation(car_racing: CarRacing) -> np.ndarray:
    """The 64x64 observation of ``car_racing``'s current state, uint8 (64, 64, 3).

    Approximates ``preprocess(car_racing._render("state_pixels"))`` (see the module docstring).
    """
    zoom, translation, angle = camera(car_racing)
    # Window pixel (X, Y) lands on canvas pixel (X / DOWNSCALE, (Y - 100) / DOWNSCALE): window
    # rows below 100 become the cropped dashboard after the flip, so they are never drawn.
    zoom /= DOWNSCALE
    translation = (translation[0] / DOWNSCALE, (translation[1] - (WINDOW_H - KEPT_ROWS)) / DOWNSCALE)
    # One canvas per env, reused at every step.
    surface = car_racing.__dict__.get("_wm_canvas")
    if surface is None:
        surface = car_racing._wm_canvas = pygame.Surface(CANVAS)

    def fill(polygons: list, colours: list) -> None:
        # Only the filled polygons: at this size gymnasium's extra anti-aliased outline widens every
        # shape by a canvas pixel (see DOWNSCALE for the measurement). Points and colours come as
        # Python lists made in one call per frame, not per polygon: with up to a hundred polygons a
        # frame, the per-polygon conversions cost nearly as much as the fills themselves.
        for points, colour in zip(polygons, colours):
            gfxdraw.filled_polygon(surface, points, colour)

    # Away from the playfield's edge the field polygon covers everything: filling the canvas is
    # the same and 20x cheaper than scanning a polygon thousands of pixels tall. Outside the
    # field the window is black, as gymnasium's fresh surface is.
    background = [int(c) for c in car_racing.bg_color]
    if _field_covers_canvas(zoom, translation, angle):
        surface.fill(background)
    else:
        surface.fill((0, 0, 0))
        fill(world_to_pixels(_PLAYFIELD_POLYGON, zoom, translation, angle).tolist(), [background])
    vertices, centres, radii = _scene(car_racing)
    visible = _on_canvas(centres, radii, zoom, translation, angle)
    # The grass squares come first in the scene, then the road tiles, whose colours are read every
    # frame, because a tile's colour changes when the car touches it.
    grass = len(grass_polygons())
    road = visible[visible >= grass] - grass
    colours = [[int(c) for c in car_racing.grass_color]] * (len(visible) - len(road))
    if len(road):
        colours += np.array([car_racing.road_poly[j][1] for j in road.tolist()]).astype(np.int64).tolist()
    fill(world_to_pixels(vertices[visible], zoom, translation, angle).tolist(), colours)
    car_racing.car.draw(surface, zoom, translation, angle, False)  # no skid marks, as in state_pixels

    # The flip comes after the shrink, on 84 rows instead of 350 (pygame's flip of the canvas cost
    # as much as all the drawing); the area shrink maps row bands symmetrically, so the two commute.
    small = pygame.transform.smoothscale(surface, STATE_CROP)
    state = np.frombuffer(pygame.image.tobytes(small, "RGB"), np.uint8).reshape(CROP_ROWS, STATE_W, 3)
    return preprocess(state[::-1])


def render(self: CarRacing, mode: str):
    """``CarRacing._render`` with its ``"state_pixels"`` observation drawn by :func:`render_observation`.

    Every other mode (``"rgb_array"`` videos, ``"human"``) is gymnasium's own drawing.
    """
    if mode != "state_pixels" or "t" not in self.__dict__:
        return CarRacing._render(self, mode)
    return render_observation(self)


# --------------------------------------------------------------------------- parity with the stock frame
# What a pixel shows, by the nearest of CarRacing's default colours (after the shrink most pixels
# are pure, and the mixed ones along edges go to the nearer colour): shared by the tests and by
# benchmarks/parity_fast_obs.py so both measure the same thing.
CLASSES = ("grass", "road", "kerb", "car")
_PALETTE = np.array([
    (102, 204, 102), (102, 230, 102),  # grass: the field and the lighter squares
    (102, 102, 102), (104, 104, 104), (107, 107, 107),  # road: the three tile shades
    (255, 255, 255), (255, 0, 0),  # kerb: white and red
    (204, 0, 0), (0, 0, 0), (77, 77, 77),  # car: hull, wheels, wheel stripes (and black off the field)
], dtype=np.int32)
_PALETTE_CLASS = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])


def classify(frames: np.ndarray) -> np.ndarray:
    """Class index into :data:`CLASSES` of every pixel: uint8 (..., 64, 64, 3) -> int8 (..., 64, 64)."""
    frames = np.asarray(frames, np.int32)
    # One palette colour at a time keeps memory at a few copies of the frames (not ten).
    nearest = np.full(frames.shape[:-1], np.iinfo(np.int32).max, np.int32)
    label = np.zeros(frames.shape[:-1], np.int8)
    for colour, index in zip(_PALETTE, _PALETTE_CLASS):
        distance = ((frames - colour) ** 2).sum(axis=-1)
        closer = distance < nearest
        nearest[closer] = distance[closer]
        label[closer] = index
    return label


def parity(fast: np.ndarray, stock: np.ndarray) -> dict:
    """How far fast frames are from stock frames of the same states, both uint8 (N, 64, 64, 3).

    Returns mean, 99th percentile and max of |difference| in intensity levels (over every
    channel of every pixel), the share of pixels that differ at all and by more than 8 levels,
    and per class of :data:`CLASSES`: the share of all pixels where the two class masks agree,
    and the masks' intersection over union.
    """
    if fast.shape != stock.shape or fast.ndim != 4:
        raise ValueError(f"expected two (N, 64, 64, 3) batches of the same shape, got {fast.shape} and {stock.shape}")
    difference = np.abs(fast.astype(np.int16) - stock.astype(np.int16))
    largest = difference.max(axis=-1)
    fast_class, stock_class = classify(fast), classify(stock)
    classes = {}
    for index, name in enumerate(CLASSES):
        a, b = fast_class == index, stock_class == index
        union = int((a | b).sum())
        classes[name] = {"agreement": float((a == b).mean()),
                         "iou": float((a & b).sum() / union) if union else 1.0,
                         "share_of_pixels": float(b.mean())}
    return {"frames": int(len(fast)), "mean": float(difference.mean()), "p99": float(np.percentile(difference, 99)),
            "max": int(difference.max()), "share_differing": float((largest > 0).mean()),
            "share_above_8": float((largest > 8).mean()), "classes": classes}
