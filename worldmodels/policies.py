"""Stage 1's data policies, and the per-episode choice among them when ``data.policy`` is a mix.

* ``brownian`` and ``uniform`` (``worldmodels.env``): blind random actions. Their data show the
  road but little driving: the random car gains ~9 new tiles an episode and never leaves the
  playfield, so M trained on them never sees a tile reward worth learning or an ending.
* ``expert`` (:class:`ExpertPolicy`): a pure-pursuit driver that reads the track's centre line
  and the car's pose from the environment, with temporally correlated noise and occasional
  lapses of attention, so that it drives whole laps, leaves the road and recovers, and now and
  then leaves the playfield.
* ``controller`` (:data:`CONTROLLER_POLICY`): a trained C with V and M in the loop plus temporally
  correlated action noise (Dropout's Dream Land collects 90% of its data so). It is not built here:
  it needs TensorFlow and drives many episodes at once, so ``worldmodels.recording`` records its
  episodes in the main process, while the policies of :data:`POLICIES` run one episode per worker.

Every policy of :data:`POLICIES` is built after ``env.reset`` by ``POLICIES[name](rng, car_racing)`` and called with
no argument once per step; it returns CarRacing's action (steer, gas, brake), float32 (3,),
exactly what the environment then receives and stage 1 records. A policy only *reads* the
environment, so the physics of an episode stays a function of its seed.

A mix such as ``data.policy=expert:0.7,brownian:0.3`` gives each episode one policy, chosen by
:func:`episode_policy` from ``(data.seed, episode index)`` alone.
"""

from __future__ import annotations

import math

import numpy as np

import config
from worldmodels.env import BrownianPolicy, UniformPolicy

# Golden-ratio conjugate: the Weyl sequence frac(offset + i * phi) fills [0, 1) more evenly
# than independent draws, so every prefix of a mix holds close to the asked fractions.
_PHI = (math.sqrt(5.0) - 1.0) / 2.0
# Spawn key of the stream that offsets the policy sequence, apart from the episodes' own seeds.
_POLICY_STREAM = 0x9011C7


class ExpertPolicy:
    """A pure-pursuit driver on CarRacing's centre line, with correlated noise and lapses.

    Steering aims the car at the centre-line point a speed-dependent distance ahead of the
    nearest one (pure pursuit); the throttle holds a target speed low enough to take every bend
    of the next tiles (see :meth:`_safe_speed`). On the grass it drives slowly and it lets go
    of the gas when the car spins, so it finds its way back to the road. With ``noise=0`` it is
    deterministic and drives clean laps (all 20 tracks of ``benchmarks/bench_expert.py``).

    ``noise`` scales three disturbances, all drawn from ``rng``; each episode draws its own
    level uniformly between 0 and ``noise``:

    * an Ornstein-Uhlenbeck offset of the aim point across the road (correlation time ~50
      steps, 4 units at level 1; the road is 13.3 wide), so the car weaves and, in bends, runs
      onto the grass and comes back;
    * an Ornstein-Uhlenbeck factor on the target speed (correlation time ~100 steps), so it
      sometimes enters a bend too fast and leaves the road;
    * lapses: with a small chance per step the driver stops looking at the road for an
      exponentially distributed number of steps (mean ``lapse_steps``), holding a fixed
      steering and throttle; a share of them are long (mean ``long_lapse_steps``). They end on
      the grass or in a spin, and the pursuit brings the car back. A long one can carry it off
      the playfield (CarRacing's -100 and the episode's end), but rarely: none of the 20
      episodes of ``benchmarks/bench_expert.py`` at the default noise did; the done head sees
      endings mostly as finished laps.
    """

    lookahead_min = 6.0     # world units (a tile is 3.5 long, the road 13.3 wide)
    lookahead_per_speed = 0.25  # extra look-ahead per unit/s of speed
    wheelbase = 3.24        # distance between the car's axles in world units (CarRacing's car)
    speed_max = 100.0       # target speed on a straight, units/s
    speed_min = 20.0        # target speed in the sharpest bend
    bend_tiles = 30         # tiles ahead whose bends set the target speed
    grip = 120.0            # lateral acceleration the driver allows itself in a bend, units/s^2
    braking = 60.0          # deceleration it counts on before a bend, units/s^2
    gas_gain = 0.1          # gas per unit/s below the target speed
    brake_gain = 0.05       # brake per unit/s above the target speed (plus a margin)
    road_half_width = 6.67  # CarRacing's TRACK_WIDTH: centre line to road edge
    # Beyond this distance from the nearest centre-line point the car is on the grass (a wide
    # line through a bend takes it ~9 units out, its wheels still on the road and kerb).
    grass_distance = 10.0
    grass_speed, grass_gas = 25.0, 0.3  # target speed and gas limit on the grass
    # The car spins when it turns faster than ``spin_rate + speed / spin_radius`` (rad/s): on a
    # circle much tighter than its wheels' smallest (~8 units), which steering alone never gives.
    spin_rate, spin_radius = 1.0, 4.0
    aim_theta, aim_sigma = 0.02, 0.8  # the aim's drift: stationary std 4 units at noise 1
    speed_theta, speed_sigma = 0.01, 0.03
    lapse_rate = 0.002      # chance per step of a lapse, at noise 1
    lapse_steps = 40.0      # mean length of a lapse in steps
    long_lapse_share, long_lapse_steps = 0.3, 200.0  # how many lapses are long, and their mean length

    def __init__(self, rng: np.random.Generator, car_racing, noise: float = 1.0):
        if noise < 0:
            raise ValueError(f"the expert's noise scale must be >= 0, got {noise}")
        track = np.asarray(car_racing.track, dtype=np.float64)
        if track.ndim != 2 or track.shape[1] != 4 or len(track) < self.bend_tiles + 2:
            raise ValueError("the expert needs a reset CarRacing env whose track is (alpha, beta, x, y) per tile")
        self.rng, self.env = rng, car_racing
        # Each episode drives at its own noise level, from clean laps to a messy drive, so a data
        # set holds finished laps as well as excursions and crashes.
        self.noise = float(noise) * rng.uniform() if noise > 0 else 0.0
        self.points = track[:, 2:4]
        # The unwrapped heading of the centre line, so differences across the +-pi seam stay small.
        self.heading = np.unwrap(track[:, 1])
        self.normals = np.stack([np.cos(track[:, 1]), np.sin(track[:, 1])], axis=1)
        self.spacing = float(np.mean(np.linalg.norm(np.diff(self.points, axis=0), axis=1)))
        self.tile = None
        self.aim_offset = 0.0
        self.last_steer = 0.0
        self.speed_factor = 0.0
        self.lapse_left = 0
        self.lapse_action = np.zeros(3, dtype=np.float32)

    # ----------------------------------------------------------------- reading the state

    def _nearest_tile(self, position: np.ndarray) -> int:
        """Index of the centre-line point nearest the car, searched just around the last one.

        A local search keeps the driver on its own lap where the track passes close to itself;
        more than 60 units from it (after a lapse) the whole track is searched.
        """
        n = len(self.points)
        if self.tile is not None:
            window = (self.tile + np.arange(-5, 40)) % n
            d = np.linalg.norm(self.points[window] - position, axis=1)
            if d.min() < 60.0:
                return int(window[np.argmin(d)])
        return int(np.argmin(np.linalg.norm(self.points - position, axis=1)))

    def _safe_speed(self, tile: int) -> float:
        """The fastest speed from which the car can still take every bend in the next ``bend_tiles``.

        Each tile ahead allows ``sqrt(grip / curvature)`` (curvature: the centre line's heading
        change across 4 tile lengths, per unit length), and a tile ``d`` ahead can be reached braking at
        ``braking`` units/s^2, so it allows ``sqrt(v^2 + 2 braking d)`` now.
        """
        n = len(self.points)
        ahead = tile + np.arange(0, self.bend_tiles)
        # Across the start line the unwrapped heading gains one full turn per lap.
        turn = self.heading[-1] - self.heading[0] + (self.heading[1] - self.heading[0])
        heading = lambda i: self.heading[i % n] + (i // n) * turn  # noqa: E731
        curvature = np.abs(heading(ahead + 2) - heading(ahead - 2)) / (4 * self.spacing) + 1e-6
        corner = np.sqrt(self.grip / curvature)
        distance = np.arange(self.bend_tiles) * self.spacing
        return float(np.min(np.sqrt(corner ** 2 + 2 * self.braking * distance)))

    # ----------------------------------------------------------------- acting

    def __call__(self) -> np.ndarray:
        hull = self.env.car.hull
        position = np.array(hull.position, dtype=np.float64)
        speed = float(np.hypot(*hull.linearVelocity))
        self.tile = self._nearest_tile(position)
        self._update_noise()
        if self.lapse_left > 0:
            self.lapse_left -= 1
            return self.lapse_action.copy()

        # Pure pursuit: aim at the centre-line point a look-ahead arc length beyond the nearest
        # one. Off the road the look-ahead grows with the distance to the road, so the car joins
        # it at a shallow angle instead of crossing it and weaving from side to side.
        off_road = float(np.linalg.norm(self.points[self.tile] - position))
        lookahead = self.lookahead_min + self.lookahead_per_speed * speed + 2.0 * max(0.0, off_road - self.road_half_width)
        target_tile = (self.tile + max(1, round(lookahead / self.spacing))) % len(self.points)
        # The noisy driver aims beside the centre line, along the road's normal (cos beta, sin beta).
        target = self.points[target_tile] + self.aim_offset * self.normals[target_tile]
        # The car's forward vector is its body's +y axis: (-sin a, cos a) in the world.
        dx, dy = target - position
        error = math.atan2(dy, dx) - (hull.angle + math.pi / 2)
        error = (error + math.pi) % (2 * math.pi) - math.pi
        # Pure pursuit's steering angle for a look-ahead point at angle ``error`` and distance
        # ``lookahead``, as a fraction of the front wheels' 0.4 rad limit. CarRacing steers right
        # for positive steer, so a target to the left (error > 0) needs steer < 0. A target
        # behind the car keeps the previous turn's side, so the sign does not flicker at +-pi.
        if abs(error) > 2.5 and self.last_steer != 0.0:
            error = math.copysign(abs(error), -self.last_steer)
        wheel = math.atan2(2.0 * self.wheelbase * math.sin(error), lookahead)
        if abs(error) > math.pi / 2:
            # Pure pursuit's sin(error) vanishes for a target straight behind: turn at full lock.
            wheel = math.copysign(0.4, error)
        steer = float(np.clip(-wheel / 0.4, -1, 1))
        self.last_steer = steer

        target_speed = float(np.clip(self._safe_speed(self.tile), self.speed_min, self.speed_max))
        target_speed *= math.exp(self.speed_factor)
        if off_road > self.grass_distance:
            # The grass grips at 60% of the road: the rear wheels spin under much gas, and the car with them.
            target_speed = min(target_speed, self.grass_speed)
        # Full gas with the wheels turned hard only spins the car on the grass.
        gas = self.gas_gain * (target_speed - speed) * max(0.1, math.cos(error))
        if off_road > self.grass_distance:
            gas = min(gas, self.grass_gas)
        brake = self.brake_gain * (speed - target_speed - 5.0)
        # A car that spins (after a lapse, or too fast on the grass) keeps spinning under gas:
        # let go of the gas and brake gently until it turns slowly enough to steer again.
        if abs(hull.angularVelocity) > self.spin_rate + speed / self.spin_radius:
            gas, brake = 0.0, 0.3
        # Brake below 0.9: from 0.9 on CarRacing locks the wheels.
        return np.array([steer, np.clip(gas, 0, 1), np.clip(brake, 0, 0.8)], dtype=np.float32)

    def _update_noise(self) -> None:
        """Advance the noise processes one step (nothing is drawn when ``noise`` is 0)."""
        if self.noise == 0.0:
            return
        z = self.rng.standard_normal(2)
        self.aim_offset += -self.aim_theta * self.aim_offset + self.noise * self.aim_sigma * z[0]
        self.speed_factor += -self.speed_theta * self.speed_factor + self.noise * self.speed_sigma * z[1]
        start_lapse = self.rng.random() < self.lapse_rate * self.noise
        if self.lapse_left == 0 and start_lapse:
            # A lapse holds the wheel nearly straight at moderate gas (more spins the car on the
            # grass); a long one (a share ``long_lapse_share``) can carry it off the playfield.
            long = self.rng.random() < self.long_lapse_share
            self.lapse_left = 1 + int(self.rng.exponential(self.long_lapse_steps if long else self.lapse_steps))
            # A long lapse steers straighter: 0.15 turns the car on a circle of ~50 units, which
            # keeps it near the road however long the lapse.
            steer = np.clip((0.02 if long else 0.15) * self.rng.standard_normal(), -1, 1)
            self.lapse_action = np.array([steer, self.rng.uniform(0.2, 0.6), 0.0], dtype=np.float32)


def _blind(policy_class):
    """A factory for a policy that does not look at the environment (signature of ``POLICIES``)."""
    def make(rng: np.random.Generator, car_racing, cfg: config.DataConfig):
        return policy_class(rng)
    make.__doc__ = f"Build a :class:`{policy_class.__name__}` (it ignores the environment)."
    return make


def _expert(rng: np.random.Generator, car_racing, cfg: config.DataConfig) -> ExpertPolicy:
    """Build an :class:`ExpertPolicy` with the noise scale of ``cfg``."""
    return ExpertPolicy(rng, car_racing, noise=cfg.expert_noise)


# The policy of a trained controller (``worldmodels.recording``), also the tag of 06_iterate's episodes.
CONTROLLER_POLICY = "controller"
# name -> factory(rng, unwrapped CarRacing after reset, DataConfig) -> a callable returning an action.
POLICIES = {"brownian": _blind(BrownianPolicy), "uniform": _blind(UniformPolicy), "expert": _expert}


def episode_policy(spec: str, base_seed: int, index: int) -> str:
    """The policy that drives episode ``index`` under ``data.policy=spec`` (a name or a mix).

    The choice depends on ``(base_seed, index)`` alone, so any episode is reproducible on its
    own, and it follows a low-discrepancy sequence, so that the first N episodes hold each
    policy's fraction to within a few episodes for any N.
    """
    mix = config.parse_policy_mix(spec)
    if len(mix) == 1:
        return mix[0][0]
    offset = np.random.default_rng([base_seed, _POLICY_STREAM]).random()
    u = (offset + index * _PHI) % 1.0
    edges = np.cumsum([fraction for _, fraction in mix])
    return mix[min(int(np.searchsorted(edges, u, side="right")), len(mix) - 1)][0]
