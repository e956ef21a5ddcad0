"""Implementation of ``adaact_optax.sharding`` (the public module re-exports it; its docstring is the documentation)."""

from __future__ import annotations

from typing import Any

import jax
from jax import tree_util
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from adaact_optax._src import alignment, boxes

PyTree = Any


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def _is_masked(x) -> bool:
  # optax.MaskedNode (an empty NamedTuple) and other empty placeholders.
  return isinstance(x, tuple) and len(x) == 0


def _check_rank(spec: PartitionSpec, shape, name: str) -> None:
  if len(tuple(spec)) > len(shape):
    raise ValueError(f"partition spec {spec} at '{name}' has {len(tuple(spec))} entries, but "
                     f"the parameter of shape {tuple(shape)} has rank {len(shape)}")


def state_leaf_spec(state_leaf, spec: PartitionSpec | NamedSharding | None,
                    param) -> PartitionSpec:
  """``PartitionSpec`` of one state leaf that sits at a parameter (``state_axes``).

  Shaped for ``optax.tree_map_params``, which hands every state leaf at a
  parameter's path, with the same path of each extra tree, to a function::

    specs = optax.tree_map_params(tx, adaact_optax.sharding.state_leaf_spec, abstract_state,
                                  param_specs, abstract_params,
                                  transform_non_params=lambda _: PartitionSpec())

  Args:
    state_leaf: the state leaf (array or ``jax.ShapeDtypeStruct``).
    spec: the parameter's ``PartitionSpec`` (or ``NamedSharding``; ``None``
      means replicated).
    param: the parameter (array or ``jax.ShapeDtypeStruct``).

  Returns:
    The state leaf's ``PartitionSpec`` (:func:`state_axes` of the
    parameter's spec).

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from jax.sharding import PartitionSpec as P
    >>> import adaact_optax
    >>> params = {"w": jnp.ones((8, 16))}
    >>> tx = adaact_optax.adaact(0.1)
    >>> specs = optax.tree_map_params(
    ...     tx, adaact_optax.sharding.state_leaf_spec, jax.eval_shape(tx.init, params),
    ...     {"w": P("data", "model")}, params, transform_non_params=lambda _: P())
    >>> specs[0].nu["w"], specs[0].count
    (P('data', None), P())
  """
  if isinstance(spec, NamedSharding):
    spec = spec.spec
  return PartitionSpec(*alignment.state_axes(tuple(spec or ()), state_leaf.shape, param.shape))


def _unbox(tree: PyTree) -> PyTree:
  return boxes.unbox(tree)


def state_partition_specs(tx, params_specs: PyTree, params: PyTree) -> PyTree:
  """``PartitionSpec`` of every leaf of ``tx.init(params)`` (see the module doc).

  Args:
    tx: any optax ``GradientTransformation`` (``adaact``, a chain,
      ``inject_hyperparams(adaact)``, ``optax.partition``, ...).
    params_specs: a tree like ``params`` with ``PartitionSpec`` leaves (e.g.
      ``flax.linen.get_partition_spec(variables)['params']``) or
      ``NamedSharding`` leaves; ``None`` means replicated.
    params: the parameters, or their ``jax.ShapeDtypeStruct`` shapes; Flax boxes
      (``nn.Partitioned``, NNX Variables) are unboxed first.

  Returns:
    A tree with the (unboxed) state's structure and ``PartitionSpec``
    leaves; masked-out entries (``optax.MaskedNode``) stay in place.

  Raises:
    ValueError: ``params_specs`` is not keyed like ``params``, or a spec
      has more entries than its parameter's rank (naming the path).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import adaact_optax
    >>> params = {"w": jnp.ones((8, 16))}
    >>> specs = adaact_optax.sharding.state_partition_specs(
    ...     adaact_optax.adaact(0.1), {"w": P("data", "model")}, params)
    >>> specs[0].count, specs[0].mu["w"], specs[0].nu["w"]
    (P(), P('data', 'model'), P('data', None))
  """
  params = _unbox(params)
  params_treedef = jax.tree.structure(params)
  state = jax.eval_shape(tx.init, params)
  specs = jax.tree.map(
      lambda s: PartitionSpec() if s is None else (s.spec if isinstance(s, NamedSharding) else s),
      params_specs, is_leaf=_is_spec_leaf)
  try:
    spec_leaves = params_treedef.flatten_up_to(specs)  # type: ignore[attr-defined]  # jaxlib's PyTreeDef
  except ValueError as e:
    raise ValueError(f"params_specs must have the structure of params: {e}") from None
  flat_params = tree_util.tree_flatten_with_path(params)[0]
  for (path, p), spec in zip(flat_params, spec_leaves):
    _check_rank(spec, p.shape, alignment.path_name(path))

  def param_slots(x):
    """For a subtree keyed like the params, each of its leaves' parameter
    index (None where masked); None if ``x`` is not keyed like the params."""
    treedef = jax.tree.structure(x, is_leaf=_is_masked)
    if treedef.num_leaves == 0:
      return None
    try:
      # Params keyed by x's structure: a masked entry of x may stand for a
      # whole params subtree (optax.masked with a prefix mask).
      parts = treedef.flatten_up_to(tree_util.tree_unflatten(params_treedef,
                                                             range(params_treedef.num_leaves)))
    except (ValueError, TypeError):
      return None
    leaves = treedef.flatten_up_to(x)
    slots = []
    for leaf, part in zip(leaves, parts):
      if _is_masked(leaf):
        slots.append(None)
      elif isinstance(part, int):
        slots.append(part)
      else:
        return None  # an unmasked leaf where params hold a subtree
    if all(s is None for s in slots):
      return None
    return treedef, slots

  def mirrors_params(x) -> bool:
    # A lone array counts only when params is itself one array.
    return param_slots(x) is not None

  def subtree_specs(x):
    found = param_slots(x)
    if found is None:
      return PartitionSpec()  # a leaf outside any params-keyed subtree
    treedef, slots = found
    leaves = treedef.flatten_up_to(x)
    return treedef.unflatten([
        leaf if i is None else PartitionSpec(*alignment.state_axes(spec_leaves[i], leaf.shape,
                                                         flat_params[i][1].shape))
        for leaf, i in zip(leaves, slots)])

  return jax.tree.map(subtree_specs, state, is_leaf=mirrors_params)


def state_shardings(tx, params_shardings: PyTree, params: PyTree,
                    mesh: Mesh | AbstractMesh | None = None) -> PyTree:
  """``NamedSharding`` of every leaf of ``tx.init(params)``, for ``out_shardings``.

  Args:
    tx: any optax ``GradientTransformation``.
    params_shardings: ``NamedSharding`` leaves like ``params``, or
      ``PartitionSpec`` leaves together with ``mesh``.
    params: the parameters, or their ``jax.ShapeDtypeStruct`` shapes.
    mesh: the ``Mesh``; optional when ``params_shardings`` holds
      ``NamedSharding`` leaves.

  Returns:
    A tree with the state's structure and ``NamedSharding`` leaves (see
    ``state_partition_specs``).

  Raises:
    ValueError: a spec names an axis the mesh does not have (naming the
      parameter path and the mesh's axes), or no mesh can be found.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> import adaact_optax
    >>> mesh = jax.make_mesh((1, 1), ("data", "model"))
    >>> params = {"w": jnp.ones((8, 16))}
    >>> tx = adaact_optax.adaact(0.1)
    >>> shardings = adaact_optax.sharding.state_shardings(
    ...     tx, {"w": P("data", "model")}, params, mesh)
    >>> shardings[0].nu["w"].spec
    P('data', None)
    >>> opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
  """
  leaves = jax.tree.leaves(params_shardings, is_leaf=_is_spec_leaf)
  if mesh is None:
    meshes = [s.mesh for s in leaves if isinstance(s, NamedSharding)]
    if not meshes:
      raise ValueError("state_shardings needs NamedSharding leaves or mesh=")
    mesh = meshes[0]
  assert mesh is not None
  axes = set(mesh.axis_names)

  def check(path, s):
    spec = s.spec if isinstance(s, NamedSharding) else s
    for entry in spec or ():
      for axis in (entry if isinstance(entry, tuple) else (entry,)):
        if axis is not None and axis not in axes:
          raise ValueError(f"partition spec {spec} at '{alignment.path_name(path)}' names the "
                           f"axis {axis!r}, which the mesh (axes {mesh.axis_names}) lacks")
  tree_util.tree_map_with_path(check, params_shardings, is_leaf=_is_spec_leaf)
  specs = state_partition_specs(tx, params_shardings, params)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
