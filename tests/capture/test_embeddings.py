"""Embedding tables: unmatched by default; opt-in token-frequency statistics with a floor."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax import moments
from adaact_optax import nnx as aa_nnx
from conftest import assert_f32_close, bias_correction_ulps


def test_token_moments_is_one_hot_second_moment_plus_floor():
  ids = jnp.array([[3, 1, 3, 0], [3, 9, 1, 3]])
  stat = moments.token_moments(ids, 10, floor=0.05)
  one_hot = np.eye(10)[np.asarray(ids).reshape(-1)]
  assert_f32_close(stat.mean, np.mean(one_hot ** 2, 0) + 0.05)
  assert stat.rows == 8 and stat.mean.dtype == jnp.float32
  assert moments.token_moments(ids, 10).mean[5] == moments.EMBEDDING_FLOOR  # unseen token
  # Out-of-range ids are not counted (nn.Embed would read NaN rows for them).
  assert_f32_close(moments.token_moments(jnp.array([0, 7, -1, 2]), 4, 0.0).mean,
                   np.array([0.25, 0, 0.25, 0]))


def test_token_moments_builds_no_one_hot():
  tokens, vocab = 64, 1000
  jaxpr = jax.make_jaxpr(lambda i: moments.token_moments(i, vocab).mean)(
      jnp.zeros((8, 8), jnp.int32))
  sizes = [np.prod(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars]
  assert max(sizes) == vocab < tokens * vocab


def test_pooling_uses_is_exact_because_the_floor_is_added():
  a, b = jnp.array([1, 1, 2]), jnp.array([0])
  pooled = moments.combine(moments.token_moments(a, 3, 0.1), moments.token_moments(b, 3, 0.1))
  assert_f32_close(pooled.mean, moments.token_moments(jnp.array([1, 1, 2, 0]), 3, 0.1).mean)


class _LinenLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(12, 4)
    h = embed(ids) + embed(ids[:, :1])  # used twice: pooled
    return nn.Dense(3)(h)


class _NNXLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(12, 4, rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, ids):
    return self.out(self.embed(ids) + self.embed(ids[:, :1]))


IDS = jnp.array([[1, 2, 2, 7], [1, 1, 5, 2]])
# All 10 lookups of both uses: token 1 x4, 2 x3, 7 x1, 5 x1... plus ids[:, :1] = (1, 1).
FREQ = np.bincount(np.concatenate([np.ravel(IDS), np.ravel(IDS[:, :1])]), minlength=12) / 10


def test_linen_embed_unmatched_by_default_and_opt_in():
  model = _LinenLM()
  variables = model.init(jax.random.key(0), IDS)
  stats = aa_linen.apply(model, variables, IDS)[1][aa_linen.COLLECTION]
  assert "Embed_0" not in stats and "Dense_0" in stats
  stats = aa_linen.apply(model, variables, IDS, embeddings=True)[1][aa_linen.COLLECTION]
  assert_f32_close(stats["Embed_0"]["embedding"][:, 0], FREQ + moments.EMBEDDING_FLOOR)
  stats = aa_linen.apply(model, variables, IDS, embeddings=0.25)[1][aa_linen.COLLECTION]
  assert_f32_close(stats["Embed_0"]["embedding"][:, 0], FREQ + 0.25)
  with pytest.raises(ValueError, match="floor >= 0"):
    aa_linen.apply(model, variables, IDS, embeddings=-1.0)


def test_nnx_embed_unmatched_by_default_and_opt_in():
  model = _NNXLM(nnx.Rngs(0))
  _, stats = aa_nnx.apply(model, IDS)
  assert "embed" not in stats and "out" in stats
  _, stats = aa_nnx.apply(model, IDS, embeddings=True)
  assert_f32_close(stats["embed"]["embedding"][:, 0], FREQ + moments.EMBEDDING_FLOOR)
  assert stats["embed"]["embedding"].shape == model.embed.embedding.shape[:-1] + (1,)  # keep-rank


def _step_scales(floor):
  """Per-row step scale |update| / |M_hat| of the table after two steps.

  Step 1 sees token 5 once among 16 * 16 + 16 lookups (the model looks up
  the first column twice); step 2 never sees it (its
  gradient is 0, but its momentum is not).
  """
  graphdef, params = nnx.split(_NNXLM(nnx.Rngs(0)))  # (a model with Params only)
  params = nnx.as_pure(params)
  tx = adaact_optax.scale_by_adaact()
  state = tx.init(params)
  batches = [jnp.zeros((16, 16), jnp.int32).at[3, 4].set(5), jnp.zeros((16, 16), jnp.int32)]
  for ids in batches:
    def loss_fn(params):
      out, stats = aa_nnx.apply(nnx.merge(graphdef, params), ids, embeddings=floor)
      return jnp.sum(out ** 2), stats
    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
  m_hat = state.mu["embed"]["embedding"] / (1 - 0.9 ** 2)
  return np.abs(updates["embed"]["embedding"][5]) / np.abs(m_hat[5])


def test_floor_bounds_the_step_of_a_rare_token():
  bound = moments.EMBEDDING_FLOOR ** -0.5  # = 10 with the default floor
  scales = _step_scales(True)
  assert np.all(scales <= bound * (1 + 1e-5)) and np.all(scales > 0.5 * bound)
  unfloored = _step_scales(0.0)  # V_hat ~ (1/272) / 2: scale ~ sqrt(544) ~ 23
  assert_f32_close(unfloored, np.sqrt(1 / ((0.999 * 0.001 / 272) / (1 - 0.999 ** 2))),
                   ulps_per_step=bias_correction_ulps(0.999, 2))
  assert np.all(unfloored > bound)


# --- a tied table (lookup and attend): attend's statistics on every route -----

class _TiedLinen(nn.Module):
  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(12, 4)
    h = jnp.tanh(nn.Dense(4)(embed(ids)))
    # A lookup after the first attend, and a second attend: both attends' rows pool.
    return embed.attend(h) + embed.attend(embed(ids[:, :1]))


class _TiedNNX(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(12, 4, rngs=rngs)
    self.dense = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, ids):
    h = jnp.tanh(self.dense(self.embed(ids)))
    return self.embed.attend(h) + self.embed.attend(self.embed(ids[:, :1]))


def _tied_loss(p, ids):
  table = p["embed"]["embedding"]
  h = jnp.tanh(table[ids] @ p["dense"]["kernel"] + p["dense"]["bias"])
  return jnp.sum((h @ table.T + table[ids[:, :1]] @ table.T) ** 2)


def _tied_reference(table, kernel, bias):
  """numpy: attend multiplies its query's d features; the queries of both attends pooled."""
  table, ids = np.asarray(table, np.float64), np.asarray(IDS)
  h = np.tanh(table[ids] @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64))
  queries = np.concatenate([h.reshape(-1, 4), table[ids[:, :1]].reshape(-1, 4)])
  return np.mean(queries ** 2, 0)[None, :]                    # (1, d)


@pytest.mark.parametrize("embeddings", [False, True, 0.25])
def test_tied_table_gets_attend_statistics_on_every_route(embeddings):
  linen = _TiedLinen()
  variables = linen.init(jax.random.key(0), IDS)
  p = variables["params"]
  expected = _tied_reference(p["Embed_0"]["embedding"], p["Dense_0"]["kernel"], p["Dense_0"]["bias"])
  got = {"linen.apply": aa_linen.apply(linen, variables, IDS, embeddings=embeddings)[1][
      aa_linen.COLLECTION]["Embed_0"]["embedding"]}
  with aa_linen.capture(embeddings=embeddings):
    _, mutated = linen.apply(variables, IDS, mutable=[aa_linen.COLLECTION])
  got["linen.capture"] = mutated[aa_linen.COLLECTION]["Embed_0"]["embedding"]
  for route, stat in got.items():
    assert stat.shape == (1, 4), route
    np.testing.assert_allclose(stat, expected, rtol=1e-5, err_msg=route)

  model = _TiedNNX(nnx.Rngs(1))
  expected = _tied_reference(model.embed.embedding[...], model.dense.kernel[...],
                             model.dense.bias[...])
  stat = aa_nnx.apply(model, IDS, embeddings=embeddings)[1]["embed"]["embedding"][...]
  assert stat.shape == (1, 4) and aa_nnx.stats_shapes(model, IDS, embeddings=embeddings)[
      "embed"]["embedding"].shape == (1, 4)
  np.testing.assert_allclose(stat, expected, rtol=1e-5, err_msg="nnx.apply")

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))       # the same weights, pure JAX
  _, grads, stats = adaact_optax.value_grad_and_stats(_tied_loss, embeddings=embeddings)(params, IDS)
  np.testing.assert_allclose(stats["embed"]["embedding"], expected, rtol=1e-5,
                             err_msg="value_grad_and_stats")
  shapes = adaact_optax.stats_shapes(_tied_loss, params, IDS, embeddings=embeddings)
  assert shapes["embed"]["embedding"].shape == (1, 4)
  report = adaact_optax.coverage(_tied_loss, params, IDS, embeddings=embeddings)
  assert report.matched["embed/embedding"] == (1, 4)
  # The default state of a (vocab, d) table is (vocab, 1): the error says to pass stats_shapes.
  tx = adaact_optax.adaact(0.1)
  with pytest.raises(ValueError, match=r"'embed/embedding'.*Embed.attend.*stats_shapes="):
    tx.update(grads, tx.init(params), params, activation_stats=stats)
  tx = adaact_optax.adaact(0.1, stats_shapes=shapes)
  tx.update(grads, tx.init(params), params, activation_stats=stats)
