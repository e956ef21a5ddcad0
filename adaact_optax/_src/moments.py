"""Implementation of ``adaact_optax.moments`` (the public module re-exports it; its docstring is the documentation)."""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Padding = Union[str, int, Sequence[Union[int, tuple[int, int]]]]


class InputMoments(NamedTuple):
  """A layer input's second moment and the number of rows it averages.

  Attributes:
    mean: float32 array of the kernel's input-feature shape, ``mean(a*a)``.
    rows: how many rows (example x position) the mean is over, a Python int
      (a traced float32 scalar when a row mask weighs the rows); used to
      average several applications of one layer exactly.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import moments
    >>> moments.InputMoments(mean=jnp.ones(3), rows=8).rows
    8
  """

  mean: jax.Array
  rows: int | jax.Array


def combine(first: InputMoments, second: InputMoments) -> InputMoments:
  """Pools two sets of rows: the mean over all rows of both.

  Args:
    first: statistics of one set of rows.
    second: statistics of another set of rows, with a mean of the same shape.

  Returns:
    ``InputMoments`` whose mean is the row-weighted mean of both and whose
    ``rows`` is their sum: what one pass over all the rows would give.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import moments
    >>> a = moments.InputMoments(jnp.array([1.0]), rows=1)
    >>> b = moments.InputMoments(jnp.array([4.0]), rows=3)
    >>> pooled = moments.combine(a, b)
    >>> pooled.mean.tolist(), pooled.rows
    ([3.25], 4)
  """
  rows = first.rows + second.rows
  mean = (first.mean * (first.rows / rows)) + (second.mean * (second.rows / rows))
  return InputMoments(mean, rows)


def _squares(x: jax.Array) -> jax.Array:
  x = lax.stop_gradient(x)
  return jnp.square(x.astype(jnp.float32))


def dense_moments(
    x: jax.Array,
    contracting_axes: Sequence[int] = (-1,),
    batch_axes: Sequence[int] = (),
) -> InputMoments:
  """Second moment of a dense (``dot_general``) layer's input.

  Args:
    x: the layer input, any rank and dtype.
    contracting_axes: axes of ``x`` the kernel contracts (``DenseGeneral``'s
      ``axis``); ``nn.Dense`` contracts the last axis.
    batch_axes: axes that index separate kernels (``DenseGeneral``'s
      ``batch_dims``); each keeps its own statistics.

  Returns:
    ``InputMoments`` whose mean has shape ``batch shape + contracted shape``
    (the kernel's input axes, in the kernel's order) and whose rows count
    every other axis.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import moments
    >>> x = jnp.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])   # 2 rows, 3 features
    >>> m = moments.dense_moments(x)
    >>> m.mean.tolist(), m.rows
    ([4.5, 8.5, 14.5], 2)
  """
  ndim = x.ndim
  contracting = tuple(a % ndim for a in contracting_axes)
  batch = tuple(a % ndim for a in batch_axes)
  reduced = tuple(a for a in range(ndim) if a not in contracting + batch)
  sq = _squares(x)
  mean = jnp.mean(sq, axis=reduced) if reduced else sq
  # jnp.mean keeps the remaining axes in ascending order; the kernel orders
  # them batch axes first, then contracting axes in the order given.
  kept = [a for a in range(ndim) if a not in reduced]
  mean = jnp.transpose(mean, [kept.index(a) for a in batch + contracting])
  rows = math.prod(x.shape[a] for a in reduced)
  return InputMoments(mean, rows)


def _pairs(padding: Padding, rank: int):
  if isinstance(padding, int):
    return ((padding, padding),) * rank
  pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  if len(pairs) != rank or any(len(p) != 2 for p in pairs):
    raise ValueError(f"padding {padding!r} must give one (low, high) pair for "
                     f"each of the {rank} spatial axes")
  return pairs


def _window_matrix(n: int, k: int, stride: int, input_dilation: int, kernel_dilation: int,
                   low: int, out: int) -> np.ndarray:
  """(k, n) 0/1 float32: ``[o, i]`` = 1 when kernel offset o reads input row i somewhere.

  One spatial axis; ``low`` is the padding before it (after input dilation, as
  in ``lax.conv_general_dilated``), ``out`` the number of output positions.
  """
  m = np.zeros((k, n), np.float32)
  # Position q = p * stride + o * kernel_dilation of the padded, dilated axis holds
  # input row (q - low) / input_dilation when that is a whole number in [0, n).
  q = np.arange(out)[None, :] * stride + np.arange(k)[:, None] * kernel_dilation - low
  row = q // input_dilation
  hit = (q % input_dilation == 0) & (row >= 0) & (row < n)
  offsets = np.broadcast_to(np.arange(k)[:, None], q.shape)
  np.add.at(m, (offsets[hit], row[hit]), 1.0)
  return m


def conv_moments(
    x: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int] | int = 1,
    padding: Padding = "SAME",
    input_dilation: Sequence[int] | int = 1,
    kernel_dilation: Sequence[int] | int = 1,
) -> InputMoments:
  """Second moment of each patch element of a channels-last convolution.

  Follows ``flax.linen.Conv``'s conventions, so the zeros the convolution
  pads in count as rows of zeros and ``CIRCULAR``/``REFLECT``/``CAUSAL``
  padding see the same wrapped, reflected or shifted values.

  Args:
    x: input of shape ``(*batch, *spatial, C)``; several leading batch axes
      (or none) are allowed, as in Flax.
    kernel_size: spatial kernel shape ``k``, one int per spatial axis.
    strides, input_dilation, kernel_dilation: ints or one per spatial axis.
    padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'``, ``'CIRCULAR'``,
      ``'REFLECT'``, ``'CAUSAL'`` (1-D), an int, or ``(low, high)`` pairs.

  Returns:
    ``InputMoments`` with mean of shape ``(*kernel_size, C)`` (float32): the
    mean over every (example, output position) of the squared patch element.
    Grouped convolutions use the same statistic; see ``adaact_optax.layout``.

  Raises:
    ValueError: if ``x`` has fewer than ``len(kernel_size)`` spatial axes
      plus channels, ``padding`` pairs do not match the spatial axes,
      ``'CAUSAL'`` padding is used in more than 1-D, or the convolution has
      no output position.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import moments
    >>> x = jnp.ones((2, 5, 5, 3))                         # (batch, H, W, C)
    >>> m = moments.conv_moments(x, (3, 3), padding="SAME")
    >>> m.mean.shape, m.rows                               # (kh, kw, C); 2 x 5 x 5 rows
    ((3, 3, 3), 50)
    >>> # Padded zeros count as rows: of the 25 output positions, a corner tap
    >>> # reads a real pixel at 16, an edge tap at 20, the centre at all 25.
    >>> (m.mean[:, :, 0] * 25).round().astype(int).tolist()
    [[16, 20, 16], [20, 25, 20], [16, 20, 16]]
  """
  kernel_size = tuple(kernel_size)
  rank = len(kernel_size)
  as_tuple = lambda v: (v,) * rank if isinstance(v, int) else tuple(v)
  strides, input_dilation, kernel_dilation = map(
      as_tuple, (strides, input_dilation, kernel_dilation))
  if x.ndim < rank + 1:
    raise ValueError(f"conv input of shape {x.shape} has fewer than "
                     f"{rank} spatial axes plus channels")
  spatial_and_c = x.shape[x.ndim - rank - 1:]
  batch = math.prod(x.shape[:x.ndim - rank - 1])
  # S: squares with every leading batch axis flattened, shape (B, *spatial, C).
  s = _squares(x).reshape((batch,) + spatial_and_c)

  dilated_kernel = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation))
  if isinstance(padding, str) and padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
    if padding == "CAUSAL":
      if rank != 1:
        raise ValueError("CAUSAL padding is only defined for 1-D convolutions")
      pads, mode = [(dilated_kernel[0] - 1, 0)], "constant"
    else:
      pads = [((k - 1) // 2, k // 2) for k in dilated_kernel]
      mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
    # As Flax does to x: pad before any input dilation, then convolve VALID.
    s = jnp.pad(s, [(0, 0)] + pads + [(0, 0)], mode=mode)
    pads = [(0, 0)] * rank
  elif isinstance(padding, str):
    # lax resolves SAME against the undilated input; mirror it exactly.
    pads = list(lax.padtype_to_pads(spatial_and_c[:-1], dilated_kernel, strides, padding))
  else:
    pads = _pairs(padding, rank)

  sums, rows = conv_window_sums(s, kernel_size, strides, pads, input_dilation, kernel_dilation)
  return InputMoments(sums / rows, rows)


def conv_window_sums(
    s: jax.Array,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    input_dilation: Sequence[int],
    kernel_dilation: Sequence[int],
) -> tuple[jax.Array, int]:
  """Sums of the squared patch elements of a convolution, without patches.

  Args:
    s: squared input, float32, shape ``(B, *spatial, C)``.
    kernel_size, strides, input_dilation, kernel_dilation: one int per
      spatial axis, as ``lax.conv_general_dilated``'s ``rhs`` spatial shape,
      ``window_strides``, ``lhs_dilation`` and ``rhs_dilation``.
    pads: one ``(low, high)`` pair per spatial axis (applied after input
      dilation, as in ``lax.conv_general_dilated``).

  Returns:
    ``(sums, rows)``: ``sums`` of shape ``(*kernel_size, C)`` holds, for each
    patch element, the sum of its squares over every (example, output
    position); ``rows`` = B x number of output positions (a Python int).

  Raises:
    ValueError: if the convolution has no output position.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import moments
    >>> squares = jnp.ones((2, 5, 5, 3))                   # (B, H, W, C), already squared
    >>> sums, rows = moments.conv_window_sums(
    ...     squares, (3, 3), strides=(1, 1), pads=((0, 0), (0, 0)),
    ...     input_dilation=(1, 1), kernel_dilation=(1, 1))
    >>> sums.shape, rows                                   # 2 examples x 3 x 3 positions
    ((3, 3, 3), 18)
  """
  kernel_size = tuple(kernel_size)
  in_shape = s.shape[1:-1]
  dilated_kernel = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation))
  effective = [(n - 1) * d + 1 + lo + hi
               for n, d, (lo, hi) in zip(in_shape, input_dilation, pads)]
  out_shape = tuple((e - k) // st + 1 for e, k, st in zip(effective, dilated_kernel, strides))
  if any(p <= 0 for p in out_shape):
    raise ValueError(f"conv input of shape {s.shape} with kernel {kernel_size}, "
                     f"strides {tuple(strides)} and padding {tuple(pads)} has no output")

  # Window sums: result[o, c] = sum_{b,p} S[b, i, c] over the input rows i that
  # output position p reads at kernel offset o. Per spatial axis that is a
  # contraction with a 0/1 matrix (k, n), which folds in padding, strides and
  # dilations without materialising a padded S. The batch is summed last, so a
  # batch sharded over devices is all-reduced only as the (..., k, C) result.
  sums = s                                                  # (B, *spatial, C)
  for axis, (n, k, st, di, dk, (lo, _), p) in enumerate(zip(
      in_shape, kernel_size, strides, input_dilation, kernel_dilation, pads, out_shape)):
    m = jnp.asarray(_window_matrix(n, k, st, di, dk, lo, p))
    lead, rest = sums.shape[:axis + 1], sums.shape[axis + 2:]
    if math.prod(rest) >= k:
      # A batched matmul over the leading (B, k...) axes, (k, n) @ (n, rest): x's
      # layout is kept, no batch-sized transpose (in a model on CPU, contracting
      # axis 1 in place cost ~0.4x ResNet-20's forward pass). The broadcast m is
      # no larger than the data.
      out = lax.dot_general(jnp.broadcast_to(m, (math.prod(lead),) + m.shape),
                            sums.reshape(math.prod(lead), n, math.prod(rest)),
                            (((2,), (1,)), ((0,), (0,))), precision=lax.Precision.HIGHEST)
      sums = out.reshape(lead + (k,) + rest)               # (B, k..., k, ..., C)
    else:  # fewer trailing elements than taps (e.g. 1-D, few channels): in place
      out = lax.dot_general(sums, m, (((axis + 1,), (1,)), ((), ())),
                            precision=lax.Precision.HIGHEST)
      sums = jnp.moveaxis(out, -1, axis + 1)
  sums = jnp.sum(sums, axis=0)                              # (*kernel_size, C)
  return sums, s.shape[0] * math.prod(out_shape)


def input_moments(x: jax.Array, x_axes: Sequence[int], param_axes: Sequence[int],
                  param_shape: Sequence[int], row_weights: jax.Array | None = None
                  ) -> InputMoments:
  """Second moment of ``x`` laid over a parameter's axes (the keep-rank layout).

  For a weight whose input axes ``param_axes`` multiply ``x``'s axes
  ``x_axes`` (in that order): the mean of ``x**2`` over every other axis of
  ``x`` (the rows), shaped like the parameter with size 1 on its other axes.
  A Dense kernel ``(in, out)`` fed ``x[..., in]`` is ``x_axes=(-1,)``,
  ``param_axes=(0,)`` -> shape ``(in, 1)``.

  ``row_weights`` (optional, >= 0, e.g. a 0/1 padding mask) of the shape of
  ``x``'s leading axes weights the rows when those axes are rows (not among
  ``x_axes``); otherwise it is ignored. ``rows`` is then the (traced) total
  weight.

  Args:
    x: the input the parameter multiplies, any rank and dtype.
    x_axes: the axes of ``x`` the parameter contracts.
    param_axes: the parameter axes they meet, in the same order.
    param_shape: the parameter's shape.
    row_weights: optional weights of ``x``'s leading (row) axes, see above.

  Returns:
    ``InputMoments`` whose float32 mean has ``len(param_shape)`` axes:
    ``param_shape[p]`` along each of ``param_axes``, 1 along the others.

  Raises:
    ValueError: if the axes' counts or sizes do not match.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import moments
    >>> x = jnp.full((4, 3), 2.0)                          # 4 rows into a (3, 2) kernel
    >>> m = moments.input_moments(x, x_axes=(-1,), param_axes=(0,), param_shape=(3, 2))
    >>> m.mean.shape, m.mean.ravel().tolist(), m.rows
    ((3, 1), [4.0, 4.0, 4.0], 4)
  """
  x_axes = tuple(a % x.ndim for a in x_axes)
  param_axes = tuple(a % len(param_shape) for a in param_axes)
  if len(x_axes) != len(param_axes) or any(
      x.shape[a] != param_shape[p] for a, p in zip(x_axes, param_axes)):
    raise ValueError(f"input axes {x_axes} of shape {tuple(x.shape[a] for a in x_axes)} do not "
                     f"match the parameter's axes {param_axes} of its shape {tuple(param_shape)}")
  weights = None
  if row_weights is not None:
    mask_rank = jnp.ndim(row_weights)
    if (tuple(x.shape[:mask_rank]) == tuple(jnp.shape(row_weights))
        and not set(range(mask_rank)) & set(x_axes)):
      weights = lax.stop_gradient(jnp.asarray(row_weights, jnp.float32))
  if weights is not None:
    # sqrt(w) * x has squares w * x**2: its plain mean, rescaled to the total weight.
    w = weights.reshape(weights.shape + (1,) * (x.ndim - weights.ndim))
    m = dense_moments(jnp.sqrt(w) * lax.stop_gradient(x).astype(jnp.float32), x_axes)
    rows = jnp.sum(weights) * (m.rows // weights.size)
    m = InputMoments(m.mean * (m.rows / jnp.where(rows > 0, rows, 1.0)), rows)
  else:
    m = dense_moments(x, x_axes)                    # (x_axes sizes, in x_axes order)
  order = sorted(range(len(param_axes)), key=lambda i: param_axes[i])
  mean = jnp.transpose(m.mean, order)
  shape = [param_shape[p] if p in param_axes else 1 for p in range(len(param_shape))]
  return InputMoments(mean.reshape(shape), m.rows)


def constant_moments(rows: int | jax.Array = 1) -> InputMoments:
  """The statistic of a bias: a weight on the constant input 1.

  Args:
    rows: how many rows the bias was applied to (for ``combine``).

  Returns:
    ``InputMoments`` with the float32 scalar mean 1.

  Examples:
    >>> from adaact_optax import moments
    >>> m = moments.constant_moments(rows=4)
    >>> float(m.mean), m.rows
    (1.0, 4)
  """
  return InputMoments(jnp.ones((), jnp.float32), rows)


# The default floor that ``token_moments`` adds to a token's frequency. With power 0.5 no
# embedding row gets more than 1/sqrt(0.01) = 10x the step of an input feature whose second
# moment is 1, however rare its token.
EMBEDDING_FLOOR = 1e-2


def token_moments(ids: jax.Array, num_embeddings: int,
                  floor: float = EMBEDDING_FLOOR) -> InputMoments:
  """Second moment of the one-hot input an embedding lookup multiplies, plus a floor.

  ``table[ids]`` is ``one_hot(ids) @ table``, so row ``v`` of the table sees
  the input ``one_hot(ids)[v]``, whose mean square over the rows (tokens) is
  the frequency of token ``v`` in the batch. Counted with a segment sum: no
  ``(tokens, num_embeddings)`` one-hot is built.

  The floor is *added* (not ``max``-ed) so the statistic stays a mean over
  rows: pooling repeated uses (``combine``), averaging across devices and
  the EMA all stay exact, and every ``V_hat >= floor``, which bounds a rare
  or unseen token's step scale by ``floor ** -power``.

  Args:
    ids: integer token ids, any shape (every element is a row).
    num_embeddings: vocabulary size; ids outside ``[0, num_embeddings)`` are
      not counted.
    floor: added to every frequency, >= 0.

  Returns:
    ``InputMoments`` with mean of shape ``(num_embeddings,)`` (float32).

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import moments
    >>> m = moments.token_moments(jnp.array([1, 2, 2, 3]), num_embeddings=5, floor=0.0)
    >>> m.mean.tolist(), m.rows
    ([0.0, 0.25, 0.5, 0.25, 0.0], 4)
  """
  ids = lax.stop_gradient(ids).reshape(-1)
  counts = jax.ops.segment_sum(jnp.ones(ids.shape, jnp.float32), ids,
                               num_segments=num_embeddings)
  return InputMoments(counts / max(ids.size, 1) + jnp.float32(floor), ids.size)
