"""The image example (examples/images): dataset loaders, models and their statistics trees,
the training CLI; and the comparison tool that drives it (tools/compare.py)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax._src import alignment as matching
from conftest import assert_f32_close
from examples import optimizers
from examples.images import input_pipeline
from examples.images import models
from examples.images import train
from tools import compare

pytestmark = pytest.mark.slow  # end to end: deselect with -m 'not slow'

# --- datasets ---------------------------------------------------------------


def test_digits_loader():
  ds = input_pipeline.load("digits")
  assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() == 1.0
  assert set(np.unique(ds.y_test)) == set(range(10))


def test_mnist1d_loader_is_generated_locally():
  state = np.random.get_state()[1].copy()
  ds = input_pipeline.load("mnist1d")
  assert ds.x_train.shape == (4000, 40, 1) and ds.x_test.shape == (1000, 40, 1)
  assert ds.input_shape == (40, 1) and ds.num_classes == 10
  assert set(np.unique(ds.y_train)) == set(range(10))
  # make_dataset reseeds numpy's global RNG; the loader restores it.
  np.testing.assert_array_equal(np.random.get_state()[1], state)


def _write_cifar(folder, sizes, rng):
  """Official binary layout: per record 1 label byte, then R, G, B planes of 32x32."""
  folder.mkdir(parents=True)
  contents = {}
  for name, n in zip(input_pipeline.CIFAR_FILES, sizes):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)   # (N, C, H, W)
    records = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)
    records.tofile(folder / name)
    contents[name] = (labels, pixels)
  return contents


def test_cifar10_binary_reader(tmp_path):
  rng = np.random.default_rng(0)
  contents = _write_cifar(tmp_path / "cifar-10-batches-bin", [3, 2, 2, 1, 2, 4], rng)
  images, labels = input_pipeline.read_cifar_binary(tmp_path / "cifar-10-batches-bin" / "test_batch.bin")
  test_labels, test_pixels = contents["test_batch.bin"]
  np.testing.assert_array_equal(labels, test_labels)
  np.testing.assert_array_equal(images, test_pixels.transpose(0, 2, 3, 1))  # NHWC
  # Both the parent folder and cifar-10-batches-bin itself are accepted.
  for where in (tmp_path, tmp_path / "cifar-10-batches-bin"):
    ds = input_pipeline.load("cifar10", where)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    train_labels = np.concatenate([contents[n][0] for n in input_pipeline.CIFAR_FILES[:-1]])
    np.testing.assert_array_equal(ds.y_train, train_labels)
    red_pixel = contents["data_batch_2.bin"][1][1, 0, 5, 7]       # record 1, R, row 5, col 7
    expected = (red_pixel / 255.0 - input_pipeline.CIFAR_MEAN[0]) / input_pipeline.CIFAR_STD[0]
    assert_f32_close(ds.x_train[3 + 1, 5, 7, 0], expected)


def test_cifar10_errors_name_the_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-bin/data_batch_1\.bin"):
    input_pipeline.load("cifar10", tmp_path)
  _write_cifar(tmp_path / "cifar-10-batches-bin", [1, 1, 1, 1, 1, 1], np.random.default_rng(0))
  (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").unlink()
  with pytest.raises(FileNotFoundError, match=r"test_batch\.bin"):
    input_pipeline.load("cifar10", tmp_path)
  (tmp_path / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(b"\0" * 100)
  with pytest.raises(ValueError, match="3073-byte"):
    input_pipeline.load("cifar10", tmp_path)
  with pytest.raises(ValueError, match="--data-dir"):
    input_pipeline.load("cifar10", None)


def test_cifar10_reader_rejects_labels_outside_0_to_9(tmp_path):
  folder = tmp_path / "cifar-10-batches-bin"
  _write_cifar(folder, [3, 1, 1, 1, 1, 2], np.random.default_rng(0))
  raw = bytearray((folder / "data_batch_1.bin").read_bytes())
  raw[2 * input_pipeline._CIFAR_RECORD] = 10            # record 2's label byte
  (folder / "data_batch_1.bin").write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"data_batch_1\.bin: record 2 \(byte offset 6146\) has "
                                       r"label byte 10, but CIFAR-10 labels are 0\.\.9"):
    input_pipeline.load("cifar10", tmp_path)


def test_validation_split_uses_only_training_data():
  ds = input_pipeline.load("digits")
  val = input_pipeline.validation_split(ds, 0.1, seed=0)
  assert len(val.y_test) == 144 and len(val.y_train) == 1437 - 144
  train_rows = {r.tobytes() for r in ds.x_train}
  assert all(r.tobytes() in train_rows for r in val.x_test)
  assert not {r.tobytes() for r in val.x_train} & {r.tobytes() for r in val.x_test}


def test_augmentation_is_a_padded_crop_with_optional_flip():
  x = jnp.arange(8 * 4 * 4 * 2, dtype=jnp.float32).reshape(8, 4, 4, 2) + 1
  out = np.asarray(input_pipeline.augment_crop_flip(jax.random.key(3), x, pad=2))
  padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = []
  for b in range(8):
    candidates = [(f, i, j) for f in (0, 1) for i in range(5) for j in range(5)
                  if np.array_equal(out[b], (lambda c: c[:, ::-1] if f else c)(
                      padded[b, i:i + 4, j:j + 4]))]
    assert candidates, f"example {b} is not a crop of the padded input"
    flips.append(candidates[0][0])
  assert 0 < sum(flips) < 8      # both flipped and unflipped examples occur


# --- models -----------------------------------------------------------------

SMALL_VIT = dict(dim=16, depth=2, heads=2, mlp_dim=32)


def _expected_stats_shape(path, kernel_shape):
  """Keep-rank statistics: the kernel's input axes, 1 on its output axes."""
  names = jax.tree_util.keystr(path, simple=True, separator='/').split('/')
  if any(n.startswith("MultiHeadDotProductAttention") for n in names):
    # DenseGeneral: query/key/value (in, heads, head_dim) read (in,); out
    # (heads, head_dim, out) reads (heads, head_dim).
    n_in = 2 if names[-2] == "out" else 1
  else:   # Dense (in, out), conv (*window, C, out)
    n_in = len(kernel_shape) - 1
  return tuple(kernel_shape[:n_in]) + (1,) * (len(kernel_shape) - n_in)


@pytest.mark.parametrize("name", models.MODELS)
@pytest.mark.parametrize("input_shape", [(8, 8, 1), (40, 1), (32, 32, 3)])
def test_model_forward_and_statistics_tree(name, input_shape):
  kw = SMALL_VIT if name == "vit_tiny" else {}
  model = models.get_model(name, 7, input_shape, **kw)
  x = jnp.ones((3,) + input_shape)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  logits, mutated = jax.eval_shape(
      lambda v: aa_linen.apply(model, v, x, train=True, mutable=["batch_stats"]), variables)
  assert logits.shape == (3, 7)
  stats = {matching.path_name(p): s.shape
           for p, s in jax.tree_util.tree_flatten_with_path(mutated[aa_linen.COLLECTION])[0]}
  kernels = [(p, k.shape) for p, k in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
             if jax.tree_util.keystr(p[-1:], simple=True) == "kernel"]
  assert kernels
  for path, shape in kernels:
    assert stats.get(matching.path_name(path)) == _expected_stats_shape(path, shape), path
  if name == "vit_tiny":
    assert sum(k.endswith("query/kernel") for k in stats) == SMALL_VIT["depth"]
  # The statistics tree fits the optimizer built from these params.
  tx = adaact_optax.adaact(0.1)
  grads = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), variables["params"])
  jax.eval_shape(lambda g, s: tx.update(g, tx.init(g), g, activation_stats=s), grads,
                 mutated[aa_linen.COLLECTION])


@pytest.mark.parametrize("name, low, high", [("resnet20", 0.26e6, 0.28e6),
                                             ("vit_tiny", 5.2e6, 5.5e6)])
def test_reference_sizes(name, low, high):
  model = models.get_model(name, 10, (32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 32, 3))))
  count = sum(p.size for p in jax.tree.leaves(variables["params"]))
  assert low < count < high


def test_model_errors():
  with pytest.raises(ValueError, match="unknown model"):
    models.get_model("vgg", 10, (8, 8, 1))
  with pytest.raises(ValueError, match="does not divide"):
    model = models.get_model("vit_tiny", 10, (8, 8, 1), patch=3, **SMALL_VIT)
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1))))


# --- training program ---------------------------------------------------------


def test_published_defaults_and_overrides():
  assert train.Config(optimizer="adaact").hyper("lr") == 0.1
  assert train.Config(optimizer="adaact").hyper("weight_decay") == 2e-3
  assert train.Config(optimizer="adaact").hyper("b2") == 0.999
  assert train.Config(optimizer="sgd").hyper("weight_decay") == 5e-4
  assert train.Config(optimizer="sgd").hyper("momentum") == 0.9
  cfg = train.parse_args(["--optimizer", "sgd", "--lr", "0.3", "--power", "0.25"])
  assert cfg.hyper("lr") == 0.3 and cfg.power == 0.25


def _help_entries(text: str) -> dict[str, str]:
  """``--help``'s options section: each flag's help, unwrapped."""
  entries, flag = {}, None
  for line in text.split("options:")[1].splitlines():
    match = re.match(r"  (-[\w-]+)", line)
    if match:
      flag = match.group(1)
      entries[flag] = ""
      line = re.sub(r"^  -[\w-]+( [{}\w,=-]+)?(, --[\w-]+)?", "", line)
    if flag:
      entries[flag] = " ".join((entries[flag] + " " + line).split())
  return entries


def test_help_shows_every_flags_real_default(capsys):
  with pytest.raises(SystemExit):
    train.parse_args(["--help"])
  entries = _help_entries(capsys.readouterr().out)
  assert "--epochs" in entries and "--no-progress" in entries
  for flag, default in [("--dataset", "digits"), ("--model", "mlp"), ("--optimizer", "adaact"),
                        ("--epochs", "10"), ("--batch-size", "128"), ("--seed", "0"),
                        ("--power", "0.5"), ("--warmup-epochs", "0.0"), ("--out-dir", "runs"),
                        ("--schedule", "cosine")]:
    assert entries[flag].endswith(f"(default: {default})"), (flag, entries[flag])
  # Flags whose default is the optimizer's list each optimizer's published value.
  for flag, name in [("--lr", "lr"), ("--weight-decay", "weight_decay"), ("--b1", "b1"),
                     ("--b2", "b2"), ("--eps", "eps"), ("--momentum", "momentum")]:
    groups = re.search(r"default: the optimizer's \((.*)\)$", entries[flag]).group(1)
    shown = {optimizer: value for group in groups.split("; ")
             for value in [group.rpartition(": ")[2]]
             for optimizer in group.rpartition(": ")[0].split(", ")}
    assert shown == {optimizer: f"{hyper[name]:g}" for optimizer, hyper in train.DEFAULTS.items()
                     if name in hyper}, flag
  # The others say theirs in words; none shows argparse's "(default: None)".
  for flag, text in entries.items():
    if flag not in ("-h", "--no-progress"):
      assert "default: " in text and "(default: None)" not in text, (flag, text)


def test_plot_of_a_one_epoch_run_shows_its_point(tmp_path):
  import matplotlib.image
  history = [dict(train_loss=1.5, test_acc=0.6)]       # one epoch: a single point per panel
  train.plot_curves({"adaact": [history]}, str(tmp_path / "one.png"))
  image = matplotlib.image.imread(tmp_path / "one.png")[..., :3]
  blue = np.abs(image - np.array([0x1f, 0x77, 0xb4]) / 255).max(-1) < 0.1   # the first line colour
  left, right = blue[:, :blue.shape[1] // 2], blue[:, blue.shape[1] // 2:]
  assert left.sum() > 5                            # train loss: only the marker can be blue there
  assert right.sum() > left.sum()                  # test accuracy: the marker and the legend


def test_cosine_schedule_with_warmup_scaled_by_the_learning_rate():
  cfg = train.Config(optimizer="sgd", momentum=0.0, weight_decay=0.0, warmup_epochs=2)
  tx, unit = train.make_optimizer(cfg, total_steps=100, steps_per_epoch=10)
  assert float(unit(0)) == 0.0 and float(unit(20)) == pytest.approx(1.0)
  assert float(unit(60)) == pytest.approx(0.5, rel=1e-5)
  assert float(unit(100)) == pytest.approx(0.0, abs=1e-7)
  params = {"w": jnp.zeros(())}
  state = optimizers.set_learning_rate(tx.init(params), 0.2)
  update = jax.jit(lambda s: tx.update({"w": jnp.ones(())}, s, params))
  steps = []
  for _ in range(61):
    u, state = update(state)
    steps.append(float(u["w"]))
  # The update is -lr * unit(step) * gradient.
  assert_f32_close(np.array([steps[10], steps[20], steps[60]]), np.array([-0.1, -0.2, -0.1]))


def _cli(tmp_path, optimizer, *extra):
  return ["--dataset", "digits", "--model", "mlp", "--model-arg", "hidden=[32]",
          "--optimizer", optimizer, "--epochs", "3", "--steps-per-epoch", "8",
          "--batch-size", "64", "--out-dir", str(tmp_path), "--no-progress", *extra]


@pytest.mark.parametrize("optimizer", ["adaact", "adaact-adam", "sgd", "adam", "adamw"])
def test_cli_training_run_lowers_the_loss(tmp_path, capsys, monkeypatch, optimizer):
  # The LM tests (tests/end_to_end/test_lm.py) run every optimizer; these the image CLI.
  if not optimizer.startswith("adaact"):  # the others must not pay for statistics capture
    monkeypatch.setattr(aa_linen, "apply", lambda *a, **k: pytest.fail("captured for " + optimizer))
  result = train.main(_cli(tmp_path, optimizer))
  losses = [r["train_loss"] for r in result["history"]]
  assert losses[-1] < losses[0] < 2.5, losses
  lines = (tmp_path / f"digits_mlp_{optimizer}_seed0.jsonl").read_text().splitlines()
  assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
  assert (tmp_path / f"digits_mlp_{optimizer}_seed0.png").stat().st_size > 0
  assert f"final: dataset=digits model=mlp optimizer={optimizer}" in capsys.readouterr().out
  opt_state = result["state"].opt_state
  if optimizer.startswith("adaact"):
    scale, = [n for n in jax.tree.leaves(
        opt_state, is_leaf=lambda n: isinstance(n, adaact_optax.ScaleByAdaActState))
        if isinstance(n, adaact_optax.ScaleByAdaActState)]
    assert int(scale.count) == 24
    assert float(scale.nu["Dense_0"]["kernel"].max()) > 0


def test_cli_cifar_with_augmentation(tmp_path, monkeypatch):
  calls = []
  augment = input_pipeline.augment_crop_flip
  monkeypatch.setattr(input_pipeline, "augment_crop_flip",
                      lambda k, x: calls.append(x.shape) or augment(k, x))
  _write_cifar(tmp_path / "data" / "cifar-10-batches-bin", [8, 8, 8, 8, 8, 8],
               np.random.default_rng(1))
  result = train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                       "--model", "mlp", "--model-arg", "hidden=[8]", "--epochs", "1",
                       "--batch-size", "16", "--out-dir", str(tmp_path), "--no-progress"])
  assert result["history"][0]["step"] == 2 and np.isfinite(result["summary"]["test_loss"])
  assert calls == [(16, 32, 32, 3)]     # traced once, on by default for cifar10
  with pytest.raises(FileNotFoundError, match="data_batch_1.bin"):
    train.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out-dir",
                str(tmp_path), "--no-progress"])


# --- comparison ---------------------------------------------------------------

def test_compare_chooses_lr_on_validation_and_reports(tmp_path, monkeypatch, capsys):
  seen = []
  run = train.run
  monkeypatch.setattr(train, "run", lambda cfg, ds, cb: seen.append(
      (cfg.optimizer, cfg.lr, cfg.seed, len(ds.y_test))) or run(cfg, ds, cb))
  results = compare.main(["--optimizers", "adaact,sgd", "--seeds", "2", "--epochs", "2",
                          "--steps-per-epoch", "3", "--batch-size", "64", "--model", "mlp",
                          "--model-arg", "hidden=[16]", "--grid-factors", "0.3,3",
                          "--track-variance", "--out-dir", str(tmp_path)])
  # Selection runs (2 seeds per rate) see the 144-example validation split, never
  # the 360-example test set; a 2-point grid always ends at an edge: one more rate.
  for label, r in results.items():
    sel = r["selection"]
    tried = sorted({(lr, seed) for o, lr, seed, n in seen if o == label and n == 144})
    assert tried == [(lr, seed) for lr in sorted(sel.runs) for seed in (0, 1)]
    assert len(sel.runs) == 3 and sel.extended in sel.runs
    ok = {lr: compare.lr_summary(runs)[0] for lr, runs in sel.runs.items()}
    assert sel.lr == min((lr for lr in ok if ok[lr] is not None), key=lambda lr: (
        ok[lr], np.mean([x["tiebreak"] for x in sel.runs[lr]])))
    assert [(lr, seed) for o, lr, seed, n in seen if o == label and n == 360] == [
        (sel.lr, 0), (sel.lr, 1)]
  report = (tmp_path / "results.md").read_text()
  assert report in capsys.readouterr().out
  rows = [line for line in report.splitlines() if " ± " in line]
  assert [row.split(" | ")[0] for row in rows] == ["| run", "| adaact", "| sgd"]
  assert "| adaact | Dense_0 |" in report and "| sgd | Dense_0 |" not in report
  assert (tmp_path / "curves.png").stat().st_size and (tmp_path / "variance.png").stat().st_size
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(lines) == 2 * 2 * (3 * 2 + 2)     # epochs x optimizers x (3 rates x 2 seeds + 2)
  assert {line["phase"] for line in lines} == {"select", "test"}


def test_ablate_power_variants_reach_the_optimizer(monkeypatch):
  args = compare.parse_args(["--ablate-power", "--lr-grid", "adaact=0.05,0.1"])
  variants = compare.make_variants(args)
  assert [v.overrides["power"] for v in variants] == [1 / 6, 1 / 4, 1 / 3, 1 / 2, 1.0]
  assert all(v.overrides["optimizer"] == "adaact" and v.grid == [0.05, 0.1] for v in variants)
  captured = {}
  monkeypatch.setattr(adaact_optax, "adaact", lambda *a, **k: captured.update(k) or
                      adaact_optax.scale_by_adaact())
  train.make_optimizer(train.Config(power=variants[0].overrides["power"]), 10, 5)
  assert captured["power"] == 1 / 6


def test_variance_summary_reads_v_hat_per_layer():
  params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
            "LayerNorm_0": {"scale": jnp.ones(3)}}
  tx = adaact_optax.adaact(0.1, b2=0.5)
  state = tx.init(params)
  stats = {"Dense_0": {"kernel": jnp.array([1.0, 2.0, 6.0]), "bias": jnp.ones(())}}
  _, state = tx.update(params, state, params, activation_stats=stats)
  summary = compare.variance_summary(state, b2=0.5)
  assert summary == {"Dense_0": {"mean": pytest.approx(3.0), "max": pytest.approx(6.0)}}


def test_table_shows_per_lr_validation_divergence_and_edge():
  history = [{"train_loss": 2.0 - 0.1 * e} for e in range(6)]
  summaries = [{"test_acc": 0.9, "epoch_time": 0.5, "diverged": False},
               {"test_acc": 0.8, "epoch_time": 0.5, "diverged": False}]
  run = lambda acc, diverged=(False, False): [
      dict(score=-acc, tiebreak=0.0, diverged=d) for d in diverged]
  middle = compare.Selection(0.1, {0.03: run(0.5), 0.1: run(0.7), 0.3: run(0.6, (False, True))})
  top = compare.Selection(0.9, {0.03: run(0.5), 0.1: run(0.6), 0.3: run(0.7), 0.9: run(0.8)},
                          edge="high", extended=0.9)
  results = {name: dict(selection=sel, histories=[history, history], summaries=summaries)
             for name, sel in (("middle", middle), ("top", top))}
  rows = compare.table(results, 2).splitlines()[2:]
  assert rows[0] == ("| middle | 0.03: 0.500, 0.1: 0.700, 0.3: diverged 1/2 | 0.1 "
                     "| 0.8500 ± 0.0707 | 0/2 | 2.0000 | 1.6000 | 1.5000 | 0.500 |")
  assert "0.9+: 0.800 | 0.9 (grid edge) |" in rows[1]


def test_augmentation_needs_images():
  x = np.zeros((4, 40, 1), np.float32)
  y = np.zeros(4, np.int32)
  ds = input_pipeline.Dataset(x, y, x, y, 10, "mnist1d")
  with pytest.raises(ValueError, match=r"--augment .* shape \(40, 1\)"):
    train.run(train.Config(augment=True, progress=False), ds)
