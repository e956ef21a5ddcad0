"""Image classification: ``models.py``, ``input_pipeline.py`` (local datasets), ``train.py``."""
