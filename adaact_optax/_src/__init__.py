"""Private implementation modules of adaact_optax (no public API here)."""
