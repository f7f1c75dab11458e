"""mmjax.methods.mixed_precision: bfloat16 compute within a stated tolerance of float32; routing,
losses, parameters and method state in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data import make_synthetic, mask_time_steps, standardize
from mmjax.flops import sub_jaxprs
from mmjax.methods import TaskSpec, build, default_model_config, mixed_precision
from mmjax.train import default_train_config, fit

# Every loss term of a bfloat16 step within LOSS_RTOL of float32's at the same parameters and
# keys (bfloat16 keeps 8 bits of mantissa: ~0.4 % per rounding; measured <= 0.25 %), and the
# gradient's direction within GRAD_COSINE (measured >= 0.9998).
LOSS_RTOL, GRAD_COSINE = 2e-2, 0.999


def _setup(name):
  task = "classification" if name == "emmr" else "regression"
  dataset = make_synthetic(jax.random.key(0), n_train=32, n_valid=4, n_test=4, seq_len=6, dims=8,
                           task=task)
  batch = mask_time_steps(jax.random.key(1), dataset.splits["train"], 0.3)
  config = default_model_config(name)
  config.hidden = 16
  if "num_heads" in config:
    config.num_heads = 2
  method = build(name, config, TaskSpec.from_dataset(dataset))
  params, state = method.init(jax.random.key(2), batch)
  return method, params, state, batch


def _step(method, params, state, batch):
  loss = method.stages[0].loss if method.stages else method.loss
  fn = lambda p: loss(p, state, batch, jax.random.key(3), True)
  (_, (metrics, new_state, _)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  return metrics, new_state, grads


@pytest.mark.parametrize("name", ["euar", "ease", "samlml", "emmr"])
def test_bfloat16_step_is_within_tolerance_of_float32(name):
  method, params, state, batch = _setup(name)
  low = mixed_precision(method, "bfloat16")
  (metrics, _, grads), (low_metrics, low_state, low_grads) = (
      _step(method, params, state, batch), _step(low, params, state, batch))
  assert set(low_metrics) == set(metrics)
  for term, value in low_metrics.items():
    assert value.dtype == jnp.float32, term
    np.testing.assert_allclose(value, metrics[term], rtol=LOSS_RTOL, atol=1e-3, err_msg=term)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  assert {x.dtype for x in jax.tree.leaves(low_grads)} == {jnp.dtype(jnp.float32)}
  a, b = flat(grads), flat(low_grads)
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > GRAD_COSINE
  assert jax.tree.map(lambda x: x.dtype, low_state) == jax.tree.map(lambda x: x.dtype, state)


def _dots(jaxpr):
  """Every dot_general of ``jaxpr`` and its sub-programs: ``(operand shapes, output dtype)``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield [tuple(v.aval.shape) for v in eqn.invars], eqn.outvars[0].aval.dtype
    for value in eqn.params.values():
      for sub in sub_jaxprs(value):
        yield from _dots(sub)


def test_routing_stays_float32_under_bfloat16():
  method, params, state, batch = _setup("euar")
  low = mixed_precision(method, "bfloat16")
  router = params["moe_text"]["router"]["kernel"].shape  # [hidden, N]
  jaxpr = jax.make_jaxpr(lambda p: low.loss(p, state, batch, jax.random.key(3), True))(params)
  dots = list(_dots(jaxpr.jaxpr))
  routing = [dtype for shapes, dtype in dots if router in shapes]
  assert len(routing) == 3 and set(routing) == {jnp.dtype(jnp.float32)}  # one router per modality
  assert jnp.dtype(jnp.bfloat16) in {dtype for _, dtype in dots}  # the rest computes in bfloat16
  _, (metrics, _, _) = low.loss(params, state, batch, jax.random.key(3), True)
  assert metrics["balance"].dtype == jnp.float32


def test_fit_in_bfloat16_keeps_float32_state_and_refuses_a_mismatched_config():
  dataset = standardize(make_synthetic(jax.random.key(0), n_train=32, n_valid=8, n_test=8,
                                       seq_len=4, dims=8))
  config = default_model_config("ease")
  config.update(hidden=16, num_heads=2)
  method = build("ease", config, TaskSpec.from_dataset(dataset))
  train_config = default_train_config()
  train_config.update(num_epochs=1, batch_size=16, progress=False, compute_dtype="bfloat16")
  with pytest.raises(ValueError, match=r"config.compute_dtype: 'bfloat16', but the method ease "
                     r"computes in 'float32'"):
    fit(method, dataset, train_config, log=lambda line: None)
  result = fit(mixed_precision(method, "bfloat16"), dataset, train_config, log=lambda line: None)
  assert np.isfinite(result.history[-1]["train/loss"])
  floats = [x.dtype for x in jax.tree.leaves((result.state.params, result.state.method_state,
                                              result.state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert set(floats) == {jnp.dtype(jnp.float32)}
