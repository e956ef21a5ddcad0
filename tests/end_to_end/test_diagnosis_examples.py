"""The diagnosis examples: examples.lm.diagnosis (its row normaliser, axes and log-variance
shares, and a tiny end-to-end run) and examples.scaling_report."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples import scaling_report
from examples.lm import diagnosis as lm_diagnosis
from examples.lm import models

pytestmark = pytest.mark.slow  # end to end: deselect with -m 'not slow'


def test_log_variance_shares_of_an_additive_log_moment():
  # log nu = a[input] + b[output] exactly: the shares are var(b) and var(a) over their sum
  # (no interaction), for a 3-axis weight whose input axes are (0, 1).
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 3, 1)) * 0.5
  b = rng.normal(size=(1, 1, 5)) * 2.0
  out_share, in_share = lm_diagnosis.log_variance_shares(np.exp(a + b), (0, 1))
  total = a.var() + b.var()
  np.testing.assert_allclose([out_share, in_share], [b.var() / total, a.var() / total],
                             rtol=1e-9)
  # Output axes first in memory (an embedding table read by Embed.attend: input axis 1).
  out_share, in_share = lm_diagnosis.log_variance_shares(np.exp(b.reshape(5, 1) + 0 * a[:, 0, 0]
                                                                ), (1,))
  np.testing.assert_allclose([out_share, in_share], [1.0, 0.0], atol=1e-12)


def test_scale_by_row_rms_against_numpy_inside_a_partition():
  params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4), "other": jnp.zeros(2)}
  inner = lm_diagnosis.scale_by_row_rms({"w": (0,), "b": ()}, b2=0.9, eps=1e-3)
  tx = optax.partition({"row": inner, "sgd": optax.sgd(1.0)},
                       {"w": "row", "b": "row", "other": "sgd"})
  state = tx.init(params)
  rng = np.random.default_rng(1)
  nu_w, nu_b = np.zeros((1, 4)), np.zeros(4)
  for t in range(1, 4):
    grads = {k: jnp.asarray(rng.normal(size=p.shape), jnp.float32) for k, p in params.items()}
    updates, state = tx.update(grads, state, params)
    g_w, g_b = np.asarray(grads["w"], np.float64), np.asarray(grads["b"], np.float64)
    nu_w = 0.9 * nu_w + 0.1 * (g_w ** 2).mean(0, keepdims=True)   # per output feature
    nu_b = 0.9 * nu_b + 0.1 * g_b ** 2                               # per element
    bc = 1 - 0.9 ** t
    np.testing.assert_allclose(updates["w"], g_w / (np.sqrt(nu_w / bc) + 1e-3), rtol=2e-6)
    np.testing.assert_allclose(updates["b"], g_b / (np.sqrt(nu_b / bc) + 1e-3), rtol=2e-6)
    np.testing.assert_allclose(updates["other"], -grads["other"])


def test_input_axes_and_names_of_the_byte_lm():
  _, stats_shapes = lm_diagnosis._model(8, 16, 1, 2, 32)
  model = models.ByteGPT(context=8, dim=16, depth=1, heads=2, mlp_dim=32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  axes = lm_diagnosis.input_axes_of(params["params"], stats_shapes)
  attention = "CausalBlock_0/MultiHeadDotProductAttention_0"
  assert axes[f"{attention}/query/kernel"] == (0,)          # (in, heads, head_dim)
  assert axes[f"{attention}/out/kernel"] == (0, 1)          # (heads, head_dim, out)
  assert axes["CausalBlock_0/Dense_1/kernel"] == (0,)
  assert axes["embed/embedding"] == (1,)                    # attend reads the dim features
  assert axes["CausalBlock_0/Dense_1/bias"] == ()
  assert "pos_embed" not in axes and "LayerNorm_0/scale" not in axes
  assert lm_diagnosis.short_name("CausalBlock_0/Dense_1/kernel") == "0 mlp in"
  assert lm_diagnosis.short_name(f"{attention}/key/kernel") == "0 key"
  assert lm_diagnosis.short_name("embed/embedding") == "embed (tied)"


def test_lm_diagnosis_end_to_end(tmp_path, capsys):
  results = lm_diagnosis.main([
      "--variants", "adaact-adam,adamw,act+rownorm", "--steps", "3", "--dim", "16",
      "--mlp-dim", "32", "--depth", "1", "--heads", "2", "--context", "8", "--batch-size", "2",
      "--corpus-mb", "0.05", "--eval-windows", "4", "--out-dir", str(tmp_path)])
  text = (tmp_path / "diagnosis.md").read_text()
  assert text.strip() in capsys.readouterr().out
  assert "| 0 query | LayerNorm |" in text and "| embed (tied) | LayerNorm |" in text
  assert "| act+rownorm | 0.003 |" in text
  (ada,), (adamw,) = results["adaact-adam"], results["adamw"]
  assert np.isfinite(ada["val_bpb"]) and set(adamw["adam_log_variance"]) == set(
      k.removesuffix("/denom_cv") for k in ada["scaling"] if k.endswith("/denom_cv"))
  with pytest.raises(SystemExit):
    lm_diagnosis.parse_args(["--variants", "adaact"])


def test_scaling_report_on_the_digits_cnn(capsys):
  text = scaling_report.main(["image", "--dataset", "digits", "--model", "cnn", "--epochs", "1",
                              "--steps-per-epoch", "2", "--no-progress"])
  rows = [line.split("|")[1].strip() for line in text.splitlines()[2:]]
  assert rows == ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"]
  assert text in capsys.readouterr().out
  with pytest.raises(SystemExit, match="AdaAct"):
    scaling_report.main(["image", "--optimizer", "adamw"])
  with pytest.raises(SystemExit, match="usage"):
    scaling_report.main(["vision"])
