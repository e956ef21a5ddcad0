"""A Flax ``TrainState`` that passes AdaAct's statistics to the optimizer."""

from __future__ import annotations

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` whose ``apply_gradients`` also takes AdaAct's statistics.

  Same fields and ``create`` as ``flax.training.train_state.TrainState``;
  ``apply_gradients`` passes ``activation_stats`` on to
  ``tx.update(grads, opt_state, params, activation_stats=...)``. Subclass it
  to carry more fields (``batch_stats``, ...), as with Flax's.

  Examples:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import adaact_optax
    >>> from adaact_optax import linen as aa_linen
    >>> model = nn.Dense(2)
    >>> x = jnp.ones((4, 3))
    >>> state = adaact_optax.TrainState.create(
    ...     apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"],
    ...     tx=adaact_optax.adaact(learning_rate=0.1))
    >>> def loss_fn(params):
    ...   y, mutated = aa_linen.apply(model, {"params": params}, x)
    ...   return jnp.mean(y ** 2), mutated[aa_linen.COLLECTION]
    >>> grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    >>> state = state.apply_gradients(grads=grads, activation_stats=stats)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads, activation_stats, **kwargs):
    """One optimizer step with the statistics of the forward pass that made ``grads``.

    Args:
      grads: gradients, a tree like ``params``.
      activation_stats: the statistics tree of the same forward pass, e.g.
        ``adaact_optax.linen.apply(...)[1][adaact_optax.linen.COLLECTION]``.
      **kwargs: other fields to replace (``batch_stats=...``), as in Flax.

    Returns:
      The state with ``step + 1``, the updated ``params`` and ``opt_state``,
      and the fields given in ``kwargs``.

    Raises:
      ValueError: from ``tx.update``, at trace time, when a statistics leaf
        is at no parameter's path or cannot scale its parameter.
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        activation_stats=activation_stats)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)
