"""V's training step with the decoder's first transposed convolution computed two ways, side by side.

    python benchmarks/bench_decoder.py                 # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_decoder.py --batch 100 --rounds 5

The decoder's first layer maps a (B, 1, 1, 1024) input to (B, 5, 5, 128). As a plain
``keras.layers.Conv2DTranspose`` TensorFlow runs it through its Conv2DBackpropInput CPU kernel,
which on some CPUs is very slow for a 1x1 input (measured 1.6 s for a batch of 100 on an AVX2
EPYC with TensorFlow 2.21). ``models.vae.Conv2DTransposeFrom1x1`` computes the same outputs with
the same weights as one matrix product. This prints, in alternating rounds on the same cores:
training-step time of the full ConvVAE (paper size) with the plain layer (the baseline) and with
the matrix-product layer, their ratio, and the largest difference of the two decoders' outputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def plain_copy(vae):
    """A ConvVAE like ``vae`` (same weights) whose decoder's first layer is a plain Conv2DTranspose."""
    import keras

    import models.vae

    fast_layer = models.vae.Conv2DTransposeFrom1x1
    models.vae.Conv2DTransposeFrom1x1 = keras.layers.Conv2DTranspose  # build_decoder looks it up at call time
    try:
        plain = models.vae.ConvVAE(z_size=vae.z_size, seed=0)
    finally:
        models.vae.Conv2DTransposeFrom1x1 = fast_layer
    plain.set_weights(vae.get_weights())
    return plain


def step_seconds(model, frames, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(frames)
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=100, help="frames per training step (paper: 100)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each variant")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from models.vae import Conv2DTransposeFrom1x1, ConvVAE

    fast = ConvVAE(seed=0)
    plain = plain_copy(fast)
    # The comparison means nothing unless the two decoders really use the two layer kinds.
    if not isinstance(fast.decoder.get_layer("dec_deconv1"), Conv2DTransposeFrom1x1) or \
            type(plain.decoder.get_layer("dec_deconv1")) is not keras.layers.Conv2DTranspose:
        raise RuntimeError("dec_deconv1 is not Conv2DTransposeFrom1x1 in ConvVAE and Conv2DTranspose in its "
                           "plain copy: models.vae changed, update this benchmark")
    z = np.random.default_rng(1).normal(size=(args.batch, fast.z_size)).astype(np.float32)
    difference = float(np.abs(fast.decode(z) - plain.decode(z)).max())

    frames = np.random.default_rng(0).integers(0, 256, size=(args.batch, 64, 64, 3), dtype=np.uint8)
    times = {"plain Conv2DTranspose": [], "matrix product (ours)": []}
    for model in (plain, fast):
        model.compile(optimizer=keras.optimizers.Adam(1e-4))
        model.train_on_batch(frames)  # trace and warm up
    for _ in range(args.rounds):
        times["plain Conv2DTranspose"].append(step_seconds(plain, frames, args.steps))
        times["matrix product (ours)"].append(step_seconds(fast, frames, args.steps))

    base = statistics.median(times["plain Conv2DTranspose"])
    print(f"ConvVAE training step, batch {args.batch}, median of {args.rounds} rounds x {args.steps} steps")
    print("| first decoder layer | s / step | speed vs plain |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {base / median:.2f}x |")
    print(f"largest output difference of the two decoders: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
