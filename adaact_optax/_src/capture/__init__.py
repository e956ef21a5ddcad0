"""The capture engine (private): see README.md here and ``adaact_optax.capture``."""
