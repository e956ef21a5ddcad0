"""The keep-rank statistics layout: helpers for code that builds or reads statistics.

A statistics leaf for a parameter of shape ``K`` is float32 with ``K``'s rank;
along each axis its size is ``K[ax]`` (an input axis), 1 (an output axis) or a
divisor of ``K[ax]`` (blocks of consecutive elements: grouped convolutions,
fused projections). A ``(0,)``-shaped leaf (``UNCAPTURED_SHAPE``) marks a
weight a capture saw but could not record; an element equal to ``NO_ROWS``
(``-0.0``) a feature that met no rows this step. See docs/statistics.md.
"""

from adaact_optax._src import alignment
from adaact_optax._src.alignment import (is_no_rows, is_uncaptured, keep_rank_shape, to_keep_rank,
                                     with_statistics)

#: The shape, ``(0,)``, of the float32 statistics leaf that marks a weight a capture saw but
#: could not record (the same object as ``adaact_optax.capture.UNCAPTURED_SHAPE``).
UNCAPTURED_SHAPE = alignment.UNCAPTURED_SHAPE

#: ``-0.0``: the value of a statistics element whose feature met no rows this step (a weight in
#: the ``cond`` branch not taken, an expert routed no tokens); the transforms keep its second
#: moment. See :func:`is_no_rows`.
NO_ROWS = alignment.NO_ROWS

__all__ = ["NO_ROWS", "UNCAPTURED_SHAPE", "is_no_rows", "is_uncaptured", "keep_rank_shape",
           "to_keep_rank", "with_statistics"]
