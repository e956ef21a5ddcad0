"""Checkpoints across releases: a 0.1.0 optimizer state migrates into the 0.2 layout."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import adaact_optax
import migration_model as mm
from conftest import ROOT, assert_f32_close

CHECKPOINT = ROOT / "tests" / "fixtures" / "checkpoint_0_1_0"
# A step of migration_model runs its forward and backward pass besides the update.
STEP_ULPS = 64


def _restore_raw():
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(CHECKPOINT)   # no target: nested dicts and lists, as 0.1.0 wrote them


def test_version_is_0_2_0():
  assert adaact_optax.__version__ == "0.2.0"


def test_a_0_1_0_checkpoint_migrates_and_training_resumes():
  raw = _restore_raw()
  old_nu = raw["opt_state"]["inner_opt_state"][0]["nu"]
  assert old_nu["dense"]["kernel"].shape == (6,) and old_nu["conv"]["kernel"].shape == (2, 4)
  tx = mm.make_tx(adaact_optax, legacy=False)
  params = raw["params"]
  state = adaact_optax.migrate_state(raw["opt_state"], tx, params)
  # The same three steps run by this version give the same state, in the 0.2 layout: to
  # float32 rounding, since 0.1.0's program (on the CPU that wrote the checkpoint) differs.
  ref_params, ref_state = mm.run(adaact_optax, legacy=False)
  assert_f32_close(params, ref_params, steps=mm.STEPS, ulps_per_step=STEP_ULPS)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  assert_f32_close(state, ref_state, steps=mm.STEPS, ulps_per_step=STEP_ULPS)
  inner = state.inner_opt_state[0]
  assert inner.nu["conv"]["kernel"].shape == (2, 2, 2)      # (k, C/G, G)
  assert inner.nu["dense"]["bias"].shape == (1,) and int(inner.skipped) == 0
  assert float(jnp.abs(state.acc_stats["conv"]["kernel"]).max()) > 0  # mid-accumulation
  # Training resumes from the migrated state as from the 0.2 run.
  resumed, _ = mm.run(adaact_optax, legacy=False, steps=3, params=params, opt_state=state,
                      first=mm.STEPS)
  straight, _ = mm.run(adaact_optax, legacy=False, steps=mm.STEPS + 3)
  assert_f32_close(resumed, straight, steps=mm.STEPS + 3, ulps_per_step=STEP_ULPS)


def test_migration_into_a_differently_built_optimizer_names_the_path():
  raw = _restore_raw()
  plain = adaact_optax.adaact(0.1)   # no MultiSteps, no schedule
  with pytest.raises(ValueError, match="migrate_state: the new state has '0/count'.*built"):
    adaact_optax.migrate_state(raw["opt_state"], plain, raw["params"])


class OldScaleByAdaActState(NamedTuple):   # 0.1.0's state, as its code defined it
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def test_an_in_memory_0_1_0_state_under_inject_hyperparams():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  tx = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.1)
  # 0.1.0's state, as its code built it: the same wrapper around a 3-field AdaAct state.
  old = tx.init(params)._replace(inner_state=(
      OldScaleByAdaActState(jnp.asarray(2, jnp.int32),
                            {"w": jnp.full((3, 2), 0.5), "b": jnp.full(2, 0.25)},
                            {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.asarray(4.0)}),
      optax.EmptyState(), optax.EmptyState()))
  new = adaact_optax.migrate_state(old, tx, params)
  scale = new.inner_state[0]
  np.testing.assert_array_equal(scale.nu["w"], [[1.0], [2.0], [3.0]])
  np.testing.assert_array_equal(scale.nu["b"], [4.0])
  np.testing.assert_array_equal(scale.mu["w"], 0.5)
  assert int(scale.count) == 2 and int(scale.skipped) == 0
  # The migrated state trains.
  updates, _ = tx.update(params, new, params, activation_stats={"w": jnp.ones((3, 1))})
  assert np.isfinite(updates["w"]).all()


def test_a_0_1_0_restore_without_migration_says_how_to_migrate():
  raw = _restore_raw()
  tx = mm.make_tx(adaact_optax, legacy=False)
  grads = jax.tree.map(jnp.zeros_like, raw["params"])
  stats = mm.loss_and_stats(raw["params"], *mm.batch(0), False)[1]
  with pytest.raises(ValueError, match=r"MultiSteps.*type dict.*0\.1\.0.*migrate_state"):
    tx.update(grads, raw["opt_state"], raw["params"], activation_stats=stats)
