"""Example programs for adaact-optax, one folder per task (as in Flax's examples).

* ``quickstart.py``: the shortest complete AdaAct training loop.
* ``images/``: image classifiers (MLP, CNN, ResNet-20, ViT) on digits, MNIST-1D, CIFAR-10.
* ``lm/``: a byte-level GPT on the Python standard library's source, and its diagnosis.
* ``multihost/``: data- and model-parallel training on a 2-D mesh, one or several processes.
* ``scaling_report.py``: AdaAct's per-layer scaling after an ``images`` or ``lm`` run.
* ``optimizers.py`` and ``transformer.py``: the optimizers and the transformer block
  the tasks share.

Each task folder holds ``models.py``, ``input_pipeline.py`` and ``train.py``; run
``python -m examples.<task>.train --help`` from the repository root. The optimizer
comparison that drives ``images`` and ``lm`` is a tool: ``python -m tools.compare``.
"""
