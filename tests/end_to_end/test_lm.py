"""The language-model example: corpus, model, statistics, optimizers, learning-rate choice."""

import hashlib
import json
import math
import platform
import socket

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax._src import alignment as matching
from conftest import assert_f32_close
from examples import optimizers
from examples.lm import input_pipeline
from examples.lm import models
from examples.lm import train as lm
from tools import compare

pytestmark = pytest.mark.slow  # end to end: deselect with -m 'not slow'

# --- corpus -------------------------------------------------------------------


def _write_files(folder, files):
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in files.items():
    (folder / name).write_text(text)


def test_corpus_is_the_sorted_top_level_py_files_cut_at_max_bytes(tmp_path):
  _write_files(tmp_path, {"b.py": "bbbb", "a.py": "aaa", "c.py": "cccccc", "notes.txt": "xx"})
  _write_files(tmp_path / "pkg", {"inner.py": "zz"})          # not top level
  corpus = input_pipeline.build_corpus(tmp_path, max_bytes=9)
  assert corpus.data.tobytes() == b"aaabbbbcc"
  assert corpus.files == ("a.py", "b.py", "c.py") and corpus.data.dtype == np.uint8
  assert corpus.sha256 == hashlib.sha256(b"aaabbbbcc").hexdigest()
  assert corpus.python_version == platform.python_version()
  again = input_pipeline.build_corpus(tmp_path, max_bytes=9)
  assert again.sha256 == corpus.sha256 and again.files == corpus.files


def test_default_corpus_is_the_standard_library_without_network(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("the corpus builder opened a socket")
  monkeypatch.setattr(socket, "socket", no_network)
  first = input_pipeline.build_corpus(max_bytes=200_000)
  second = input_pipeline.build_corpus(max_bytes=200_000)
  assert len(first.data) == 200_000 and first.sha256 == second.sha256
  assert first.directory == str(input_pipeline.stdlib_dir())
  assert first.files[0] == sorted(p.name for p in input_pipeline.stdlib_dir().glob("*.py"))[0]


def test_corpus_errors_say_what_to_pass(tmp_path):
  with pytest.raises(ValueError, match=rf"{tmp_path} has no \.py files at its top level"):
    input_pipeline.build_corpus(tmp_path)
  _write_files(tmp_path / "sub", {"x.py": "x"})
  with pytest.raises(ValueError, match="no .py files"):
    input_pipeline.build_corpus(tmp_path)                 # only in a subfolder
  with pytest.raises(ValueError, match="does not exist"):
    input_pipeline.build_corpus(tmp_path / "missing")
  with pytest.raises(ValueError, match="max_bytes must be > 0"):
    input_pipeline.build_corpus(tmp_path / "sub", max_bytes=0)


def test_split_is_contiguous_80_10_10():
  data = np.arange(1000) % 256
  parts = input_pipeline.split(data)
  assert [len(parts[k]) for k in ("train", "validation", "test")] == [800, 100, 100]
  np.testing.assert_array_equal(np.concatenate(list(parts.values())), data)
  with pytest.raises(ValueError, match="three positive shares"):
    input_pipeline.split(data, (0.5, 0.5))


def test_windows_are_next_byte_pairs():
  data = np.arange(200, dtype=np.uint8)
  x, y = input_pipeline.random_windows(np.random.default_rng(0), data, 5, 8)
  assert x.shape == y.shape == (5, 8) and x.dtype == np.int32
  np.testing.assert_array_equal(y, x + 1)
  ex, ey = input_pipeline.eval_windows(data, 8, max_windows=4)
  # 24 whole windows; 4 evenly spread: numbers 0, 8, 15, 23 (rounded), i.e. 8 bytes apart each.
  np.testing.assert_array_equal(ex[:, 0], [0, 64, 120, 184])
  np.testing.assert_array_equal(ey, ex + 1)
  assert input_pipeline.eval_windows(data, 8)[0].shape == (24, 8)


# --- model and statistics -------------------------------------------------------

SMALL = dict(context=8, dim=16, depth=2, heads=2, mlp_dim=32)


def _shapes(tree):
  return {matching.path_name(p): tuple(s.shape)
          for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("tied", [True, False])
def test_model_forward_and_statistics_tree(tied):
  model = models.ByteGPT(tied=tied, **SMALL)
  x = jnp.zeros((3, 8), jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  params = _shapes(variables["params"])
  assert ("head/kernel" in params) != tied and params["embed/embedding"] == (256, 16)
  assert params["pos_embed"] == (8, 16)
  for embeddings in (False, True):
    logits, mutated = jax.eval_shape(
        lambda v: aa_linen.apply(model, v, x, embeddings=embeddings), variables)
    assert logits.shape == (3, 8, 256)
    stats = _shapes(mutated[aa_linen.COLLECTION])
    # Every Dense / DenseGeneral kernel (MLP, attention query/key/value/out,
    # untied head) has statistics over its input axes: the leading axes
    # (legacy layout) or the same rank with size 1 on the output axes.
    kernels = {k: s for k, s in params.items() if k.endswith("/kernel")}
    assert len([k for k in kernels if "MultiHeadDotProductAttention" in k]) == 4 * SMALL["depth"]
    for name, shape in kernels.items():
      n_in = 2 if name.endswith("out/kernel") else 1      # attention out: (heads, head_dim)
      assert name in stats, name
      assert math.prod(stats[name]) == math.prod(shape[:n_in]), (name, stats[name])
      assert stats[name][:n_in] == shape[:n_in], (name, stats[name])
    # Norm scales and the position embedding have no statistics.
    assert not any(k.startswith("pos_embed") or "LayerNorm" in k for k in stats), stats
    if tied:   # the tied output (Embed.attend) reads the d features; it wins over lookups
      assert stats["embed/embedding"] == (1, 16)
    elif embeddings:   # lookups only: token frequencies, one value per byte
      assert stats["embed/embedding"] == (256, 1)
    else:   # lookups only, embeddings=False: no statistics
      assert "embed/embedding" not in stats
    # The tree fits the optimizer sized by linen.stats_shapes.
    shapes = jax.eval_shape(lambda v: aa_linen.stats_shapes(model, v, x, embeddings=embeddings),
                            variables)
    tx = adaact_optax.adaact(0.1, stats_shapes=shapes)
    jax.eval_shape(lambda p, s: tx.update(p, tx.init(p), p, activation_stats=s),
                   variables["params"], mutated[aa_linen.COLLECTION])


def test_fused_qkv_model_is_the_separate_kernels_concatenated():
  # Brute-force reference: the MHA model's query/key/value kernels laid side by side
  # are the fused (dim, 3 dim) kernel; logits and the kernel's statistics agree.
  x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 8)), jnp.int32)
  separate, fused = models.ByteGPT(**SMALL), models.ByteGPT(fused_qkv=True, **SMALL)
  p = jax.jit(separate.init)(jax.random.key(0), x)["params"]
  q = jax.jit(fused.init)(jax.random.key(0), x)["params"]
  d = SMALL["dim"]
  for i in range(SMALL["depth"]):
    mha, block = p[f"CausalBlock_{i}"]["MultiHeadDotProductAttention_0"], f"CausalBlock_{i}"
    assert q[block]["FusedSelfAttention_0"]["qkv"]["kernel"].shape == (d, 3 * d)
    q[block]["FusedSelfAttention_0"] = {
        "qkv": {"kernel": jnp.concatenate([mha[n]["kernel"].reshape(d, d)
                                           for n in ("query", "key", "value")], axis=1),
                "bias": jnp.concatenate([mha[n]["bias"].reshape(d)
                                         for n in ("query", "key", "value")])},
        "out": {"kernel": mha["out"]["kernel"].reshape(d, d), "bias": mha["out"]["bias"]}}
    for name in ("LayerNorm_0", "LayerNorm_1", "Dense_0", "Dense_1"):
      q[block][name] = p[block][name]
  for name in ("embed", "pos_embed", "LayerNorm_0"):
    q[name] = p[name]
  (a, sa), (b, sb) = (jax.jit(lambda v, m=m: aa_linen.apply(m, v, x))({"params": v})
                      for m, v in ((separate, p), (fused, q)))
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  sa, sb = sa[aa_linen.COLLECTION], sb[aa_linen.COLLECTION]
  for i in range(SMALL["depth"]):
    block = f"CausalBlock_{i}"
    np.testing.assert_allclose(sb[block]["FusedSelfAttention_0"]["qkv"]["kernel"],
                               sa[block]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
                               .reshape(d, 1), rtol=1e-6)
    np.testing.assert_allclose(sb[block]["FusedSelfAttention_0"]["out"]["kernel"],
                               sa[block]["MultiHeadDotProductAttention_0"]["out"]["kernel"]
                               .reshape(d, 1), rtol=1e-5)


@pytest.fixture(scope="module")
def lm_setup():
  """One small model, its parameters and statistics layout, shared by the tests
  below (initialised once: jit compiles once per test file, not per test)."""
  model = models.ByteGPT(**SMALL)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8)), jnp.int32)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  shapes = aa_linen.stats_shapes(model, variables, x)
  return model, x, variables["params"], shapes


def test_model_is_causal(lm_setup):
  model, _, params, _ = lm_setup
  x = jnp.arange(8)[None] % 7
  apply = jax.jit(model.apply)
  changed = x.at[0, 5].set(100)
  a, b = apply({"params": params}, x), apply({"params": params}, changed)
  np.testing.assert_array_equal(a[0, :5], b[0, :5])      # earlier positions cannot see byte 5
  assert not np.allclose(a[0, 5:], b[0, 5:])
  with pytest.raises(ValueError, match="more than its context 8"):
    apply({"params": params}, jnp.zeros((1, 9), jnp.int32))


# --- optimizers -----------------------------------------------------------------


def test_matched_labels_follow_the_statistics(lm_setup):
  _, _, params, shapes = lm_setup
  labels = {matching.path_name(p): l
            for p, l in jax.tree_util.tree_flatten_with_path(
                optimizers.matched_labels(params, shapes))[0]}
  stats = _shapes(shapes)
  for name, label in labels.items():
    assert label == ("adaact" if name in stats else "unmatched"), name
  assert labels["pos_embed"] == "unmatched"
  assert labels["CausalBlock_0/LayerNorm_0/scale"] == "unmatched"
  assert labels["CausalBlock_0/Dense_0/kernel"] == "adaact"
  # The uncaptured marker (0,) counts as no statistics.
  marked = {"pos_embed": jax.ShapeDtypeStruct((0,), jnp.float32)}
  assert optimizers.matched_labels({"pos_embed": params["pos_embed"]}, marked) == {
      "pos_embed": "unmatched"}


def test_adaact_adam_is_adaact_plus_adamw_on_the_rest(lm_setup):
  model, x, params, shapes = lm_setup
  _, mutated = jax.jit(lambda p: aa_linen.apply(model, {"params": p}, x))(params)
  stats = mutated[aa_linen.COLLECTION]
  grads = jax.tree.map(lambda p: jnp.cos(p * 3.0) + 0.5, params)
  hyper = lambda k: optimizers.DEFAULTS["adaact-adam"][k]
  unit = optax.constant_schedule(1.0)
  tx = optimizers.build("adaact-adam", unit, hyper, stats_shapes=shapes,
                        peak=optax.scale(0.7))
  state = tx.init(params)
  labels = optimizers.matched_labels(params, shapes)
  unmatched = [p for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
               if l == "unmatched"]
  # AdamW's state (mu, nu) covers the unmatched parameters only.
  adam_state = state.inner_states["unmatched"].inner_state
  adam_arrays = [a for a in jax.tree.leaves(adam_state) if a.ndim > 0]
  assert sum(a.size for a in adam_arrays) == 2 * sum(p.size for p in unmatched)

  def first_update(tx, **extra):   # one compiled update from a fresh state
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p, **extra)[0])(grads, params)

  updates = first_update(tx, activation_stats=stats)
  # Reference: AdaAct (lr 0.7, its decay) and AdamW (3e-3, decay 0.1) run separately.
  u_adaact = first_update(adaact_optax.adaact(0.7, weight_decay=2e-3, stats_shapes=shapes),
                          activation_stats=stats)
  u_adam = first_update(optax.adamw(3e-3, weight_decay=0.1))
  # The same arithmetic as each optimizer alone, in another program (the partition).
  for got, a, b, label in zip(*(jax.tree.leaves(t) for t in (updates, u_adaact, u_adam, labels))):
    assert_f32_close(got, a if label == "adaact" else b)
  # The same as the library's own packaging of it.
  u_library = first_update(adaact_optax.adaact(
      0.7, unmatched=optax.adamw(3e-3, weight_decay=0.1), stats_shapes=shapes),
      activation_stats=stats)
  assert_f32_close(updates, u_library)
  # Given the library's adaact (the peak in its learning rate) as AdaAct's branch, the
  # examples' partition is the program adaact(unmatched=...) builds: bit-identical.
  by_hand = optimizers.adaact_with_unmatched_optimizer(
      adaact_optax.adaact(0.7, stats_shapes=shapes), optax.adamw(3e-3, weight_decay=0.1), shapes)
  jax.tree.map(np.testing.assert_array_equal, first_update(by_hand, activation_stats=stats),
               u_library)


def test_muon_treats_matrices_only(lm_setup):
  _, _, params, _ = lm_setup
  dims = optimizers.muon_dimension_numbers(params)
  assert dims["CausalBlock_0"]["Dense_0"]["kernel"] == optax.contrib.MuonDimensionNumbers((0,), 1)
  attention = dims["CausalBlock_0"]["MultiHeadDotProductAttention_0"]
  assert attention["query"]["kernel"] == optax.contrib.MuonDimensionNumbers(0, (1, 2))
  assert attention["out"]["kernel"] == optax.contrib.MuonDimensionNumbers((0, 1), 2)
  assert dims["embed"]["embedding"] is None and dims["pos_embed"] is None
  assert dims["CausalBlock_0"]["Dense_0"]["bias"] is None


def test_build_errors():
  with pytest.raises(ValueError, match="unknown optimizer 'adamax'"):
    optimizers.build("adamax", optax.constant_schedule(1.0), lambda k: None)
  with pytest.raises(ValueError, match="adaact-adam needs stats_shapes"):
    optimizers.build("adaact-adam", optax.constant_schedule(1.0),
                     lambda k: optimizers.DEFAULTS["adaact-adam"][k])


# Every LM run below (the per-optimizer steps, the CLI, compare.py and the
# divergence check) uses these shapes and the constant schedule, so each
# optimizer's training step compiles once for the whole file.
TINY = dict(steps=12, batch_size=8, context=16, dim=16, depth=1, heads=2, mlp_dim=32,
            corpus_mb=0.05, eval_windows=8, evals=1, warmup_steps=0, schedule="constant",
            progress=False)
TINY_FLAGS = ["--steps", "12", "--batch-size", "8", "--context", "16", "--dim", "16",
              "--depth", "1", "--heads", "2", "--mlp-dim", "32", "--corpus-mb", "0.05",
              "--eval-windows", "8", "--warmup-steps", "0", "--schedule", "constant"]


@pytest.mark.parametrize("variant", optimizers.OPTIMIZERS + ("adaact-adam+emb+untied",))
def test_a_few_lm_steps_lower_the_loss(variant):
  # lr 3x the default: a dozen steps must show the loss falling for every optimizer.
  overrides = compare.parse_variant(variant)
  optimizer = overrides["optimizer"]
  lr = 3 * optimizers.DEFAULTS[optimizer]["lr"]
  result = lm.run(lm.Config(lr=lr, **overrides, **TINY))
  s = result["summary"]
  assert s["train_loss"] < s["initial_loss"] and not s["diverged"], s
  assert s["val_bpb"] < 8.0 and math.isfinite(s["test_bpb"])
  if optimizer in optimizers.ADAACT_VARIANTS:
    scale = jax.tree.leaves(result["state"].opt_state,
                            is_leaf=lambda n: isinstance(n, adaact_optax.ScaleByAdaActState))
    scale = [n for n in scale if isinstance(n, adaact_optax.ScaleByAdaActState)]
    assert len(scale) == 1 and int(scale[0].count) == TINY["steps"]


def test_cli_defaults_to_the_recommended_text_configuration():
  # docs/lm.md recommends adaact-adam at lr 0.9 on text; the example runs it by default.
  cfg = lm.parse_args([])
  assert (cfg.optimizer, cfg.hyper("lr")) == ("adaact-adam", 0.9)
  assert cfg.hyper("unmatched_lr") == 3e-3 and cfg.hyper("weight_decay") == 2e-3
  assert lm.parse_args(["--optimizer", "adaact"]).hyper("lr") == 0.9
  assert lm.parse_args(["--optimizer", "adamw"]).hyper("lr") == optimizers.DEFAULTS["adamw"]["lr"]
  assert lm.parse_args(["--lr", "0.3"]).hyper("lr") == 0.3


def test_cli_records_python_version_and_corpus_hash(tmp_path, capsys):
  result = lm.main(["--optimizer", "adaact-adam", "--embeddings", "--no-tied", *TINY_FLAGS,
                    "--evals", "2", "--out-dir", str(tmp_path), "--no-progress"])
  corpus, _ = lm.corpus_and_splits(None, 0.05)
  lines = [json.loads(l) for l in (tmp_path / "lm_adaact-adam_emb_seed0.jsonl").read_text()
           .splitlines()]
  assert [l["step"] for l in lines] == [6, 12, 12] and lines[-1]["final"]
  assert all(l["python_version"] == platform.python_version()
             and l["corpus_sha256"] == corpus.sha256 and l["embeddings"]
             and l["tied"] is False for l in lines)
  assert result["config"]["schedule"] == "constant" and result["config"]["warmup_steps"] == 0
  assert (tmp_path / "lm_adaact-adam_emb_seed0.png").stat().st_size > 0
  out = capsys.readouterr().out
  assert f"corpus_sha256={corpus.sha256}" in out and "val_bpb=" in out
  assert result["summary"]["state_bytes"] > 0


# --- learning-rate selection ------------------------------------------------------


def _fake(curve, diverge=()):
  """A run_fn whose validation score is ``curve(lr)`` (+ a seed offset) and that
  diverges for the (lr, seed) pairs in ``diverge``; records its calls."""
  calls = []

  def run_fn(lr, seed):
    calls.append((lr, seed))
    return dict(score=curve(lr) + 0.02 * seed, tiebreak=0.0, diverged=(lr, seed) in diverge)

  run_fn.calls = calls
  return run_fn


def test_a_diverging_run_disqualifies_its_learning_rate():
  # lr 0.3 has the best scores but one seed diverged: 0.1 wins.
  run_fn = _fake(lambda lr: -lr, diverge={(0.3, 1)})
  sel = compare.select_lr(run_fn, [0.03, 0.1, 0.3], seeds=2)
  assert sel.lr == 0.1 and sel.edge is None and sel.extended is None
  assert compare.lr_summary(sel.runs[0.3]) == (None, 1)
  assert sorted(set(run_fn.calls)) == [(lr, s) for lr in (0.03, 0.1, 0.3) for s in (0, 1)]
  cell = compare.grid_cell(sel, lambda m: f"{m:.2f}")
  assert cell == "0.03: -0.02, 0.1: -0.09, 0.3: diverged 1/2"


def test_an_edge_choice_extends_the_grid_once():
  # Best at the top: one more rate, 3x the last (the grid's ratio), is tried.
  run_fn = _fake(lambda lr: abs(math.log(lr / 0.9)))
  sel = compare.select_lr(run_fn, [0.03, 0.1, 0.3], seeds=2)
  assert sel.extended == pytest.approx(0.9) and sel.lr == pytest.approx(0.9)
  assert sel.edge == "high"                 # still the largest: flagged, not extended again
  assert len(run_fn.calls) == 8 and run_fn.calls[-2:] == [(0.9, 0), (0.9, 1)]
  assert compare.chosen_cell(sel) == "0.9 (grid edge)"
  # Best at the bottom: one rate below, by the grid's ratio there (0.1 / 0.03).
  run_fn = _fake(lambda lr: abs(math.log(lr / 0.012)))
  sel = compare.select_lr(run_fn, [0.03, 0.1, 0.3], seeds=2)
  assert sel.extended == pytest.approx(0.009) and sel.lr == pytest.approx(0.009)
  assert sel.edge == "low"
  # An optimum inside the grid: no extension, no flag.
  run_fn = _fake(lambda lr: abs(math.log(lr / 0.02)))
  sel = compare.select_lr(run_fn, [0.01, 0.03, 0.1], seeds=2)
  assert sel.lr == 0.03 and sel.extended is None and sel.edge is None


def test_all_diverged_extends_downwards_then_gives_up():
  diverge = {(lr, s) for lr in (0.1, 0.3, 1.0) for s in (0, 1)}
  run_fn = _fake(lambda lr: 0.0, diverge=diverge)
  sel = compare.select_lr(run_fn, [0.1, 0.3, 1.0], seeds=2)
  assert sel.extended == pytest.approx(0.0333) and sel.lr == pytest.approx(0.0333)
  run_fn = _fake(lambda lr: 0.0, diverge=diverge | {(0.0333, 0)})
  sel = compare.select_lr(run_fn, [0.1, 0.3, 1.0], seeds=2)
  assert sel.lr is None and compare.chosen_cell(sel) == "none (all diverged)"


def test_lm_summary_marks_a_run_whose_loss_rose_as_diverged():
  s = lm.run(lm.Config(optimizer="sgd", lr=300.0, **TINY))["summary"]
  assert s["diverged"]
  assert not (math.isfinite(s["train_loss"]) and s["train_loss"] <= s["initial_loss"])


def test_compare_lm_reports_per_lr_and_ratios(tmp_path, capsys, monkeypatch):
  results = compare.main(argv := [
      "--task", "lm", "--optimizers", "adamw,adaact-adam+emb+untied",
      "--lr-grid", "adamw=0.001,0.01", "--lr-grid", "adaact-adam+emb+untied=0.3,1", *TINY_FLAGS,
      "--evals", "1", "--timing-steps", "2", "--timing-rounds", "1", "--out-dir", str(tmp_path)])
  report = (tmp_path / "results.md").read_text()
  assert report in capsys.readouterr().out
  corpus, _ = lm.corpus_and_splits(None, 0.05)
  assert corpus.sha256 in report and f"Python {platform.python_version()}" in report
  rows = {line.split(" | ")[0][2:]: line for line in report.splitlines() if line.startswith("| ")}
  assert set(rows) == {"run", "adamw", "adaact-adam+emb+untied"}
  assert rows["adamw"].split(" | ")[-2:] == ["1.00", "1.00 |"]       # the reference
  for label, r in results.items():
    assert r["config"].schedule == "constant" and r["config"].warmup_steps == 0
    sel = r["selection"]
    assert len(sel.runs) == 3 and sel.extended is not None   # a 2-point grid: always an edge
    assert all(len(runs) == 2 for runs in sel.runs.values())
    assert f"{sel.extended:g}+: " in rows[label]
  assert json.loads((tmp_path / "results.json").read_text())["adamw"]["lr"] == results["adamw"][
      "selection"].lr
  assert (tmp_path / "curves.png").stat().st_size > 0
  # --reuse: a rerun over the same runs trains nothing and reports the same selection.
  monkeypatch.setattr(lm, "run", lambda cfg: pytest.fail(f"trained {cfg.optimizer} again"))
  again = compare.main(argv + ["--reuse", str(tmp_path / "metrics.jsonl"),
                               "--out-dir", str(tmp_path / "again")])
  for label, r in again.items():
    assert r["selection"].lr == results[label]["selection"].lr
    assert [s["val_bpb"] for s in r["summaries"]] == [
        s["val_bpb"] for s in results[label]["summaries"]]
  with pytest.raises(SystemExit):
    compare.parse_args(["--select-seeds", "1"])
  with pytest.raises(ValueError, match="'\\+emb'/'\\+untied' are for --task lm"):
    compare.make_variants(compare.parse_args(["--optimizers", "adaact+emb"]))
  assert compare.parse_variant("adaact-adam+emb+untied") == {
      "optimizer": "adaact-adam", "embeddings": True, "tied": False}
  with pytest.raises(ValueError, match="unknown variant 'adamw\\+emb'"):
    compare.parse_variant("adamw+emb")
