"""The errors AdaAct's transformations raise, with their messages: one place, so every
entry point says the same thing and says what to do."""

from __future__ import annotations

from adaact_optax._src import alignment


def missing_stats_error():
  return ValueError(
      "AdaAct needs the layer-input statistics: call "
      "tx.update(grads, opt_state, params, activation_stats=stats), with stats = "
      "adaact_optax.linen.apply(model, variables, x)[1][adaact_optax.linen.COLLECTION] "
      "or adaact_optax.nnx.apply(model, x)[1]. Pass activation_stats={} to update every "
      "parameter as unmatched. With flax.training.train_state.TrainState: its "
      "apply_gradients calls tx.update(grads, opt_state, params) and never forwards "
      "activation_stats= (it treats extra keywords as fields to replace), so the "
      "statistics are lost even when you pass them; use adaact_optax.TrainState, whose "
      "apply_gradients(grads=..., activation_stats=...) passes them to the optimizer. "
      "optax.lookahead does not pass them on either: use adaact_optax.lookahead.")


def not_a_state_error(state, expected: str):
  return ValueError(
      f"{expected}.update got a state of type {type(state).__name__}, not the state "
      f"{expected}.init returns. A checkpoint restored without a target gives plain "
      "dicts and lists: restore it with the target tx.init(params) (orbax: "
      "ocp.args.StandardRestore(tx.init(params))). A checkpoint written by adaact-optax "
      "0.1.0 (no skip counter, second moment of shape K[:-1]) converts with "
      "adaact_optax.migrate_state(old_state, tx, params).")


def uncaptured_error(names):
  return ValueError(
      f"AdaAct has no statistics for {names}: the capture saw these weights multiply an "
      "activation but could not record their input (see the UncapturedWeightWarning it "
      "emitted), and unmatched='error' refuses to train them without. Fix: record the "
      "layer's input with the sow hatch (adaact_optax.linen.sow_input / the NNX "
      "equivalent) in the custom layer, or pass unmatched='sgd' or unmatched='momentum' "
      "to accept plain updates for them.")


def unmatched_needs_stats_shapes():
  return ValueError(
      "adaact(unmatched=<an optax transformation>) needs stats_shapes=: which parameters "
      "have statistics must be known at init, so the transformation's state covers only the "
      f"others. Pass the layout the capture reports: {alignment.STATS_SHAPES_CALLS}; or "
      "use a string unmatched='sgd'/'momentum'.")
