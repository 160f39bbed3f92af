"""M: the mixture-density recurrent network of World Models (Ha & Schmidhuber 2018).

Shapes (B = batch, T = time, Z = ``z_size`` (32), A = ``action_size`` (3), H = ``hidden_units``
(256), K = ``num_mixtures`` (5)):

* network (:func:`build_mdn_rnn`): inputs float32 (B, T, Z + A), step t holding [z_t, a_t]
  -> LSTM(H) -> dict ``{"mdn": (B, T, 3 K Z), "reward": (B, T), "done": (B, T) logits}``
  (+ ``"action": (B, T, A)`` with the optional action head).
  LSTM 299,008 + Dense 123,360 = 422,368 parameters for Z = 32, A = 3 (the paper's model);
  the reward and done heads add 257 each, the action head H A + A = 771.
* mixture (:func:`split_mixture`): for every z dimension an independent 1-D mixture of K
  Gaussians, ``log_pi``, ``mu``, ``log_sigma`` each (..., Z, K).
* loss (:class:`MDNRNN`): mean mixture NLL per z dimension per valid step
  + ``reward_weight`` * reward MSE + ``done_weight`` * done binary cross-entropy (logits)
  (+ ``action_weight`` * action MSE with the action head).

The action head (off by default; the seed report's M models P(x, r, a, d | x, a, h), i.e. it
predicts the next action too) reads the same features as the other heads and predicts
a_{t+1}, the action recorded at the next frame, from the history up to (z_t, a_t). Its loss is
the mean squared error per action component, weighted by ``action_weight``, rather than a
Gaussian NLL with a learned log-std, because: (1) the head is never sampled - C chooses the
actions in the dream, the prediction is an auxiliary target and a diagnostic - so a variance
would serve nothing; (2) recorded actions are often exactly repeated or exactly on a bound
(brake clipped to 0, a controller's near-deterministic actions), where a learned sigma runs to
its lower bound and its NLL towards -inf, the runaway that ``LOG_SIGMA_MIN`` exists to stop for
z, and would then dominate M's loss; (3) MSE is that NLL with a fixed variance, up to a
constant, so ``action_weight`` plays the role of the inverse variance. The head is linear, not
squashed into the action box: the MSE minimiser is the conditional mean E[a_{t+1} | history],
which lies inside the box anyway (the box is convex), and a tanh or sigmoid would stall the
gradient on the actions that sit exactly on a bound. Its target exists only when frame t + 1
does, so it is masked exactly like the z target (mask[t] & mask[t + 1]).

Data convention (``series/<episode>.npz``): ``mu``, ``logvar`` (T, Z) are V's posterior for
frame t, ``action`` (T, A) the action taken at frame t, ``reward`` (T,) and ``done`` (T,) what
the environment returned for that action (done = terminated, not truncated). Step t's
input is [z_t, a_t]; its targets are z_{t+1} (only for t < T - 1: no frame is stored after the
last action), reward_t and done_t (and a_{t+1}, like z_{t+1} only for t < T - 1). Batches pad
episodes *at the end* to a common length and carry ``mask`` (B, T), 1 for a real step; padded
values never reach the loss.

Inference (:meth:`MDNRNN.step`) advances a whole batch of agents by one step in one compiled
call that shares the training LSTM's weights. Dropout (Wellmer & Kwok 2021, "Dropout's Dream
Land") is applied to the LSTM output before the heads with one mask per sequence; a dream
samples one mask per episode with :meth:`MDNRNN.sample_dropout_mask` and passes it to
every :meth:`MDNRNN.step` of that episode.

Scheduled sampling (``scheduled_sampling`` = p > 0; Bengio et al. 2015, in the parallel form of
Duckworth et al. 2019): in training, a first pass of the network (no gradient) predicts every
z_{t+1}; each input z_t (t >= 1) is then replaced with probability p by a draw from that
prediction (temperature 1), and the loss is that of a second pass on the mixed inputs, against the
true targets. Teacher forcing alone shows M only real latents as inputs, while in the dream it is
fed its own samples; with scheduled sampling its heads (the reward's included) also learn from
inputs like those of its own dream. Validation (``test_step``) stays teacher-forced.

The numpy baselines at the end (:func:`gaussian_nll`, :func:`baseline_nlls`) give the held-out
NLL that M must beat, in the same units as :func:`mixture_nll`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

# Bounds of log sigma. The targets are V's latents: the prior is N(0, 1) and V's posterior
# standard deviation for an active dimension is typically 0.05..1, so a predictive sigma
# below exp(-5) = 0.0067 or above exp(2) = 7.4 is never useful. The lower bound is what
# keeps the NLL from diverging: without it the network can shrink sigma on (nearly)
# deterministic targets - test_step uses z = mu, collapsed dimensions are constant - and
# the loss runs away to -inf and then NaN. The upper bound caps 1 / sigma^2 >= exp(-4), so
# a useless component cannot swallow everything. Together they keep ((x - mu) / sigma)^2
# finite in float32 for any |x - mu| < 1e17.
LOG_SIGMA_MIN = -5.0
LOG_SIGMA_MAX = 2.0
DEFAULT_DONE_WEIGHT = 10.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_BATCH_KEYS = ("mu", "logvar", "action", "mask")


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_dropout(rate):
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {rate!r}.")
    return float(rate)


# --------------------------------------------------------------------------- network
def build_mdn_rnn(z_size=32, action_size=3, hidden_units=256, num_mixtures=5, reward_head=True,
                  done_head=True, dropout=0.0, name="mdn_rnn_net", action_head=False):
    """The Functional network: (B, T, Z + A) -> dict of per-step outputs.

    Returns a ``keras.Model`` with layers ``lstm`` (LSTM(H), return_sequences), optional
    ``dropout``, ``mdn`` (Dense(3 K Z), raw mixture parameters for :func:`split_mixture`),
    ``reward`` (Dense(1)), ``done`` (Dense(1), a logit) and ``action`` (Dense(A), the
    predicted next action, off by default). Outputs ``{"mdn": (B, T, 3 K Z), "reward": (B, T),
    "done": (B, T), "action": (B, T, A)}``; a head switched off is absent from the dict. Without
    the action head the network (layers, weight names and their order) is the one built before
    the option existed, so old weights load unchanged.

    ``dropout`` is applied to the LSTM output before the heads (not to the recurrent state)
    with ``noise_shape (B, 1, H)``: one mask for a whole sequence. A dream keeps one mask for
    a whole episode (Wellmer & Kwok 2021), so training samples the same kind of sub-network
    as the dream uses. The heads are float32 layers so that the NLL is computed in float32
    even under a mixed-precision policy.
    """
    z_size = _positive_int(z_size, "z_size")
    action_size = _positive_int(action_size, "action_size")
    hidden_units = _positive_int(hidden_units, "hidden_units")
    num_mixtures = _positive_int(num_mixtures, "num_mixtures")
    dropout = _check_dropout(dropout)

    inputs = keras.Input(shape=(None, z_size + action_size), name="z_action")
    h = keras.layers.LSTM(hidden_units, return_sequences=True, name="lstm")(inputs)
    if dropout > 0.0:
        h = keras.layers.Dropout(dropout, noise_shape=(None, 1, hidden_units), name="dropout")(h)
    outputs = {"mdn": keras.layers.Dense(3 * num_mixtures * z_size, dtype="float32", name="mdn")(h)}
    if reward_head:
        reward = keras.layers.Dense(1, dtype="float32", name="reward")(h)
        outputs["reward"] = keras.layers.Reshape((-1,), dtype="float32", name="reward_squeeze")(reward)
    if done_head:
        done = keras.layers.Dense(1, dtype="float32", name="done")(h)
        outputs["done"] = keras.layers.Reshape((-1,), dtype="float32", name="done_squeeze")(done)
    if action_head:
        outputs["action"] = keras.layers.Dense(action_size, dtype="float32", name="action")(h)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------- mixture maths
def split_mixture(y, z_size, num_mixtures, log_sigma_min=LOG_SIGMA_MIN, log_sigma_max=LOG_SIGMA_MAX):
    """Raw ``mdn`` output (..., 3 K Z) -> ``(log_pi, mu, log_sigma)``, each (..., Z, K).

    Layout: the last axis is reshaped to (Z, 3 K) and split into K logits, K means and K raw
    log sigmas per z dimension (the layout of the paper's code). ``log_pi`` is normalised
    with ``log_softmax``, so it is finite for any finite logits.

    ``log_sigma`` is bounded softly: ``lo + (hi - lo) * sigmoid(raw + b)`` with ``b`` chosen
    so that raw 0 maps to log sigma 0 (sigma 1, the prior's scale, at initialisation). Unlike
    ``clip``, whose gradient is exactly zero once a unit passes a bound (so a unit that
    overshoots stays stuck there), the sigmoid keeps a gradient that points back inside;
    unlike an unbounded ``log_sigma`` it can never reach the values that make the NLL
    diverge. The result lies in [lo, hi] exactly, also in float32.
    """
    z_size = _positive_int(z_size, "z_size")
    num_mixtures = _positive_int(num_mixtures, "num_mixtures")
    if not log_sigma_min < log_sigma_max:
        raise ValueError(f"need log_sigma_min < log_sigma_max, got {log_sigma_min}, {log_sigma_max}.")
    y = tf.convert_to_tensor(y)
    if not y.dtype.is_floating:
        y = tf.cast(y, tf.float32)
    width = 3 * num_mixtures * z_size
    if y.shape.rank is None or y.shape.rank < 1 or y.shape[-1] != width:
        raise ValueError(
            f"mixture output must have last axis 3 * num_mixtures * z_size = {width}, got shape {y.shape}."
        )
    y = tf.reshape(y, tf.concat([tf.shape(y)[:-1], [z_size, 3 * num_mixtures]], axis=0))
    logits, mu, raw_log_sigma = tf.split(y, 3, axis=-1)
    log_pi = tf.nn.log_softmax(logits, axis=-1)
    lo, hi = float(log_sigma_min), float(log_sigma_max)
    # The offset makes raw 0 land on log sigma 0 when 0 is inside the bounds.
    frac = min(max(-lo / (hi - lo), 1e-6), 1.0 - 1e-6)
    offset = math.log(frac / (1.0 - frac))
    shifted = raw_log_sigma + offset
    # Each half is written so that its sigmoid is the small one: sigmoid(u) for u >= 17
    # rounds to 1 in float32 and its gradient s * (1 - s) to 0, while sigmoid(-u) keeps a
    # gradient down to u ~ 87. Both halves agree at u = 0 (the midpoint).
    log_sigma = tf.where(shifted < 0.0,
                         lo + (hi - lo) * tf.sigmoid(shifted),
                         hi - (hi - lo) * tf.sigmoid(-shifted))
    return log_pi, mu, log_sigma


def mixture_log_prob(z_target, log_pi, mu, log_sigma):
    """Elementwise log density (..., Z) of ``z_target`` (..., Z) under the (..., Z, K) mixture.

    ``log sum_k exp(log pi_k + log N(x; mu_k, sigma_k))`` with ``tf.reduce_logsumexp``: the
    component densities are never exponentiated on their own, so a target far from every
    mean gives a large negative but finite number instead of log(0) = -inf. Finite whenever
    ``|x - mu| * exp(-log_sigma) < 1e19`` (always true for bounded log sigmas and sane z).
    """
    log_pi = tf.convert_to_tensor(log_pi)
    dtype = log_pi.dtype
    z_target = tf.convert_to_tensor(z_target, dtype=dtype)
    mu = tf.convert_to_tensor(mu, dtype=dtype)
    log_sigma = tf.convert_to_tensor(log_sigma, dtype=dtype)
    standardized = (z_target[..., None] - mu) * tf.exp(-log_sigma)
    log_normal = -0.5 * tf.square(standardized) - log_sigma - tf.constant(_HALF_LOG_2PI, dtype=dtype)
    return tf.reduce_logsumexp(log_pi + log_normal, axis=-1)


def mixture_nll(z_target, log_pi, mu, log_sigma, mask=None):
    """Scalar: mean NLL (nats) per z dimension per valid step.

    ``z_target`` (..., Z); mixture parameters (..., Z, K); ``mask`` (...) with 1 (or True)
    for a valid step, or None for all valid. Masked steps are *selected away* (``tf.where``),
    not multiplied by 0, so an inf or NaN there cannot leak into the mean. Returns 0 when
    no step is valid.
    """
    nll = -mixture_log_prob(z_target, log_pi, mu, log_sigma)
    if mask is None:
        return tf.reduce_mean(nll)
    mask = tf.convert_to_tensor(mask)
    keep = mask if mask.dtype == tf.bool else mask > 0
    keep = tf.broadcast_to(keep[..., None], tf.shape(nll))
    total = tf.reduce_sum(tf.where(keep, nll, tf.zeros_like(nll)))
    return tf.math.divide_no_nan(total, tf.reduce_sum(tf.cast(keep, nll.dtype)))


def _check_temperature(temperature):
    if isinstance(temperature, (int, float, np.number)) or (
        tf.is_tensor(temperature) and tf.executing_eagerly()
    ) or isinstance(temperature, np.ndarray):
        value = np.asarray(temperature, dtype=np.float64)
        if value.size != 1 or not np.isfinite(value).all() or float(value) <= 0.0:
            raise ValueError(f"temperature must be one finite number > 0, got {temperature!r}.")
        return tf.constant(float(value), tf.float32)
    temperature = tf.convert_to_tensor(temperature, tf.float32)
    # Inside a tf.function the value is unknown when tracing: check it when the graph runs.
    tf.debugging.assert_positive(temperature, message="temperature must be > 0")
    return temperature


def scheduled_inputs(z, imagined, replace):
    """M's inputs under scheduled sampling: ``z`` (B, T, Z) with z_t replaced by ``imagined[:, t - 1]`` where
    ``replace[:, t - 1]`` (``imagined``, ``replace``: (B, T - 1, Z) and (B, T - 1) bool; the first input is always
    the real z_0, since nothing precedes it to imagine it from)."""
    mixed = tf.where(replace[..., None], imagined, z[:, 1:])
    return tf.concat([z[:, :1], mixed], axis=1)


def mixture_noise(shape_gumbel, shape_normal, seed=None, generator=None, dtype=tf.float32):
    """The noise of one mixture draw: uniform (0, 1) ``shape_gumbel`` for the Gumbel trick, standard normal ``shape_normal``.

    ``generator`` (a ``tf.random.Generator``, advanced), else ``seed`` (int (2,), stateless: split
    into one seed per draw), else the global generator. With a (Z, K) mixture the shapes are
    (..., Z, K) and (..., Z); :func:`mixture_draw` turns the noise into z.
    """
    tiny = np.finfo(dtype.as_numpy_dtype).tiny
    if generator is not None:
        return (generator.uniform(shape_gumbel, minval=tiny, maxval=1.0, dtype=dtype),
                generator.normal(shape_normal, dtype=dtype))
    if seed is None:
        generator = tf.random.get_global_generator()
        return mixture_noise(shape_gumbel, shape_normal, None, generator, dtype)
    seed_u, seed_n = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return (tf.random.stateless_uniform(shape_gumbel, seed=seed_u, minval=tiny, maxval=1.0, dtype=dtype),
            tf.random.stateless_normal(shape_normal, seed=seed_n, dtype=dtype))


def mixture_draw(log_pi, mu, log_sigma, tau, uniform, normal):
    """z (..., Z) from the (..., Z, K) mixture at temperature ``tau`` with the noise of :func:`mixture_noise`.

    The component is the Gumbel-max of ``log_pi / tau`` (``uniform`` (..., Z, K)), then
    z = mean + sigma * sqrt(tau) * ``normal`` (..., Z). Deterministic given the noise: both
    :func:`sample_mixture` and the compiled dream step (``worldmodels.dream``) draw through it.
    """
    gumbel = -tf.math.log(-tf.math.log(uniform))
    choice = tf.argmax(log_pi / tau + gumbel, axis=-1)
    one_hot = tf.one_hot(choice, tf.shape(log_pi)[-1], dtype=log_pi.dtype)
    mean = tf.reduce_sum(one_hot * mu, axis=-1)
    sigma = tf.exp(tf.reduce_sum(one_hot * log_sigma, axis=-1))
    return mean + sigma * tf.sqrt(tau) * normal


def sample_mixture(log_pi, mu, log_sigma, temperature=1.0, seed=None, generator=None):
    """Draw z (..., Z) from the (..., Z, K) mixture at temperature tau.

    Temperature (the paper's): component logits ``log_pi / tau`` before the softmax, and
    ``sigma * sqrt(tau)``. tau -> 0 returns the mean of the most likely component; tau = 1
    samples the model's mixture. ``temperature`` is one number > 0 (``ValueError``
    otherwise; inside a tf.function a tensor is checked when the graph runs).

    Randomness (components by the Gumbel-max trick, then one normal draw per dimension):
    * ``generator``: a ``tf.random.Generator`` (advances its state);
    * ``seed``: int tensor (2,) for a stateless draw of the whole batch, or (B, 2) with B the
      leading axis: row i then depends only on ``seed[i]`` and row i's parameters, so a batch
      of B equals B calls with batch 1 (costs a ``tf.map_fn`` over rows, ~13 us a row);
    * neither: the global generator.
    """
    log_pi = tf.convert_to_tensor(log_pi)
    if not log_pi.dtype.is_floating:
        log_pi = tf.cast(log_pi, tf.float32)
    dtype = log_pi.dtype
    mu = tf.convert_to_tensor(mu, dtype=dtype)
    log_sigma = tf.convert_to_tensor(log_sigma, dtype=dtype)
    if log_pi.shape.rank is not None and log_pi.shape.rank < 2:
        raise ValueError(f"log_pi must have shape (..., Z, K), got {log_pi.shape}.")
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both.")
    tau = tf.cast(_check_temperature(temperature), dtype)

    def draw(log_pi, mu, log_sigma, seed):
        uniform, normal = mixture_noise(tf.shape(log_pi), tf.shape(mu)[:-1], seed, generator, dtype)
        return mixture_draw(log_pi, mu, log_sigma, tau, uniform, normal)

    if seed is None:
        return draw(log_pi, mu, log_sigma, None)
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"seed must be an int32/int64 tensor, got dtype {seed.dtype}.")
    if seed.shape == (2,):
        return draw(log_pi, mu, log_sigma, seed)
    if seed.shape.rank == 2 and seed.shape[-1] == 2 and log_pi.shape.rank >= 3:
        return tf.map_fn(lambda args: draw(*args), (log_pi, mu, log_sigma, seed),
                         fn_output_signature=tf.TensorSpec(None, dtype))
    raise ValueError(f"seed must have shape (2,) or (B, 2) with log_pi (B, ..., Z, K); got seed "
                     f"{seed.shape}, log_pi {log_pi.shape}.")


# --------------------------------------------------------------------------- the model
@keras.saving.register_keras_serializable(package="worldmodels")
class MDNRNN(keras.Model):
    """M with its own loss, compiled batched step function and dropout masks.

    Batches (``fit``, ``evaluate``, :meth:`compute_losses`) are dicts: ``mu``, ``logvar``
    (B, T, Z), ``action`` (B, T, A), ``reward`` (B, T), ``done`` (B, T), ``mask`` (B, T) float
    or bool, 1 = real step, padding at the end only. Extra keys are ignored; ``reward`` and
    ``done`` may be omitted when the matching head is off.

    ``train_step`` re-samples z = mu + exp(logvar / 2) * eps for every batch (the paper's
    practice: M sees V's uncertainty and cannot overfit one encoding); ``test_step`` uses
    z = mu so that validation numbers are reproducible. Metrics: ``loss``, ``z_nll``,
    ``reward_mse``, ``done_bce`` (+ ``action_mse`` with ``action_head``). Gradient clipping is the optimizer's job
    (``keras.optimizers.Adam(1e-3, clipnorm=1.0)``).
    """

    def __init__(self, z_size=32, action_size=3, hidden_units=256, num_mixtures=5, reward_head=True,
                 done_head=True, dropout=0.0, done_weight=DEFAULT_DONE_WEIGHT, reward_weight=1.0,
                 log_sigma_min=LOG_SIGMA_MIN, log_sigma_max=LOG_SIGMA_MAX, seed=None, name="mdn_rnn",
                 action_head=False, action_weight=1.0, scheduled_sampling=0.0, **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= float(scheduled_sampling) <= 1.0:
            raise ValueError(f"scheduled_sampling must be a probability in [0, 1], got {scheduled_sampling!r}.")
        if min(float(done_weight), float(reward_weight), float(action_weight)) < 0:
            raise ValueError(f"loss weights must be >= 0, got done_weight={done_weight}, "
                             f"reward_weight={reward_weight}, action_weight={action_weight}.")
        if not float(log_sigma_min) < float(log_sigma_max):
            raise ValueError(f"need log_sigma_min < log_sigma_max, got {log_sigma_min}, {log_sigma_max}.")
        self.z_size = _positive_int(z_size, "z_size")
        self.action_size = _positive_int(action_size, "action_size")
        self.hidden_units = _positive_int(hidden_units, "hidden_units")
        self.num_mixtures = _positive_int(num_mixtures, "num_mixtures")
        self.reward_head = bool(reward_head)
        self.done_head = bool(done_head)
        self.action_head = bool(action_head)
        self.action_weight = float(action_weight)
        self.dropout = _check_dropout(dropout)
        self.scheduled_sampling = float(scheduled_sampling)
        self.done_weight = float(done_weight)
        self.reward_weight = float(reward_weight)
        self.log_sigma_min = float(log_sigma_min)
        self.log_sigma_max = float(log_sigma_max)
        self.seed = seed
        self.net = build_mdn_rnn(self.z_size, self.action_size, self.hidden_units, self.num_mixtures,
                                 self.reward_head, self.done_head, self.dropout, action_head=self.action_head)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self._metric_names()}
        self._compiled_step = None
        self.built = True

    def _metric_names(self):
        names = ["loss", "z_nll"]
        if self.reward_head:
            names.append("reward_mse")
        if self.done_head:
            names.append("done_bce")
        if self.action_head:
            names.append("action_mse")
        return names

    def get_config(self):
        """The constructor's arguments; the action head's and scheduled sampling's only when they are on, so
        an M without them saves exactly the config of an M saved before the options existed."""
        optional = {"action_head": True, "action_weight": self.action_weight} if self.action_head else {}
        if self.scheduled_sampling > 0:
            optional["scheduled_sampling"] = self.scheduled_sampling
        return {
            "name": self.name, "z_size": self.z_size, "action_size": self.action_size,
            "hidden_units": self.hidden_units, "num_mixtures": self.num_mixtures,
            "reward_head": self.reward_head, "done_head": self.done_head, "dropout": self.dropout,
            "done_weight": self.done_weight, "reward_weight": self.reward_weight,
            "log_sigma_min": self.log_sigma_min, "log_sigma_max": self.log_sigma_max, "seed": self.seed,
            **optional,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=None):
        """(B, T, Z + A) -> ``{"mdn": (B, T, 3 K Z), "reward": (B, T), "done": (B, T) logits}`` (+ ``"action"``
        (B, T, A), the predicted next action)."""
        return self.net(inputs, training=training)

    def split(self, y):
        """Raw ``mdn`` output (..., 3 K Z) -> (log_pi, mu, log_sigma) (..., Z, K) with this model's bounds."""
        return split_mixture(y, self.z_size, self.num_mixtures, self.log_sigma_min, self.log_sigma_max)

    # ------------------------------------------------------------------ losses
    def _prepare(self, batch):
        """Validate a batch dict and zero every padded value (so NaN padding is harmless)."""
        if isinstance(batch, (tuple, list)):  # fit(x=dict) hands over (x,) or (x, None, None)
            batch = batch[0]
        if not isinstance(batch, Mapping):
            raise ValueError(f"a batch must be a dict with keys {_BATCH_KEYS} (+ reward, done), got {type(batch)}.")
        needed = list(_BATCH_KEYS) + (["reward"] if self.reward_head else []) + (["done"] if self.done_head else [])
        missing = [key for key in needed if key not in batch]
        if missing:
            raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}.")
        mask = tf.convert_to_tensor(batch["mask"])
        keep = mask if mask.dtype == tf.bool else mask > 0
        if keep.shape.rank != 2:
            raise ValueError(f"mask must have shape (B, T), got {keep.shape}.")
        out = {"keep": keep}
        for key, last in (("mu", self.z_size), ("logvar", self.z_size), ("action", self.action_size)):
            value = tf.cast(batch[key], tf.float32)
            if value.shape.rank != 3 or value.shape[-1] != last:
                raise ValueError(f"{key} must have shape (B, T, {last}), got {value.shape}.")
            out[key] = tf.where(keep[..., None], value, tf.zeros_like(value))
        for key in ("reward", "done"):
            if key in needed:
                value = tf.cast(batch[key], tf.float32)
                if value.shape.rank != 2:
                    raise ValueError(f"{key} must have shape (B, T), got {value.shape}.")
                out[key] = tf.where(keep, value, tf.zeros_like(value))
        return out

    def compute_losses(self, batch, sample_z=False, training=False):
        """Dict of scalar losses ``loss``, ``z_nll`` (+ ``reward_mse``, ``done_bce``, ``action_mse``) for a batch.

        ``sample_z``: z = mu + exp(logvar / 2) * eps (training) instead of z = mu. With ``training`` and
        ``scheduled_sampling`` > 0 the inputs are mixed with M's own draws (module docstring); the
        targets stay the real z.
        The z NLL and the action MSE of step t (targets z_{t+1}, a_{t+1}) are counted when
        steps t and t + 1 are both real (mask[t] & mask[t + 1]); the reward and done losses
        when step t is real. ``action_mse`` is the mean over action components and those steps.
        """
        data = self._prepare(batch)
        keep = data["keep"]
        z = data["mu"]
        if sample_z:
            eps = keras.random.normal(tf.shape(z), seed=self.seed_generator)
            z = z + tf.exp(0.5 * data["logvar"]) * eps
        pairs = keep[:, :-1] & keep[:, 1:]
        inputs = z
        if training and self.scheduled_sampling > 0:
            inputs = scheduled_inputs(z, *self._imagine(z, data["action"], pairs))
        out = self.net(tf.concat([inputs, data["action"]], axis=-1), training=training)
        log_pi, mu, log_sigma = self.split(out["mdn"][:, :-1])
        losses = {"z_nll": mixture_nll(z[:, 1:], log_pi, mu, log_sigma, pairs)}
        total = losses["z_nll"]
        count = tf.reduce_sum(tf.cast(keep, tf.float32))
        if self.reward_head:
            error = tf.square(out["reward"] - data["reward"])
            losses["reward_mse"] = tf.math.divide_no_nan(tf.reduce_sum(tf.where(keep, error, 0.0)), count)
            total = total + self.reward_weight * losses["reward_mse"]
        if self.done_head:
            bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=data["done"], logits=out["done"])
            losses["done_bce"] = tf.math.divide_no_nan(tf.reduce_sum(tf.where(keep, bce, 0.0)), count)
            total = total + self.done_weight * losses["done_bce"]
        if self.action_head:
            error = tf.reduce_mean(tf.square(out["action"][:, :-1] - data["action"][:, 1:]), axis=-1)
            losses["action_mse"] = tf.math.divide_no_nan(tf.reduce_sum(tf.where(pairs, error, 0.0)),
                                                         tf.reduce_sum(tf.cast(pairs, tf.float32)))
            total = total + self.action_weight * losses["action_mse"]
        losses["loss"] = total
        return losses

    def _imagine(self, z, action, pairs):
        """Scheduled sampling's first pass: (``imagined`` (B, T - 1, Z), ``replace`` (B, T - 1) bool). ``imagined[:, t]``
        is a draw (temperature 1) from M's prediction of z_{t+1} given the real z_0..z_t, without gradient;
        ``replace`` is true with probability ``scheduled_sampling`` on pairs of real steps (``pairs``), else false."""
        first = self.net(tf.concat([z, action], axis=-1), training=True)
        log_pi, mu, log_sigma = self.split(tf.stop_gradient(first["mdn"][:, :-1]))
        tiny = np.finfo(np.float32).tiny
        uniform = keras.random.uniform(tf.shape(log_pi), minval=tiny, maxval=1.0, seed=self.seed_generator)
        normal = keras.random.normal(tf.shape(mu)[:-1], seed=self.seed_generator)
        imagined = mixture_draw(log_pi, mu, log_sigma, tf.constant(1.0, log_pi.dtype), uniform, normal)
        coin = keras.random.uniform(tf.shape(pairs), seed=self.seed_generator)
        return imagined, pairs & (coin < self.scheduled_sampling)

    def _record(self, losses):
        for name, tracker in self.trackers.items():
            tracker.update_state(losses[name])
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        with tf.GradientTape() as tape:
            losses = self.compute_losses(data, sample_z=True, training=True)
            # Under tf.distribute the replicas' gradients are summed, so each replica's mean
            # loss is divided by their number (as Keras' own train_step does); scale_loss is
            # the mixed-precision loss scale and the identity otherwise.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(losses["loss"] / replicas)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._record(losses)

    def test_step(self, data):
        return self._record(self.compute_losses(data, sample_z=False, training=False))

    # ------------------------------------------------------------------ inference
    def initial_state(self, batch_size):
        """Zero LSTM state ``(h, c)``, each float32 (batch_size, H)."""
        batch_size = _positive_int(batch_size, "batch_size")
        zeros = tf.zeros((batch_size, self.hidden_units), tf.float32)
        return zeros, tf.identity(zeros)

    def sample_dropout_mask(self, batch_size, seed=None, generator=None):
        """One dropout mask per agent, float32 (batch_size, H): 0 or 1 / (1 - rate).

        Keep it for a whole dream episode and pass it to every :meth:`step` (Wellmer & Kwok
        2021: each episode then dreams with its own sub-network). All ones without dropout.
        ``seed`` (2,) for a stateless draw, else ``generator`` or the global generator.
        """
        batch_size = _positive_int(batch_size, "batch_size")
        shape = (batch_size, self.hidden_units)
        if self.dropout == 0.0:
            return tf.ones(shape, tf.float32)
        if seed is not None:
            uniform = tf.random.stateless_uniform(shape, seed=seed)
        else:
            uniform = (generator or tf.random.get_global_generator()).uniform(shape)
        keep = 1.0 - self.dropout
        return tf.cast(uniform < keep, tf.float32) / keep

    def _step_impl(self, z, action, h, c, dropout_mask):
        cell = self.net.get_layer("lstm").cell
        output, (h_new, c_new) = cell(tf.concat([z, action], axis=-1), [h, c], training=False)
        # Under a mixed-precision policy the cell computes in float16; the state that goes back
        # to the caller (and into the next call's float32 signature) is float32.
        h_new, c_new = tf.cast(h_new, tf.float32), tf.cast(c_new, tf.float32)
        features = tf.cast(output, tf.float32) * dropout_mask
        log_pi, mu, log_sigma = self.split(self.net.get_layer("mdn")(features))
        result = {"log_pi": log_pi, "mu": mu, "log_sigma": log_sigma, "state": (h_new, c_new)}
        if self.reward_head:
            result["reward"] = self.net.get_layer("reward")(features)[:, 0]
        if self.done_head:
            result["done_prob"] = tf.sigmoid(self.net.get_layer("done")(features)[:, 0])
        if self.action_head:
            result["action"] = self.net.get_layer("action")(features)
        return result

    def plain_mixture(self, h):
        """M's mixture ``(log_pi, mu, log_sigma)`` (B, Z, K) read from its new hidden state ``h`` (B, H) without
        dropout: what :meth:`step` returns with ``dropout_mask=None``. The LSTM's output is its new h, so a dream
        that stepped with a dropout mask gets M's plain prediction from the returned state at the cost of the
        heads alone (no second LSTM step)."""
        return self.split(self.net.get_layer("mdn")(tf.convert_to_tensor(h, tf.float32)))

    def step(self, z, action, state, dropout_mask=None):
        """Advance B agents by one step in one compiled call.

        ``z`` (B, Z), ``action`` (B, A), ``state`` = (h, c) each (B, H) from
        :meth:`initial_state` or the previous step; ``dropout_mask`` (B, H) from
        :meth:`sample_dropout_mask` or None (no dropout, the inference network).
        Returns ``{"log_pi", "mu", "log_sigma": (B, Z, K), "reward": (B,),
        "done_prob": (B,), "action": (B, A), "state": (h', c')}`` (reward / done_prob / action
        only with their heads; ``action`` is M's prediction of the next action a_{t+1}),
        the same numbers as the sequence model on the same inputs. Traced once for all
        batch sizes. The controller's h_t is ``state[0]`` *before* this call (the paper's C
        sees the hidden state that has not yet absorbed z_t, a_t).
        """
        z = tf.convert_to_tensor(z, tf.float32)
        action = tf.convert_to_tensor(action, tf.float32)
        if len(state) != 2:
            raise ValueError("state must be a pair (h, c).")
        h, c = (tf.convert_to_tensor(s, tf.float32) for s in state)
        if dropout_mask is None:
            dropout_mask = tf.ones_like(h)
        dropout_mask = tf.convert_to_tensor(dropout_mask, tf.float32)
        expected = {"z": (z, self.z_size), "action": (action, self.action_size), "h": (h, self.hidden_units),
                    "c": (c, self.hidden_units), "dropout_mask": (dropout_mask, self.hidden_units)}
        for what, (value, width) in expected.items():
            if value.shape.rank != 2 or value.shape[-1] != width or value.shape[0] != z.shape[0]:
                raise ValueError(f"{what} must have shape (B, {width}) with B = {z.shape[0]} "
                                 f"(from z), got {value.shape}.")
        if self._compiled_step is None:
            def spec(width):
                return tf.TensorSpec((None, width), tf.float32)
            hidden = spec(self.hidden_units)
            self._compiled_step = tf.function(
                self._step_impl,
                input_signature=[spec(self.z_size), spec(self.action_size), hidden, hidden, hidden],
            )
        return self._compiled_step(z, action, h, c, dropout_mask)


# --------------------------------------------------------------------------- baselines (numpy)
def gaussian_nll(x, mean, var):
    """Elementwise NLL (nats) of ``x`` under N(mean, var); arrays broadcast, var > 0."""
    x, mean, var = (np.asarray(a, dtype=np.float64) for a in (x, mean, var))
    if np.any(var <= 0):
        raise ValueError("var must be > 0 everywhere.")
    return 0.5 * (np.log(2.0 * np.pi * var) + np.square(x - mean) / var)


def _check_series(series, what):
    if len(series) == 0:
        raise ValueError(f"{what} is empty: give a list of (T, Z) arrays.")
    arrays = [np.asarray(s, dtype=np.float64) for s in series]
    widths = {a.shape[1] if a.ndim == 2 else None for a in arrays}
    if None in widths or len(widths) != 1:
        raise ValueError(f"{what} must be (T, Z) arrays with one Z, got shapes {[a.shape for a in arrays]}.")
    if not any(len(a) >= 2 for a in arrays):
        raise ValueError(f"{what} has no episode with 2 or more steps: there is no transition to score.")
    return arrays


def baseline_nlls(train_series, heldout_series, log_sigma_min=LOG_SIGMA_MIN, per_dimension=False):
    """Held-out mean NLL (nats per z dimension per step) of two baselines M must beat.

    ``train_series``, ``heldout_series``: lists of (T, Z) arrays, normally V's ``mu`` (what
    ``MDNRNN.test_step`` uses as z). Every held-out target z_{t+1}, t < T - 1, is scored,
    the same targets as :func:`mixture_nll`:

    * ``"persistence"``: z_{t+1} ~ N(z_t, var_d) with the per-dimension noise variance
      var_d = mean((z_{t+1} - z_t)^2) fitted on train (zero-mean noise: "nothing moves");
    * ``"unconditional"``: z_{t+1} ~ N(m_d, s_d^2), the per-dimension mean and variance of
      all train frames (ignores time entirely).

    Variances are floored at exp(2 * log_sigma_min), the smallest variance M can express,
    so a collapsed (constant) dimension does not give a baseline an unreachable -inf.
    Returns ``{"persistence": float, "unconditional": float}``, or with ``per_dimension``
    the per-dimension means, float arrays (Z,), whose mean is the float.
    """
    train = _check_series(train_series, "train_series")
    heldout = _check_series(heldout_series, "heldout_series")
    if train[0].shape[1] != heldout[0].shape[1]:
        raise ValueError(f"train has Z = {train[0].shape[1]} but heldout has Z = {heldout[0].shape[1]}.")
    floor = math.exp(2.0 * log_sigma_min)
    deltas = np.concatenate([np.diff(a, axis=0) for a in train if len(a) >= 2])
    noise_var = np.maximum(np.mean(np.square(deltas), axis=0), floor)
    frames = np.concatenate(train)
    mean, var = frames.mean(axis=0), np.maximum(frames.var(axis=0), floor)

    previous = np.concatenate([a[:-1] for a in heldout if len(a) >= 2])
    target = np.concatenate([a[1:] for a in heldout if len(a) >= 2])
    nlls = {"persistence": gaussian_nll(target, previous, noise_var).mean(axis=0),
            "unconditional": gaussian_nll(target, mean, var).mean(axis=0)}
    return nlls if per_dimension else {name: float(np.mean(value)) for name, value in nlls.items()}
