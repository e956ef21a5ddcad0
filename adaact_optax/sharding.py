"""Shardings of an optimizer state from the shardings of its parameters.

With parameters sharded on a ``Mesh`` (FSDP over a data axis, tensor
parallelism over a model axis), the optimizer state should be sharded like
them so that ``jax.jit(step, out_shardings=...)`` never gathers it:

* a state leaf shaped like its parameter (AdaAct's ``mu``, Adam's moments)
  gets the parameter's spec;
* AdaAct's ``nu`` (one value per input feature: the parameter's leading
  axes, shape ``K[:-1]`` or a prefix) gets the parameter's spec truncated to
  its rank, so each device keeps the statistics of the input rows it holds;
  a grouped convolution's ``(*k, C)`` keeps the kernel axes' spec and
  replicates the channel axis (``C`` spans all groups);
* everything else (step counts, ``inject_hyperparams`` scalars, masked or
  unrelated state) is replicated.

Only shapes are used (``jax.eval_shape(tx.init, params)``); no FLOPs.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import tree_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adaact_optax import matching

PyTree = Any


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def _padded(spec: PartitionSpec, rank: int, name: str, shape) -> tuple:
  entries = tuple(spec)
  if len(entries) > rank:
    raise ValueError(f"partition spec {spec} at '{name}' has {len(entries)} entries, but the "
                     f"parameter of shape {tuple(shape)} has rank {rank}")
  return entries + (None,) * (rank - len(entries))


def _leaf_spec(state_shape, param_shape, spec: PartitionSpec, name: str) -> PartitionSpec:
  """The spec of one state leaf that sits at the parameter ``name``."""
  s, k = tuple(state_shape), tuple(param_shape)
  entries = _padded(spec, len(k), name, k)
  if not s:
    return PartitionSpec()
  if s == k:
    return PartitionSpec(*entries)
  try:
    plan = matching.broadcast_plan(s, k, name)
  except ValueError:
    return PartitionSpec()  # a state of its own shape: nothing to align with
  if plan == "prefix":
    return PartitionSpec(*entries[:len(s)])
  # grouped conv: kernel (*k, C/G, C_out), state (*k, C).
  return PartitionSpec(*entries[:len(s) - 1], None)


def state_partition_specs(tx, params_specs: PyTree, params: PyTree) -> PyTree:
  """``PartitionSpec`` of every leaf of ``tx.init(params)``.

  Args:
    tx: any optax ``GradientTransformation`` (``adaact``, a chain,
      ``inject_hyperparams(adaact)``, ...).
    params_specs: a tree like ``params`` with ``PartitionSpec`` leaves (e.g.
      ``flax.linen.get_partition_spec(variables)['params']``) or
      ``NamedSharding`` leaves; ``None`` means replicated.
    params: the parameters, or their ``jax.ShapeDtypeStruct`` shapes.

  Returns:
    A tree with the state's structure and ``PartitionSpec`` leaves.
  """
  params_treedef = jax.tree.structure(params)
  state = jax.eval_shape(tx.init, params)
  specs = jax.tree.map(
      lambda s: PartitionSpec() if s is None else (s.spec if isinstance(s, NamedSharding) else s),
      params_specs, is_leaf=_is_spec_leaf)
  try:
    spec_leaves = params_treedef.flatten_up_to(specs)
  except ValueError as e:
    raise ValueError(f"params_specs must have the structure of params: {e}") from None
  flat_params = tree_util.tree_flatten_with_path(params)[0]

  def mirrors_params(x) -> bool:
    # A subtree keyed like the params (mu, nu, Adam's moments...); a lone
    # array counts only when params is itself one array.
    return jax.tree.structure(x) == params_treedef

  def subtree_specs(x):
    if not mirrors_params(x):
      return PartitionSpec()  # a leaf outside any params-shaped subtree
    leaves = params_treedef.flatten_up_to(x)
    return params_treedef.unflatten([
        _leaf_spec(leaf.shape, p.shape, spec, matching.path_name(path))
        for leaf, (path, p), spec in zip(leaves, flat_params, spec_leaves)])

  return jax.tree.map(subtree_specs, state, is_leaf=mirrors_params)


def state_shardings(tx, params_shardings: PyTree, params: PyTree,
                    mesh: Mesh | None = None) -> PyTree:
  """``NamedSharding`` of every leaf of ``tx.init(params)``, for ``out_shardings``.

  Args:
    tx: any optax ``GradientTransformation``.
    params_shardings: ``NamedSharding`` leaves like ``params``, or
      ``PartitionSpec`` leaves together with ``mesh``.
    params: the parameters, or their ``jax.ShapeDtypeStruct`` shapes.
    mesh: the ``Mesh``; optional when ``params_shardings`` holds
      ``NamedSharding`` leaves.

  Raises:
    ValueError: a spec names an axis the mesh does not have (naming the
      parameter path and the mesh's axes), or no mesh can be found.
  """
  leaves = jax.tree.leaves(params_shardings, is_leaf=_is_spec_leaf)
  if mesh is None:
    meshes = [s.mesh for s in leaves if isinstance(s, NamedSharding)]
    if not meshes:
      raise ValueError("state_shardings needs NamedSharding leaves or mesh=")
    mesh = meshes[0]
  axes = set(mesh.axis_names)

  def check(path, s):
    spec = s.spec if isinstance(s, NamedSharding) else s
    for entry in spec or ():
      for axis in (entry if isinstance(entry, tuple) else (entry,)):
        if axis is not None and axis not in axes:
          raise ValueError(f"partition spec {spec} at '{matching.path_name(path)}' names the "
                           f"axis {axis!r}, which the mesh (axes {mesh.axis_names}) lacks")
  tree_util.tree_map_with_path(check, params_shardings, is_leaf=_is_spec_leaf)
  specs = state_partition_specs(tx, params_shardings, params)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
