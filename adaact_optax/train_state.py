"""A Flax ``TrainState`` that passes AdaAct's statistics to the optimizer."""

from __future__ import annotations

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` with statistics in ``apply_gradients``.

  Example::

    (loss, (logits, mutated)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, activation_stats=mutated[COLLECTION])
  """

  def apply_gradients(self, *, grads, activation_stats, **kwargs):
    """One optimizer step; ``kwargs`` replace other fields, as in Flax."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        activation_stats=activation_stats)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)
