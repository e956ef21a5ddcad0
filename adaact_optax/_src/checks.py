"""Hyperparameter checks shared by AdaAct's transformations: concrete values are
validated at construction, traced ones (``inject_hyperparams``) are exempt."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


UNMATCHED = ("sgd", "momentum", "error")


def concrete(name, value):
  """``value`` as a Python float, or None when it is traced (exempt from checks).

  Python numbers, numpy scalars and concrete jax arrays (also the arrays
  ``optax.inject_hyperparams`` passes at ``init``) are converted with
  ``float()``; a tracer refuses the conversion and is exempt.
  """
  if isinstance(value, (str, bytes)):
    raise ValueError(f"{name} must be a number, got the string {value!r}")
  try:
    return float(value)
  except jax.errors.ConcretizationTypeError:
    return None  # traced (jit, inject_hyperparams under jit): cannot be checked here
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a real scalar, got {value!r} of type "
                     f"{type(value).__name__}") from None


def check(name, value, ok, requirement):
  v = concrete(name, value)
  if v is not None and not ok(v):
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def below_one_in_float32(v) -> bool:
  # The transform computes 1 - b**t in float32: b must stay below 1 there.
  return 0 <= v and float(np.float32(v)) < 1


def validate(b1, b2, eps, power, unmatched):
  requirement = "in [0, 1) (also once rounded to float32, where the optimizer computes)"
  check("b1", b1, below_one_in_float32, requirement)
  check("b2", b2, below_one_in_float32, requirement)
  check("eps", eps, lambda v: 0 <= v < math.inf, "finite and >= 0")
  check("power", power, lambda v: 0 < v < math.inf, "finite and > 0")
  if isinstance(unmatched, str) and unmatched not in UNMATCHED or not isinstance(
      unmatched, (str, optax.GradientTransformation)):
    raise ValueError(f"unmatched must be one of {UNMATCHED} or, for adaact(), an optax "
                     f"transformation; got {unmatched!r}")
  if not isinstance(unmatched, str):
    raise ValueError("unmatched=<an optax transformation> is accepted by adaact(), not by "
                     "scale_by_adaact: wrap scale_by_adaact in optax.partition instead")


def check_mu_dtype(mu_dtype):
  if mu_dtype is None:
    return None
  try:
    dtype = jnp.dtype(mu_dtype)
  except TypeError:
    raise ValueError(f"mu_dtype must be a floating dtype (e.g. jnp.bfloat16), got "
                     f"{mu_dtype!r}") from None
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(f"mu_dtype must be a floating (or complex) dtype, got {dtype}: an "
                     "integer or bool first moment would truncate the momentum. Use e.g. "
                     "jnp.bfloat16 or jnp.float32, or None for the parameters' dtype.")
  return dtype


def check_learning_rate(learning_rate):
  if not callable(learning_rate):
    check("learning_rate", learning_rate, math.isfinite, "a finite number or an optax schedule")
