"""V: the convolutional variational autoencoder of World Models (Ha & Schmidhuber 2018).

Shapes (B = batch, Z = ``z_size``, 32 in the paper):

* encoder: frames float32 (B, 64, 64, 3) in [0, 1] -> ``(mu, logvar)``, each float32 (B, Z).
  Conv2D 32, 64, 128, 256 (kernel 4, stride 2, ReLU, valid): 64 -> 31 -> 14 -> 6 -> 2,
  flatten 2 * 2 * 256 = 1024, then two Dense(Z) heads. 755,744 parameters for Z = 32.
* decoder: z float32 (B, Z) -> frames float32 (B, 64, 64, 3) in [0, 1].
  Dense 1024, reshape (1, 1, 1024), Conv2DTranspose 128 (k5), 64 (k5), 32 (k6) with ReLU,
  3 (k6) then a sigmoid, all stride 2: 1 -> 5 -> 13 -> 30 -> 64. 3,592,803 parameters.
* loss per frame: sum over the 64 * 64 * 3 pixels of the squared error
  + max(KL(q(z|x) || N(0, I)), kl_tolerance * Z), then the mean over the batch.

:class:`ConvVAE` accepts frames as uint8 (0..255, the on-disk format: four times less memory
than float32) or as float in [0, 1] everywhere: ``fit``, ``evaluate``, ``encode``, ``call``.
The heads that produce ``mu``, ``logvar`` and the decoded frames are float32 layers, so
everything that leaves V is float32 even under the ``mixed_float16`` policy.

The numpy helpers at the end (:func:`reconstruction_metrics`, :func:`kl_per_dimension`,
:func:`active_dimensions`, :func:`parameter_counts`) are what the evaluation notebook and
``metrics.json`` report.
"""

from __future__ import annotations


import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

FRAME_SHAPE = (64, 64, 3)
DEFAULT_Z_SIZE = 32
DEFAULT_KL_TOLERANCE = 0.5
DEFAULT_CHUNK_SIZE = 1000

# Layer specifications from the paper: (filters, kernel) with stride 2 everywhere.
_ENCODER_CONVS = ((32, 4), (64, 4), (128, 4), (256, 4))
_DECODER_DECONVS = ((128, 5), (64, 5), (32, 6))
_DECODER_OUTPUT_KERNEL = 6


def _check_z_size(z_size):
    if isinstance(z_size, bool) or not isinstance(z_size, (int, np.integer)) or z_size < 1:
        raise ValueError(f"z_size must be a positive integer, got {z_size!r}.")
    return int(z_size)


def _check_frame_shape(shape, what="frames"):
    if len(shape) != 4 or tuple(shape[1:]) != FRAME_SHAPE:
        raise ValueError(
            f"{what} must have shape (batch, 64, 64, 3), got {tuple(shape)}; "
            "add a batch axis with frames[None] for a single frame."
        )


def to_float_frames(frames):
    """Frames as float32 in [0, 1]: uint8 (0..255) is divided by 255, float passes through.

    Args:
        frames: uint8 or floating array/tensor of any shape, typically (B, 64, 64, 3).

    Returns:
        float32 of the same shape, a numpy array for numpy (or list) input and a tensor for
        tensor input, so the same function serves ``encode`` on numpy chunks and the
        ``train_step`` on ``tf.data`` batches.

    Raises:
        ValueError: for integer types other than uint8 (their scale is ambiguous) and
            booleans, and for numpy float input outside [0, 1] (usually frames that were
            cast to float without dividing by 255).
    """
    if ops.is_tensor(frames):
        dtype = tf.as_dtype(frames.dtype)
        if dtype == tf.uint8:
            return tf.cast(frames, tf.float32) / 255.0
        if dtype.is_floating:
            return tf.cast(frames, tf.float32)
        raise ValueError(f"frames must be uint8 (0..255) or float in [0, 1], got dtype {dtype.name}.")
    array = np.asarray(frames)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(array.dtype, np.floating):
        # Checking the range is cheap on numpy and catches the most common mistake: float frames
        # still in 0..255. A tiny tolerance admits values that round-tripped through float16.
        if array.size and (np.nanmin(array) < -1e-3 or np.nanmax(array) > 1.0 + 1e-3):
            raise ValueError(
                f"float frames must lie in [0, 1], got values in [{np.nanmin(array)}, "
                f"{np.nanmax(array)}]; pass uint8 frames or divide by 255."
            )
        return array.astype(np.float32, copy=False)
    raise ValueError(f"frames must be uint8 (0..255) or float in [0, 1], got dtype {array.dtype}.")


def build_encoder(z_size=DEFAULT_Z_SIZE):
    """The paper's convolutional encoder: (B, 64, 64, 3) float in [0, 1] -> (mu, logvar), each (B, Z).

    755,744 parameters for ``z_size`` 32. The two Dense heads run in float32 so ``mu`` and
    ``logvar`` are float32 even under a ``mixed_float16`` global policy.
    """
    z_size = _check_z_size(z_size)
    frames = keras.Input(shape=FRAME_SHAPE, dtype="float32", name="frames")
    x = frames
    for index, (filters, kernel) in enumerate(_ENCODER_CONVS, start=1):
        x = layers.Conv2D(
            filters, kernel, strides=2, padding="valid", activation="relu", name=f"enc_conv{index}"
        )(x)
    x = layers.Flatten(name="enc_flatten")(x)
    mu = layers.Dense(z_size, dtype="float32", name="enc_mu")(x)
    logvar = layers.Dense(z_size, dtype="float32", name="enc_logvar")(x)
    return keras.Model(frames, [mu, logvar], name="encoder")


@keras.saving.register_keras_serializable(package="worldmodels")
class Conv2DTransposeFrom1x1(layers.Conv2DTranspose):
    """``Conv2DTranspose`` with the same weights and outputs, computed as one matrix product on a 1x1 input.

    The decoder's first transposed convolution takes a (B, 1, 1, 1024) input. TensorFlow's CPU
    kernel for it (Conv2DBackpropInput) was measured at 1.6 s for a batch of 100 on an AVX2 EPYC
    (TensorFlow 2.21; ~10 ms of arithmetic), which made V's training 16x slower than on another
    machine. A 1x1 input with "valid" padding places one copy of the kernel, scaled by the input,
    at the origin: out[b, i, j, c] = sum_k x[b, k] * kernel[i, j, c, k] + bias[c] (Keras' kernel is
    (kh, kw, filters, in_channels)). Larger inputs use the parent's convolution unchanged.
    """

    def call(self, inputs):
        if inputs.shape[1] != 1 or inputs.shape[2] != 1 or self.padding != "valid" or self.data_format != "channels_last":
            return super().call(inputs)
        outputs = ops.einsum("bk,ijck->bijc", inputs[:, 0, 0, :], ops.cast(self.kernel, inputs.dtype))
        if self.use_bias:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        return self.activation(outputs) if self.activation is not None else outputs


def build_decoder(z_size=DEFAULT_Z_SIZE):
    """The paper's deconvolutional decoder: z (B, Z) -> frames float32 (B, 64, 64, 3) in [0, 1].

    3,592,803 parameters for ``z_size`` 32. The last transposed convolution produces logits
    and a separate float32 sigmoid turns them into pixels, so the output is float32 (and the
    sigmoid does not saturate in float16) under a ``mixed_float16`` global policy.
    """
    z_size = _check_z_size(z_size)
    z = keras.Input(shape=(z_size,), dtype="float32", name="z")
    x = layers.Dense(1024, name="dec_dense")(z)
    x = layers.Reshape((1, 1, 1024), name="dec_reshape")(x)
    for index, (filters, kernel) in enumerate(_DECODER_DECONVS, start=1):
        # The first one sees a 1x1 input: the same layer computed as a matrix product (see above).
        deconv = Conv2DTransposeFrom1x1 if index == 1 else layers.Conv2DTranspose
        x = deconv(
            filters, kernel, strides=2, padding="valid", activation="relu", name=f"dec_deconv{index}"
        )(x)
    x = layers.Conv2DTranspose(
        FRAME_SHAPE[-1], _DECODER_OUTPUT_KERNEL, strides=2, padding="valid", name="dec_deconv4"
    )(x)
    frames = layers.Activation("sigmoid", dtype="float32", name="dec_sigmoid")(x)
    return keras.Model(z, frames, name="decoder")


def vae_loss(frames, reconstruction, mu, logvar, kl_tolerance=DEFAULT_KL_TOLERANCE):
    """The paper's VAE loss, in float32 whatever the compute dtype.

    Args:
        frames: (B, 64, 64, 3) uint8 or float in [0, 1], the targets.
        reconstruction: (B, 64, 64, 3) float in [0, 1], the decoder output.
        mu, logvar: (B, Z) posterior parameters.
        kl_tolerance: the KL floor per frame is ``kl_tolerance * Z`` nats ("free bits");
            0 disables it.

    Returns:
        ``(loss, reconstruction_loss, kl_loss)``, scalar float32 tensors, each a mean over the
        batch. ``loss`` is mean_b[recon_b + max(KL_b, kl_tolerance * Z)]: the floor is applied
        per frame *before* the mean, as in the paper's code, so a frame whose KL is below the
        floor gets no gradient pushing its KL lower. ``kl_loss`` is the raw KL before the floor.
    """
    if kl_tolerance < 0:
        raise ValueError(f"kl_tolerance must be >= 0, got {kl_tolerance}.")
    targets = to_float_frames(frames)
    reconstruction = ops.cast(reconstruction, "float32")
    mu = ops.cast(mu, "float32")
    logvar = ops.cast(logvar, "float32")
    z_size = mu.shape[-1]

    reconstruction_per_frame = ops.sum(ops.square(targets - reconstruction), axis=(1, 2, 3))
    kl_per_frame = -0.5 * ops.sum(1.0 + logvar - ops.square(mu) - ops.exp(logvar), axis=-1)
    floored_kl = ops.maximum(kl_per_frame, float(kl_tolerance) * z_size)
    loss = ops.mean(reconstruction_per_frame + floored_kl)
    return loss, ops.mean(reconstruction_per_frame), ops.mean(kl_per_frame)


def _frames_from_data(data):
    """The frames of a batch from ``fit``/``evaluate``: a tensor, or the first item of a tuple."""
    if isinstance(data, (tuple, list)):
        data = data[0]
    return data


@keras.saving.register_keras_serializable(package="worldmodels")
class ConvVAE(keras.Model):
    """Encoder + decoder + the paper's loss, trainable with ``model.fit(dataset_of_frames)``.

    The dataset may yield frames (B, 64, 64, 3) as uint8 or float in [0, 1], alone or as the
    first element of a tuple. ``train_step`` samples z with the reparameterisation trick;
    ``test_step`` decodes the posterior mean so validation numbers are repeatable. Metrics:
    ``loss``, ``reconstruction_loss``, ``kl_loss`` (raw KL, before the floor).

    The optimizer (the paper: ``keras.optimizers.Adam(1e-4)``) is the caller's choice via
    ``compile``. Under the ``mixed_float16`` policy Keras wraps it in a LossScaleOptimizer,
    and ``train_step`` goes through ``optimizer.scale_loss`` so the scaling applies.
    """

    def __init__(self, z_size=DEFAULT_Z_SIZE, kl_tolerance=DEFAULT_KL_TOLERANCE, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.z_size = _check_z_size(z_size)
        if not kl_tolerance >= 0:
            raise ValueError(f"kl_tolerance must be >= 0, got {kl_tolerance}.")
        self.kl_tolerance = float(kl_tolerance)
        self.seed = seed
        self.encoder = build_encoder(self.z_size)
        self.decoder = build_decoder(self.z_size)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_tracker = keras.metrics.Mean(name="kl_loss")
        # All variables exist once the Functional sub-models are built, so the model counts as
        # built: saving and loading then need no dummy call first.
        self.built = True

    @property
    def metrics(self):
        # Listing the trackers here lets Keras reset them at the start of every epoch.
        return [self.loss_tracker, self.reconstruction_tracker, self.kl_tracker]

    def call(self, frames, training=False):
        """Reconstruction of the posterior mean: (B, 64, 64, 3) uint8/float -> float32 [0, 1]."""
        mu, _ = self.encoder(to_float_frames(frames), training=training)
        return self.decoder(mu, training=training)

    def _forward_losses(self, frames, training):
        x = to_float_frames(frames)
        mu, logvar = self.encoder(x, training=training)
        if training:
            # z = mu + sigma * eps keeps the sample differentiable in mu and logvar.
            eps = keras.random.normal(ops.shape(mu), seed=self.seed_generator, dtype="float32")
            z = mu + ops.exp(0.5 * logvar) * eps
        else:
            z = mu
        reconstruction = self.decoder(z, training=training)
        return vae_loss(x, reconstruction, mu, logvar, self.kl_tolerance)

    def _update_metrics(self, loss, reconstruction_loss, kl_loss):
        self.loss_tracker.update_state(loss)
        self.reconstruction_tracker.update_state(reconstruction_loss)
        self.kl_tracker.update_state(kl_loss)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        frames = _frames_from_data(data)
        with tf.GradientTape() as tape:
            loss, reconstruction_loss, kl_loss = self._forward_losses(frames, training=True)
            # Under tf.distribute the replicas' gradients are summed, so each replica scales its
            # loss by 1 / replicas to get the gradient of the global-batch mean.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(loss / float(replicas))
        gradients = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        return self._update_metrics(loss, reconstruction_loss, kl_loss)

    def test_step(self, data):
        return self._update_metrics(*self._forward_losses(_frames_from_data(data), training=False))

    def _chunked(self, array, function, chunk_size):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
        outputs = []
        for start in range(0, len(array), chunk_size):
            outputs.append(function(array[start : start + chunk_size]))
        return outputs

    def encode(self, frames, chunk_size=DEFAULT_CHUNK_SIZE):
        """Posterior parameters of many frames, ``chunk_size`` frames at a time.

        Args:
            frames: (N, 64, 64, 3) uint8 or float in [0, 1]; numpy, memory-mapped or a tensor.
                Only one chunk is ever converted to float32, so N may be large.

        Returns:
            ``(mu, logvar)``, numpy float32 arrays of shape (N, Z).
        """
        if not hasattr(frames, "shape"):
            frames = np.asarray(frames)
        _check_frame_shape(frames.shape)

        def encode_chunk(chunk):
            mu, logvar = self.encoder(to_float_frames(chunk), training=False)
            return ops.convert_to_numpy(mu), ops.convert_to_numpy(logvar)

        pieces = self._chunked(frames, encode_chunk, chunk_size)
        if not pieces:
            empty = np.zeros((0, self.z_size), np.float32)
            return empty, empty.copy()
        return (np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces]))

    def decode(self, z, chunk_size=DEFAULT_CHUNK_SIZE):
        """Frames from latents: z (N, Z) -> numpy float32 (N, 64, 64, 3) in [0, 1]."""
        if not hasattr(z, "shape"):
            z = np.asarray(z)
        if len(z.shape) != 2 or z.shape[1] != self.z_size:
            raise ValueError(f"z must have shape (batch, {self.z_size}), got {tuple(z.shape)}.")

        def decode_chunk(chunk):
            return ops.convert_to_numpy(self.decoder(ops.cast(chunk, "float32"), training=False))

        pieces = self._chunked(z, decode_chunk, chunk_size)
        if not pieces:
            return np.zeros((0,) + FRAME_SHAPE, np.float32)
        return np.concatenate(pieces).astype(np.float32, copy=False)

    def get_config(self):
        config = super().get_config()
        config.update(z_size=self.z_size, kl_tolerance=self.kl_tolerance, seed=self.seed)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# --------------------------------------------------------------------------- numpy metrics


def reconstruction_metrics(originals, reconstructions):
    """Pixel error of reconstructions, pure numpy.

    Args:
        originals, reconstructions: (N, 64, 64, 3) (any (N, ...) works), uint8 or float in
            [0, 1]; both are compared on the [0, 1] scale.

    Returns:
        ``{"mse": float, "psnr": float}``. ``mse`` is the mean squared error over all pixels
        of all frames. ``psnr`` is the *mean over frames of the per-frame* PSNR,
        10 * log10(1 / MSE_frame) in dB (the peak is 1 for [0, 1] images); a frame's MSE is
        floored at 1e-10, so a perfect frame counts as 100 dB instead of infinity.
    """
    a = to_float_frames(originals).astype(np.float64)
    b = to_float_frames(reconstructions).astype(np.float64)
    if a.shape != b.shape or a.ndim < 2 or len(a) == 0:
        raise ValueError(
            f"originals and reconstructions must be non-empty (N, ...) arrays of one shape, "
            f"got {a.shape} and {b.shape}."
        )
    per_frame_mse = np.square(a - b).reshape(len(a), -1).mean(axis=1)
    psnr = 10.0 * np.log10(1.0 / np.maximum(per_frame_mse, 1e-10))
    return {"mse": float(per_frame_mse.mean()), "psnr": float(psnr.mean())}


def _check_latents(name, array):
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty (N, Z) array, got shape {array.shape}.")
    return array


def kl_per_dimension(mu, logvar):
    """Mean KL(q(z_u | x) || N(0, 1)) per latent dimension u, in nats: (N, Z), (N, Z) -> (Z,).

    For a diagonal Gaussian posterior the KL splits over dimensions,
    KL_u = 0.5 * (mu_u^2 + exp(logvar_u) - 1 - logvar_u); this averages it over the N frames.
    Its sum is the per-frame KL of the loss. Dimensions near 0 carry no information.
    """
    mu = _check_latents("mu", mu)
    logvar = _check_latents("logvar", logvar)
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have one shape, got {mu.shape} and {logvar.shape}.")
    return (0.5 * (np.square(mu) + np.exp(logvar) - 1.0 - logvar)).mean(axis=0)


def active_dimensions(mu, threshold=0.01):
    """Number of active latent dimensions (Burda, Grosse & Salakhutdinov 2016, IWAE, sec. 5.2).

    A dimension u is active if A_u = Var_x(E_{q(z|x)}[z_u]) > ``threshold`` (0.01 in the
    paper): the posterior mean of z_u, ``mu[:, u]``, must vary across the data. A collapsed
    dimension has the same posterior (close to the prior) for every frame, so its mean is
    constant and the decoder cannot use it.

    Args:
        mu: (N, Z) posterior means of N frames (N >= 2 for a meaningful variance).

    Returns:
        int in [0, Z]. The variance is the population variance over the N frames.
    """
    mu = _check_latents("mu", mu)
    return int(np.sum(mu.var(axis=0) > threshold))


def parameter_counts(z_size=DEFAULT_Z_SIZE):
    """``{"encoder", "decoder", "total"}`` parameter counts (paper, Z=32: 755,744 + 3,592,803)."""
    encoder = build_encoder(z_size).count_params()
    decoder = build_decoder(z_size).count_params()
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}
