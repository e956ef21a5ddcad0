"""Optax wrappers that do not forward ``extra_args``, made to forward AdaAct's statistics.

Most optax wrappers (``chain``, ``partition``, ``masked``, ``inject_hyperparams``,
``apply_if_finite``, ``MultiSteps``...) pass the keyword arguments of ``update``
on to the optimizer they wrap. ``optax.lookahead`` does not: its ``update``
takes ``(updates, state, params)`` only, so ``activation_stats=`` is a
``TypeError`` there, and through ``optax.chain`` (which drops the arguments a
transformation does not take) AdaAct never sees its statistics.
"""

from __future__ import annotations

import jax
import optax


def lookahead(fast_optimizer: optax.GradientTransformation, sync_period: int,
              slow_step_size: jax.typing.ArrayLike,
              reset_state: bool = False) -> optax.GradientTransformationExtraArgs:
  """``optax.lookahead`` whose ``update`` passes ``activation_stats`` to the fast optimizer.

  The same optimizer as ``optax.lookahead(fast_optimizer, sync_period,
  slow_step_size, reset_state)`` (same state, same ``optax.LookaheadParams``):
  every ``sync_period`` fast steps the slow parameters move ``slow_step_size``
  of the way to the fast ones, and the fast ones restart from there. Its
  ``update(updates, state, params, **extra_args)`` hands ``extra_args`` (AdaAct's
  ``activation_stats=``) to ``fast_optimizer.update``.

  Args:
    fast_optimizer: the inner optimizer, e.g. ``adaact_optax.adaact(0.1)``.
    sync_period: fast steps between synchronisations, >= 1.
    slow_step_size: how far the slow parameters move towards the fast ones.
    reset_state: re-initialise the fast optimizer's state at each
      synchronisation, as in ``optax.lookahead``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is
    ``optax.LookaheadState`` and whose ``update`` takes
    ``params=optax.LookaheadParams(fast=..., slow=...)``; compute the gradients
    and statistics at ``params.fast``.

  Raises:
    ValueError: ``sync_period < 1`` (from optax), or ``update`` called with
      ``params`` that are not ``optax.LookaheadParams``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import adaact_optax
    >>> def loss(params, x):
    ...   return jnp.mean((x @ params["w"]) ** 2)
    >>> tx = adaact_optax.lookahead(adaact_optax.adaact(0.1), sync_period=2, slow_step_size=0.5)
    >>> params = optax.LookaheadParams.init_synced({"w": jnp.ones((3, 1))})
    >>> state = tx.init(params)
    >>> x = jnp.ones((4, 3))
    >>> for _ in range(2):
    ...   _, grads, stats = adaact_optax.value_grad_and_stats(loss)(params.fast, x)
    ...   updates, state = tx.update(grads, state, params, activation_stats=stats)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(jnp.allclose(params.fast["w"], params.slow["w"]))   # synchronised after 2 steps
    True
  """
  fast = optax.with_extra_args_support(fast_optimizer)
  build = lambda inner: optax.lookahead(inner, sync_period, slow_step_size, reset_state)
  template = build(fast)  # checks sync_period now, and gives init

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(params, optax.LookaheadParams):
      raise ValueError(
          "adaact_optax.lookahead.update needs params=optax.LookaheadParams(fast=..., "
          f"slow=...), got {type(params).__name__}: start from "
          "optax.LookaheadParams.init_synced(params), compute the gradients and "
          "activation_stats at params.fast, and apply the updates to the pair.")
    # optax.lookahead calls fast_optimizer.update(updates, state, params.fast): a fast
    # optimizer with this call's extra_args bound in goes through it unchanged.
    bound = optax.GradientTransformation(
        fast.init, lambda u, s, p: fast.update(u, s, p, **extra_args))
    return build(bound).update(updates, state, params)

  return optax.GradientTransformationExtraArgs(template.init, update_fn)
