"""Quickstart: a small CNN trained with AdaAct on scikit-learn's bundled digits.

  python examples/quickstart.py [--epochs 20] [--batch-size 32] [--lr 0.1]

Everything runs offline: the 1,797 8x8 digit images ship with scikit-learn.
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import adaact_optax
from adaact_optax import linen as aa_linen


class SmallCNN(nn.Module):
  """Two 3x3 convolutions, global average pooling, a linear classifier."""

  @nn.compact
  def __call__(self, x):                                   # x: (B, 8, 8, 1)
    x = nn.relu(nn.Conv(32, (3, 3), padding=1)(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, padding=1)(x))
    x = nn.relu(nn.Dense(64)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


def load_data(seed):
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  return train_test_split(x, digits.target.astype(np.int32), test_size=0.2,
                          stratify=digits.target, random_state=seed)


def random_shift(rng, x, max_shift=1):
  """Translates each image by up to ``max_shift`` pixels (zero fill): cheap augmentation."""
  padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, len(x)))
  rows = dy[:, None] + np.arange(x.shape[1])
  cols = dx[:, None] + np.arange(x.shape[2])
  return padded[np.arange(len(x))[:, None, None], rows[:, :, None], cols[:, None, :]]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  x_train, x_test, y_train, y_test = load_data(args.seed)
  model = SmallCNN()
  params = model.init(jax.random.key(args.seed), x_train[:1])["params"]
  steps_per_epoch = len(x_train) // args.batch_size
  schedule = optax.cosine_decay_schedule(args.lr, args.epochs * steps_per_epoch)
  state = adaact_optax.TrainState.create(
      apply_fn=model.apply, params=params, tx=adaact_optax.adaact(schedule))

  @jax.jit
  def train_step(state, x, y):
    def loss_fn(params):
      logits, mutated = aa_linen.apply(model, {"params": params}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, mutated[aa_linen.COLLECTION]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, activation_stats=stats), loss

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({"params": params}, x), -1) == y)

  rng = np.random.default_rng(args.seed)
  start = time.perf_counter()
  for epoch in range(1, args.epochs + 1):
    order = rng.permutation(len(x_train))
    losses = []
    for i in tqdm(range(steps_per_epoch), desc=f"epoch {epoch:2d}", leave=False):
      idx = order[i * args.batch_size:(i + 1) * args.batch_size]
      state, loss = train_step(state, random_shift(rng, x_train[idx]), y_train[idx])
      losses.append(loss)
    test_acc = float(accuracy(state.params, x_test, y_test))
    print(f"epoch {epoch:2d}  train loss {float(np.mean(losses)):.4f}  test accuracy {test_acc:.2%}")
  print(f"final test accuracy {test_acc:.2%} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  main()
