"""Steps rewritten for speed (issue 17) equal their previous formulation on fixed inputs and keys.

Each rewrite is undone by patching the previous code back in; every loss term and every gradient of
the methods that use it must stay equal to float tolerance.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import make_synthetic, mask_time_steps
from mmjax.methods import TaskSpec, build, default_model_config, samlml
from mmjax.nn import TemporalConv, transformer


def flax_conv(features, kernel_size, name=None):
  """SAM-LML's convolution before :class:`mmjax.nn.TemporalConv` (eq. 31)."""
  return nn.Conv(features, kernel_size=(kernel_size,), padding="SAME", name=name)


# rewrite -> (module attribute, the previous formulation, methods whose step uses it). EASE stands
# for SAM-LML and EMMR too: the three share mmjax.nn.TransformerEncoder.
REWRITES = {
    "jax.nn.dot_product_attention": (
        transformer, "fused_attention", nn.dot_product_attention, ("ease",)),
    "conv as one matmul": (samlml, "TemporalConv", flax_conv, ("samlml",)),
}


@pytest.fixture(autouse=True)
def accelerator_attention(monkeypatch):
  """fused_attention's accelerator path (jax.nn.dot_product_attention) on this CPU too."""
  monkeypatch.setattr(transformer, "FLAX_ATTENTION_BACKENDS", ())


def _data(task):
  dataset = make_synthetic(jax.random.key(0), n_train=12, n_valid=4, n_test=4, seq_len=6, dims=8,
                           task=task)
  # Random masked steps (some rows lose every step): the attention masks are non-trivial.
  return dataset, mask_time_steps(jax.random.key(1), dataset.splits["train"], 0.6)


def _loss_and_grads(name):
  """Loss terms and gradients of ``name``'s first (or only) objective in training mode, and its
  predictions, at fixed parameters and keys."""
  dataset, batch = _data("classification" if name == "emmr" else "regression")
  config = default_model_config(name)
  config.hidden = 8
  config.num_heads = 2
  method = build(name, config, TaskSpec.from_dataset(dataset))
  params, state = method.init(jax.random.key(2), batch)
  loss = method.stages[0].loss if method.stages else method.loss
  out = {"predict": jax.jit(method.predict)(params, state, batch)}
  fn = lambda p: loss(p, state, batch, jax.random.key(3), True)
  (_, (out["metrics"], _, _)), out["grads"] = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  return jax.device_get(out)


def test_attention_rewrite_equals_flax_attention():
  module, attr, previous, _ = REWRITES["jax.nn.dot_product_attention"]
  q, k, v = (jax.random.normal(jax.random.key(i), (3, 5, 2, 4)) for i in range(3))
  keep = jnp.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)  # row 1: all masked
  mask = nn.make_attention_mask(jnp.ones_like(keep), keep)
  # Deterministic (jax.nn.dot_product_attention; also with a dropout rate, as at evaluation), then
  # with weight dropout (Flax's path).
  for kwargs in ({}, dict(dropout_rate=0.5),
                 dict(dropout_rng=jax.random.key(4), dropout_rate=0.5, deterministic=False)):
    options = {"deterministic": True, **kwargs}
    call = lambda fn, *a: fn(*a, mask=mask, **options)  # pylint: disable=cell-var-from-loop
    for f in (lambda fn: lambda *a: call(fn, *a),
              lambda fn: jax.grad(lambda *a: jnp.sum(call(fn, *a) ** 2), (0, 1, 2))):
      new, old = f(getattr(module, attr))(q, k, v), f(previous)(q, k, v)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, old)


@pytest.mark.parametrize("kernel_size", [3, 4, 1])
def test_temporal_conv_equals_flax_conv(kernel_size):
  """Same parameter tree and initialisation as ``nn.Conv(..., 'SAME')``, same values and gradients
  (odd and even windows: the zero padding splits as XLA's 'SAME' does)."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 5))
  new, old = TemporalConv(6, kernel_size), flax_conv(6, kernel_size)
  params = new.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, old.init(jax.random.key(1), x))
  for f in (lambda m: m.apply(params, x),
            lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x))), (0, 1))(params, x)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 f(new), f(old))


@pytest.mark.parametrize("rewrite, name", [(r, m) for r in REWRITES for m in REWRITES[r][3]])
def test_rewritten_step_equals_previous_formulation(rewrite, name, monkeypatch):
  module, attr, previous, _ = REWRITES[rewrite]
  new = _loss_and_grads(name)
  monkeypatch.setattr(module, attr, previous)
  old = _loss_and_grads(name)
  assert jax.tree.structure(new) == jax.tree.structure(old)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(new), jax.tree.leaves(old)):
    # atol on the leaf's scale: an entry that cancels to ~0 among large ones keeps their rounding.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, np.abs(b).max()),
                               err_msg=jax.tree_util.keystr(path))
