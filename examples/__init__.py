"""Example models, datasets, training and comparison programs for adaact-optax."""
