"""``migrate_state``: optimizer states written by adaact-optax 0.1.0, converted to today's."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adaact_optax._src import alignment, transform


def migrate_state(old_state: Any, tx: optax.GradientTransformation, params: Any) -> Any:
  """Converts an optimizer state written by adaact-optax 0.1.0 into ``tx.init(params)``'s.

  0.2.0 changed AdaAct's state: the second moment ``nu`` is keep-rank
  (``K[:-1] + (1,)`` where 0.1.0 had ``K[:-1]``; ``(1,)`` for vectors where
  0.1.0 had ``()``; ``(*k, C/G, G)`` for grouped convolutions where 0.1.0
  had ``(*k, C)``), and AdaAct's states gained a ``skipped`` counter.
  ``old_state`` may be the state object of 0.1.0 or a checkpoint restored
  without a target (nested dicts and lists, e.g. orbax's
  ``checkpointer.restore(path)``); it is matched to the new state by path
  names, so any wrapper (chain, ``inject_hyperparams``, ``MultiSteps``,
  ``optax.partition``) works as long as ``tx`` is built like the old one.

  Args:
    old_state: the 0.1.0 optimizer state (or its restored tree).
    tx: the optimizer, built as the checkpoint's was (same hyperparameters,
      wrappers and ``stats_shapes``).
    params: the parameters (or their ``jax.ShapeDtypeStruct`` shapes).

  Returns:
    A state with the structure, shapes and dtypes of ``tx.init(params)``:
    old values carried over (second moments converted to keep-rank), the
    new skip counters at 0.

  Raises:
    ValueError: a leaf of the new state the old one lacks (or the reverse),
      or a shape that no 0.1.0 rule converts, naming the path.

  With a checkpoint, pass the optimizer-state entry of a restore made
  without a target (Orbax's ``StandardCheckpointer().restore(path)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> tx = adaact_optax.adaact(0.1)
    >>> old = [{"count": jnp.array(4), "mu": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)},
    ...         "nu": {"w": jnp.full(3, 0.5), "b": jnp.array(1.0)}}, {}, {}]
    >>> new = adaact_optax.migrate_state(old, tx, params)   # the 0.1.0 layout, as restored
    >>> new[0].nu["w"].shape, new[0].nu["b"].shape, int(new[0].skipped)
    ((3, 1), (1,), 0)
  """
  template = jax.eval_shape(tx.init, params)
  old = {alignment.path_name(p): leaf
         for p, leaf in jax.tree.leaves_with_path(old_state)}
  param_shapes = {alignment.path_name(p): tuple(jnp.shape(x))
                  for p, x in jax.tree.leaves_with_path(params)}
  states = (transform.ScaleByAdaActState, transform.ScaleByActivationRMSState)
  new_counters = {
      "/".join(filter(None, (alignment.path_name(p), "skipped")))
      for p, node in jax.tree.leaves_with_path(
          template, is_leaf=lambda x: isinstance(x, states)) if isinstance(node, states)}
  used = set()

  def param_for(name):
    # The longest parameter path that ends the state path ('0/nu/Dense_0/kernel').
    hits = [p for p in param_shapes if name == p or name.endswith("/" + p)]
    return max(hits, key=len) if hits else None

  def convert(path, t):
    name = alignment.path_name(path)
    if name not in old:
      if name in new_counters:
        return jnp.zeros(t.shape, t.dtype)
      raise ValueError(
          f"migrate_state: the new state has '{name}' (shape {t.shape}), which the old state "
          f"lacks; its paths: {sorted(old)[:8]}... Build tx exactly as the checkpoint's "
          "optimizer was built (the same wrappers and hyperparameters).")
    used.add(name)
    value = jnp.asarray(old[name])
    if value.shape == t.shape:
      return value.astype(t.dtype)
    param = param_for(name)
    if param is None:
      raise ValueError(f"migrate_state: '{name}' has shape {value.shape} in the old state and "
                       f"{t.shape} in the new one, and is no parameter's second moment")
    converted = alignment.to_keep_rank(value, param_shapes[param], param)
    if not all(d in (1, n) for d, n in zip(converted.shape, t.shape)):
      raise ValueError(
          f"migrate_state: the 0.1.0 second moment at '{name}' of shape {value.shape} "
          f"(keep-rank {converted.shape}) does not fit the new state's {t.shape}: build tx "
          "with the stats_shapes the checkpoint's optimizer had")
    return jnp.broadcast_to(converted, t.shape).astype(t.dtype)

  new_state = jax.tree_util.tree_map_with_path(convert, template)
  unused = sorted(set(old) - used)
  if unused:
    raise ValueError(f"migrate_state: the old state has {unused[:8]}, which the new state "
                     "lacks: it was written by another optimizer, or tx is built differently")
  return new_state
