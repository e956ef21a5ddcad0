"""Shardings of an optimizer state from the shardings of its parameters.

With parameters sharded on a ``Mesh`` (FSDP over a data axis, tensor
parallelism over a model axis), the optimizer state should be sharded like
them so that ``jax.jit(step, out_shardings=...)`` never gathers it. The rule
(``state_axes``), for every state leaf that sits at a parameter's path:

* an axis where the leaf's size equals the parameter's keeps the
  parameter's spec entry; every other axis (size 1: an output axis AdaAct
  broadcasts over; blocks of a grouped convolution) is replicated. So
  ``mu`` (parameter-shaped) gets the parameter's spec and AdaAct's ``nu``
  (keep-rank: e.g. ``(in, 1)`` for a Dense kernel ``(in, out)``) keeps the
  spec of its input axes: each device holds the statistics of the input rows
  it holds;
* a leaf of lower rank (the 0.1.0 layout, the parameter's leading axes)
  keeps the leading entries; any other shape is replicated.

Leaves outside any parameter-keyed subtree (step counts,
``inject_hyperparams`` scalars) are replicated. Subtrees keyed like the
parameters with some entries masked out (``optax.masked``,
``optax.partition``: ``optax.MaskedNode`` where another branch owns the
parameter) are sharded like the parameters they hold.

Flax users rarely need this module: AdaAct's state built from boxed
parameters (``nn.with_partitioning``, ``nn.with_logical_partitioning``,
``nnx.with_partitioning``) carries the same rule as metadata, so
``nn.get_partition_spec`` / ``nnx.get_partition_spec`` of the state give the
same specs (see ``docs/partitioning.md``).

Only shapes are used (``jax.eval_shape(tx.init, params)``); no FLOPs.
"""

from adaact_optax._src.alignment import state_axes
from adaact_optax._src.sharding import (state_leaf_spec, state_partition_specs, state_shardings)

__all__ = ["state_axes", "state_leaf_spec", "state_partition_specs", "state_shardings"]

# Documented, doctested and pickled as members of this module.
for _name in ('state_leaf_spec', 'state_partition_specs', 'state_shardings', 'state_axes'):
  globals()[_name].__module__ = __name__
del _name
