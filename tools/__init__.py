"""Tools that drive the examples: ``python -m tools.compare`` (the optimizer comparison)."""
