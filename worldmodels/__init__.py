"""Runtime support for the World Models pipeline: environment, storage, rollouts, evolution."""
