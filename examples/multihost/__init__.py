"""Data- and model-parallel training: ``models.py``, ``input_pipeline.py``, ``train.py``."""
