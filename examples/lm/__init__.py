"""Byte-level language modelling: ``models.py``, ``input_pipeline.py`` (the standard
library corpus), ``train.py``, and ``diagnosis.py`` (why AdaAct trails AdamW here)."""
