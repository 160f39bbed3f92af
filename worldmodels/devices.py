"""Which devices TensorFlow will use, said once at the start of every training script."""

from __future__ import annotations


def describe_devices() -> str:
    """E.g. ``devices: GPU x1 (/physical_device:GPU:0), CPU`` or ``devices: CPU only (no GPU visible)``."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "devices: CPU only (no GPU visible to TensorFlow)"
    return f"devices: GPU x{len(gpus)} ({', '.join(g.name for g in gpus)}), CPU"
