"""A byte-level text corpus every machine has: the Python standard library's source.

``build_corpus()`` concatenates the ``.py`` files at the top level of the
running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``),
sorted by name, and keeps the first ``max_bytes``; nothing is downloaded.
The standard library differs across Python versions, so every result records
``Corpus.python_version`` and ``Corpus.sha256``. ``split()`` cuts it into
contiguous train / validation / test parts (80/10/10 by default), so the
held-out text comes from modules the model never saw.
"""

from __future__ import annotations

import hashlib
import pathlib
import platform
import sysconfig
from typing import NamedTuple

import numpy as np

DEFAULT_MB = 3.0
MB = 2 ** 20


class Corpus(NamedTuple):
  """The corpus: ``data`` uint8 bytes ``(n,)`` and where they came from."""

  data: np.ndarray
  files: tuple[str, ...]       # file names, in corpus order (the last may be cut)
  directory: str
  python_version: str
  sha256: str

  def describe(self) -> str:
    return (f"{len(self.data):,} bytes from {len(self.files)} .py files in {self.directory} "
            f"(Python {self.python_version}, sha256 {self.sha256[:16]}...)")


def stdlib_dir() -> pathlib.Path:
  """The running interpreter's standard library folder."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def build_corpus(directory: str | pathlib.Path | None = None,
                 max_bytes: int = int(DEFAULT_MB * MB)) -> Corpus:
  """The first ``max_bytes`` of the ``.py`` files in ``directory``, sorted by name.

  Args:
    directory: where the ``.py`` files are (top level only); ``None``: the
      running interpreter's standard library.
    max_bytes: the corpus is cut at this many bytes (> 0).

  Returns:
    A ``Corpus``; the same files give the same bytes and ``sha256``.

  Raises:
    ValueError: ``directory`` is not a folder, holds no ``.py`` file, or
      ``max_bytes`` is not positive.
  """
  if max_bytes <= 0:
    raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
  folder = stdlib_dir() if directory is None else pathlib.Path(directory)
  if not folder.is_dir():
    raise ValueError(f"corpus folder {folder} does not exist; pass a folder holding .py files")
  paths = sorted(p for p in folder.glob("*.py") if p.is_file())
  if not paths:
    raise ValueError(f"corpus folder {folder} has no .py files at its top level; pass a folder "
                     "that does (by default the running interpreter's standard library, "
                     "sysconfig.get_paths()['stdlib'])")
  chunks, size, used = [], 0, []
  for path in paths:
    if size >= max_bytes:
      break
    chunk = path.read_bytes()[: max_bytes - size]
    chunks.append(chunk)
    used.append(path.name)
    size += len(chunk)
  raw = b"".join(chunks)
  return Corpus(np.frombuffer(raw, np.uint8).copy(), tuple(used), str(folder),
                platform.python_version(), hashlib.sha256(raw).hexdigest())


def split(data: np.ndarray, fractions=(0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
  """Contiguous ``{"train", "validation", "test"}`` parts of ``data``, in that order."""
  if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-9 or min(fractions) <= 0:
    raise ValueError(f"fractions must be three positive shares summing to 1, got {fractions}")
  a = int(round(fractions[0] * len(data)))
  b = a + int(round(fractions[1] * len(data)))
  return {"train": data[:a], "validation": data[a:b], "test": data[b:]}


def random_windows(rng: np.random.Generator, data: np.ndarray, batch_size: int,
                   context: int) -> tuple[np.ndarray, np.ndarray]:
  """A training batch: inputs and next-byte targets, int32 ``(batch_size, context)`` each,
  from windows starting at random offsets."""
  if len(data) < context + 1:
    raise ValueError(f"{len(data)} bytes cannot fill one window of context {context} + 1")
  start = rng.integers(0, len(data) - context, batch_size)
  idx = start[:, None] + np.arange(context + 1)
  windows = data[idx].astype(np.int32)
  return windows[:, :-1], windows[:, 1:]


def eval_windows(data: np.ndarray, context: int, max_windows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Fixed evaluation windows: non-overlapping, evenly spread over ``data``.

  At most ``max_windows`` (``None``: all of them), so every run scores the
  same bytes. Returns int32 inputs and targets ``(n, context)``.
  """
  n = (len(data) - 1) // context
  if n < 1:
    raise ValueError(f"{len(data)} bytes cannot fill one window of context {context} + 1")
  starts = np.arange(n) * context
  if max_windows is not None and max_windows < n:
    starts = starts[np.linspace(0, n - 1, max_windows).round().astype(int)]
  idx = starts[:, None] + np.arange(context + 1)
  windows = data[idx].astype(np.int32)
  return windows[:, :-1], windows[:, 1:]
