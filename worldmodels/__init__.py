"""Runtime support for the World Models pipeline: environment, storage, rollouts, evolution."""

# Every entry point imports this package before TensorFlow: the one place to quiet its C++ log.
from worldmodels.devices import quiet_tensorflow as _quiet_tensorflow

_quiet_tensorflow()
