"""Tests of the hierarchical U-Net and its S4D layer.

Behaviour is checked on the 'test' preset sizes; the convergence and demo sizes only through
`jax.eval_shape` (no compile, no training step).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import convergence
from jaxtrain import models
from jaxtrain.models import heads
from jaxtrain.models import layers
from jaxtrain.models import s4
from jaxtrain.models import unet

BATCH = 4
# XLA flags of jax_disable_most_optimizations, per compile: these tiny models compile in half
# the time and still run in milliseconds.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def fast_jit(fun, *args, **kwargs):
  """`fun` compiled for these example arguments with FAST_COMPILE."""
  return jax.jit(fun).lower(*args, **kwargs).compile(compiler_options=FAST_COMPILE)


def make_inputs(batch=BATCH, seed=0):
  """Random x [B, 200], static [B, 4], t [B] in 1..1000."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(batch, 200)), jnp.float32),
          jnp.asarray(rng.normal(size=(batch, 4)), jnp.float32),
          jnp.asarray(rng.integers(1, 1001, size=batch), jnp.int32))


def output_shapes(batch, n_classes=5):
  return {'signal': (batch, 200), 'peak_exist': (batch,), 'peak_latency': (batch, 2),
          'peak_amplitude': (batch, 2), 'class_logits': (batch, n_classes),
          'threshold': (batch, 2)}


@pytest.fixture(scope='module')
def tiny():
  """(model, params, eval apply, train apply) at the 'test' preset sizes."""
  model = models.create_model(convergence.get_config('test'))
  x, static, t = make_inputs()
  init = functools.partial(model.init, train=False)
  params = fast_jit(init, jax.random.key(0), x, static, t)(jax.random.key(0), x, static, t)
  params = params['params']
  eval_apply = fast_jit(lambda p, *a: model.apply({'params': p}, *a), params, x, static, t)
  return model, params, eval_apply


@pytest.mark.parametrize('preset', ['', 'demo', 'test'])
def test_output_shapes(preset):
  config = convergence.get_config(preset)
  model = models.create_model(config)
  x, static, t = make_inputs(batch=3)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x, static, t)
  assert set(variables) == {'params'}
  rngs = {'dropout': jax.random.key(1), 'condition': jax.random.key(2)}
  for train in (False, True):
    out = jax.eval_shape(functools.partial(model.apply, train=train, rngs=rngs),
                         variables, x, static, t)
    assert {k: v.shape for k, v in out.items()} == output_shapes(3)
    assert all(v.dtype == jnp.float32 for v in out.values())


def test_convergence_parameter_budget():
  model = models.create_model(convergence.get_config())
  x, static, t = make_inputs(batch=1)
  params = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), x, static, t)['params']
  count = {k: sum(np.prod(p.shape) for p in jax.tree.leaves(v)) for k, v in params.items()}
  assert {'enc_0', 'enc_3', 'bottleneck', 'dec_0', 'dec_3', 'signal_head', 'exist_head',
          'latency_head', 'amplitude_head', 'class_head', 'threshold_head'} <= set(count)
  assert 20e6 < sum(count.values()) < 80_298_680  # below the original's count
  # Attention only at the 52-sample level: 3 blocks there, none in the other levels.
  assert any('TransformerBlock' in k for k in params['dec_2'])
  assert not any('TransformerBlock' in k for k in params['dec_3'])


def test_tiny_forward_is_finite(tiny):
  _, params, eval_apply = tiny
  out = eval_apply(params, *make_inputs())
  assert {k: v.shape for k, v in out.items()} == output_shapes(BATCH)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
  # The log-scales start near 0 (sigma near 1 standard deviation), inside the bound.
  for key in ('peak_latency', 'peak_amplitude', 'threshold'):
    assert float(jnp.max(jnp.abs(out[key][:, 1]))) < 1.0


def test_timestep_changes_signal(tiny):
  _, params, eval_apply = tiny
  x, static, t = make_inputs()
  a = eval_apply(params, x, static, t)['signal']
  b = eval_apply(params, x, static, t // 2)['signal']
  assert float(jnp.min(jnp.max(jnp.abs(a - b), axis=1))) > 1e-4


def test_static_parameter_changes_every_output(tiny):
  _, params, eval_apply = tiny
  x, static, t = make_inputs()
  a = eval_apply(params, x, static, t)
  b = eval_apply(params, x, static.at[:, 1].add(1.0), t)  # intensity + 1 sd
  for key in a:
    assert float(jnp.min(jnp.max(jnp.abs(a[key] - b[key]).reshape(BATCH, -1), axis=1))) > 1e-5, key


def test_null_condition_rate_in_training_only():
  """The condition vector equals the null-condition one for about cond_drop_rate of the
  samples with t > 0 in training; never for t = 0, never in evaluation."""
  rate, batch = 0.25, 800
  conditioning = unet.Conditioning(32, rate)
  always_null = unet.Conditioning(32, 1.0)
  _, static, t = make_inputs(batch=batch)
  params = conditioning.init(jax.random.key(0), static, t, train=False)
  rngs = {'condition': jax.random.key(3)}
  null = always_null.apply(params, static, t, train=True, rngs=rngs)
  is_null = lambda c: np.all(np.isclose(c, null, atol=1e-6), axis=1)
  train = conditioning.apply(params, static, t, train=True, rngs=rngs)
  share = is_null(train).mean()
  assert abs(share - rate) < 4 * np.sqrt(rate * (1 - rate) / batch), share
  assert not is_null(conditioning.apply(params, static, t, train=False)).any()
  clean = jnp.zeros_like(t)  # the task heads' pass keeps its condition in training
  np.testing.assert_array_equal(
      always_null.apply(params, static, clean, train=True, rngs=rngs),
      conditioning.apply(params, static, clean, train=False))


def test_condition_dropout_reaches_the_model(tiny):
  """With rate 1, training outputs ignore the static parameters."""
  model, params, _ = tiny
  x, static, t = make_inputs()
  model = model.clone(cond_drop_rate=1.0, dropout=0.0)
  rngs = {'dropout': jax.random.key(1), 'condition': jax.random.key(2)}
  apply = fast_jit(lambda s: model.apply({'params': params}, x, s, t, train=True, rngs=rngs)[
      'signal'], static)
  np.testing.assert_allclose(apply(static), apply(static + 1.0), atol=1e-6)


def test_head_dropout_reaches_only_the_pooled_heads(tiny):
  """model.head_dropout = 1 zeroes every pooled head's hidden layer in training (its answer no
  longer depends on the trace), and leaves the denoiser as it was without head dropout."""
  _, params, _ = tiny
  x, static, t = make_inputs()
  rngs = {'dropout': jax.random.key(1), 'condition': jax.random.key(2)}

  def outputs(head_dropout, trace):
    config = convergence.get_config('test')
    config.model.dropout, config.model.head_dropout = 0.0, head_dropout
    model = models.create_model(config)
    return fast_jit(lambda v: model.apply({'params': params}, v, static, t, train=True,
                                          rngs=rngs), trace)(trace)

  dropped, other = outputs(1.0, x), outputs(1.0, x + 1.0)
  kept = outputs(0.0, x)
  np.testing.assert_allclose(dropped['signal'], kept['signal'], rtol=1e-6, atol=1e-7)
  for key in ('peak_exist', 'peak_latency', 'class_logits'):
    np.testing.assert_array_equal(dropped[key], other[key])
    assert not np.allclose(kept[key], dropped[key])


def test_s4d_kernel_one_mode_matches_closed_form():
  """K_l = 2 Re(C (e^{dt A} - 1) / A e^{dt A l}) for A = -a + i w, as damped cosine/sine."""
  a, w, dt, c = 0.7, 3.0, 0.05, 0.8 - 0.3j
  kernel = s4.s4d_kernel(jnp.log(jnp.array([dt])), jnp.log(jnp.array([[a]])),
                         jnp.array([[w]]), jnp.array([[c]], jnp.complex64), 64)[0]
  l = np.arange(64)
  big_a = complex(-a, w)
  coeff = c * (np.exp(dt * big_a) - 1) / big_a
  expected = 2 * np.exp(-a * dt * l) * (coeff.real * np.cos(w * dt * l)
                                        - coeff.imag * np.sin(w * dt * l))
  np.testing.assert_allclose(kernel, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('length', [1, 2, 25, 64, 199, 208])
def test_s4d_kernel_equals_the_sum_over_every_lag(length):
  """The factored powers (exp(dt A i) exp(dt A inner j)) give the kernel of the direct sum
  2 Re(sum_n C_n (e^{dt A_n} - 1) / A_n e^{dt A_n l}), evaluated in float64, to float32 error."""
  rng = np.random.default_rng(length)
  h, n = 3, 16
  log_dt = rng.uniform(np.log(1e-3), np.log(1e-1), h)
  log_a_real = np.log(0.5) + 0.3 * rng.normal(size=(h, n))
  a_imag = np.pi * np.arange(n) + rng.normal(size=(h, n))
  c = rng.normal(size=(h, n)) + 1j * rng.normal(size=(h, n))
  kernel = s4.s4d_kernel(*(jnp.asarray(v, jnp.float32) for v in (log_dt, log_a_real, a_imag)),
                         jnp.asarray(c, jnp.complex64), length)
  a = -np.exp(log_a_real) + 1j * a_imag
  dta = np.exp(log_dt)[:, None] * a
  powers = np.exp(dta[..., None] * np.arange(length))
  expected = 2 * np.real(np.einsum('hn,hnl->hl', c * (np.exp(dta) - 1) / a, powers))
  assert kernel.shape == (h, length)
  np.testing.assert_allclose(kernel, expected, atol=1e-5 * np.abs(expected).max())


def _recurrence(params, prefix, u):
  """Output of the discretised diagonal SSM of one channel run step by step: [L]."""
  a = -np.exp(params[f'{prefix}_log_a_real'][0]) + 1j * params[f'{prefix}_a_imag'][0]
  dt = np.exp(params[f'{prefix}_log_dt'][0])
  c = params[f'{prefix}_c'][0, :, 0] + 1j * params[f'{prefix}_c'][0, :, 1]
  state, out = np.zeros_like(a), []
  for u_k in u:
    state = np.exp(dt * a) * state + (np.exp(dt * a) - 1) / a * u_k
    out.append(2 * np.real(np.sum(c * state)))
  return np.array(out)


@pytest.mark.parametrize('bidirectional', [False, True])
def test_s4d_layer_equals_its_recurrence(bidirectional):
  """FFT convolution = running the state-space recurrence (forwards, and backwards over the
  strictly future samples), plus D u."""
  layer = s4.S4D(d_state=3, bidirectional=bidirectional)
  u = np.random.default_rng(0).normal(size=(1, 40, 1)).astype(np.float32)
  params = jax.tree.map(np.asarray, layer.init(jax.random.key(0), u)['params'])
  y = np.asarray(layer.apply({'params': params}, u))[0, :, 0]
  expected = _recurrence(params, 'forward', u[0, :, 0]) + params['d'][0] * u[0, :, 0]
  if bidirectional:
    future = np.concatenate([u[0, 1:, 0], [0.0]])[::-1]  # u[i+1] for output i, reversed
    expected += _recurrence(params, 'backward', future)[::-1]
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('bidirectional', [False, True])
def test_s4d_fft_and_matmul_convolutions_agree(bidirectional):
  """The Toeplitz matmul and the FFT apply the same kernels: outputs agree to 1e-5 of their
  scale on random inputs and parameters, at the longest length the model uses (208)."""
  rng = np.random.default_rng(1)
  u = jnp.asarray(rng.normal(size=(3, 208, 6)), jnp.float32)
  fft_layer = s4.S4D(d_state=8, bidirectional=bidirectional, conv='fft')
  params = fft_layer.init(jax.random.key(3), u)
  # Random, not initial, parameters: slow-decaying modes make long kernels.
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  y_fft = fft_layer.apply(params, u)
  y_matmul = fft_layer.clone(conv='matmul').apply(params, u)
  scale = float(jnp.max(jnp.abs(y_fft)))
  assert scale > 1.0
  assert float(jnp.max(jnp.abs(y_fft - y_matmul))) <= 1e-5 * scale


def test_precomputed_s4d_kernels_give_the_same_outputs_and_gradient(tiny):
  """`model.s4_kernels` (what the train step computes once per update) fed back through
  s4.KERNELS gives the outputs of the model computing its own kernels, at every level's length
  (a kernel of the wrong length would be silently truncated or zero-padded by the FFT); the
  kernels' gradient pulled back to the parameters gives the direct gradient."""
  model, params, eval_apply = tiny
  x, static, t = make_inputs()
  kernels = model.s4_kernels(params, x.shape[1])
  lengths = {leaf.shape[-1] for leaf in jax.tree.leaves(kernels)}
  assert lengths == {200, 100}  # One level at 200 steps; the bottleneck at 100.

  def loss(p, k=None):
    variables = {'params': p} if k is None else {'params': p, s4.KERNELS: k}
    out = model.apply(variables, x, static, t)
    return sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(out))

  def both(p, k):  # One program: run op by op, these passes took over a minute.
    direct = jax.value_and_grad(loss)(p)
    given, (param_grad, kernel_grad) = jax.value_and_grad(loss, argnums=(0, 1))(p, k)
    _, pullback = jax.vjp(lambda q: model.s4_kernels(q, x.shape[1]), p)
    return direct, given, param_grad, pullback(kernel_grad)[0]

  (direct, direct_grad), given, param_grad, pulled = fast_jit(both, params, kernels)(params,
                                                                                    kernels)
  np.testing.assert_allclose(given, direct, rtol=1e-6)
  # The S4D parameters reach the loss through the given kernels only.
  assert not np.asarray(param_grad['enc_0']['S4Block_0']['S4D_0']['forward_log_dt']).any()
  total = jax.tree.map(jnp.add, param_grad, pulled)
  for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(direct_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(b))))
  # Kernels of another length are refused, not cut or padded by the FFT.
  with pytest.raises(ValueError, match='given S4D kernels of shape .* for an input of 200 steps'):
    loss(params, model.s4_kernels(params, 96))


@pytest.mark.parametrize('conv', ['matmul', 'mixed'])
def test_model_with_matmul_or_mixed_s4d_gives_the_fft_outputs(tiny, conv, monkeypatch):
  """'mixed' convolves the 100-step bottleneck by matmul (its bound raised from 64 for the
  tiny model) and the 200-step level by FFT: the outputs are the all-FFT model's."""
  monkeypatch.setattr(s4, 'MATMUL_MAX_LENGTH', 100)
  model, params, _ = tiny
  x, static, t = make_inputs()
  outputs = {}
  for name in ('fft', conv):
    other = model.clone(s4_conv=name)
    outputs[name] = fast_jit(lambda p, *a, m=other: m.apply({'params': p}, *a), params, x,
                             static, t)(params, x, static, t)
  for name, value in outputs['fft'].items():
    np.testing.assert_allclose(outputs[conv][name], value, rtol=1e-4, atol=1e-4, err_msg=name)
  # And it did convolve some layers (and only some, for 'mixed') without the FFT.
  ffts = {name: str(jax.make_jaxpr(lambda p, m=model.clone(s4_conv=name): m.apply(
      {'params': p}, x, static, t))(params)).count(' fft[') for name in ('fft', conv)}
  assert ffts[conv] < ffts['fft']
  assert (ffts[conv] > 0) == (conv == 'mixed')


def test_bfloat16_model_keeps_float32_parameters_and_outputs(tiny):
  """bfloat16 compute: same parameters (float32), float32 outputs, close to the float32 model."""
  model, params, eval_apply = tiny
  x, static, t = make_inputs()
  half = model.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(functools.partial(half.init, train=False), jax.random.key(0), x,
                          static, t)['params']
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
  out = fast_jit(lambda p, *a: half.apply({'params': p}, *a), params, x, static, t)(
      params, x, static, t)
  reference = eval_apply(params, x, static, t)
  for name, value in out.items():
    assert value.dtype == jnp.float32, name
    error = float(jnp.max(jnp.abs(value - reference[name])))
    assert error <= 0.05 * float(jnp.max(jnp.abs(reference[name]))) + 1e-3, (name, error)
  assert float(jnp.max(jnp.abs(out['signal'] - reference['signal']))) > 0  # bf16 was used.


def test_resampling_shapes():
  x = jnp.ones((2, 52, 8))
  down = layers.Downsample(16)
  up = layers.Upsample(4)
  assert down.apply(down.init(jax.random.key(0), x), x).shape == (2, 26, 16)
  assert up.apply(up.init(jax.random.key(0), x), x).shape == (2, 104, 4)


def test_bounded_log_scale_keeps_a_gradient():
  raw = jnp.array([-1e3, -30.0, 0.0, 30.0, 1e3])
  values = heads.bounded_log_scale(raw)
  grads = jax.vmap(jax.grad(heads.bounded_log_scale))(raw)
  assert float(jnp.max(jnp.abs(values))) < heads.LOG_SCALE_BOUND
  assert bool(jnp.all(grads > 0)) and float(grads[2]) == 1.0


# Each task output -> the pooled head that owns it.
OWNERS = {'peak_exist': 'exist_head', 'peak_latency': 'latency_head',
          'peak_amplitude': 'amplitude_head', 'class_logits': 'class_head',
          'threshold': 'threshold_head'}


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(tree)))


def test_each_task_trains_only_its_own_head(tiny):
  model, params, _ = tiny
  x, static, t = make_inputs()

  def weighted(p, weights):  # weights [5]: one task's outputs at a time.
    out = model.apply({'params': p}, x, static, t)
    return sum(w * jnp.sum(out[k]) for w, k in zip(weights, OWNERS))

  grad = fast_jit(jax.grad(weighted), params, jnp.zeros(5))
  for i, (task, owner) in enumerate(OWNERS.items()):
    g = grad(params, jnp.eye(5)[i])
    norms = {name: float(_global_norm(g[name])) for name in OWNERS.values()}
    assert norms[owner] > 0, task
    assert all(v == 0 for name, v in norms.items() if name != owner), (task, norms)
    assert float(_global_norm(g['dec_0'])) > 0, task  # ... and the shared trunk.


def test_threshold_head_reads_the_class_and_wave_v_answers(tiny):
  model, params, eval_apply = tiny
  x, static, t = make_inputs()
  base = eval_apply(params, x, static, t)
  # Another class head (its output layer scaled): other class logits, so another threshold,
  # although the threshold head's own parameters and the trunk are the same.
  class_out = params['class_head']['Dense_3']
  changed = dict(params, class_head=dict(params['class_head'], Dense_3=jax.tree.map(
      lambda v: 50.0 * v, class_out)))
  out = eval_apply(changed, x, static, t)
  assert float(jnp.max(jnp.abs(out['class_logits'] - base['class_logits']))) > 1e-3
  assert float(jnp.min(jnp.abs(out['threshold'][:, 0] - base['threshold'][:, 0]))) > 1e-7
  np.testing.assert_array_equal(out['peak_latency'], base['peak_latency'])


def test_pooled_head_reads_the_static_values_and_the_trace_directly():
  head = heads.PooledHead(n_out=2, hidden=8, dropout=0.0)
  rng = np.random.default_rng(0)
  h, x, static = (jnp.asarray(rng.normal(size=s), jnp.float32)
                  for s in ((3, 20, 6), (3, 20), (3, 4)))
  params = head.init(jax.random.key(0), h, x, static, False)
  apply = lambda *a: head.apply(params, *a, False)
  base = apply(h, x, static)
  # Same features: only the static values, or only the trace, differ.
  for changed in (apply(h, x, static.at[:, 1].add(1.0)), apply(h, x.at[:, 7].add(3.0), static)):
    assert float(jnp.min(jnp.max(jnp.abs(changed - base), axis=1))) > 1e-6


def test_head_gradient_scale_scales_only_what_the_heads_send_the_trunk(tiny):
  """Same outputs; a task head's loss gives the trunk `scale` x its gradient and the head its
  own; the denoiser's loss gives the trunk the same gradient at any scale; < 0 is refused."""
  tiny_model, params, _ = tiny
  assert tiny_model.head_gradient_scale == 1.0
  x, static, t = make_inputs()
  grads, outputs = {}, {}
  for scale in (1.0, 0.25):
    model = tiny_model.clone(head_gradient_scale=scale)

    def outputs_and_grads(p, model=model):
      apply = lambda q: model.apply({'params': q}, x, static, t)
      return apply(p), {
          'class': jax.grad(lambda q: jnp.sum(apply(q)['class_logits'][:, 1]))(p),
          'signal': jax.grad(lambda q: jnp.sum(apply(q)['signal']**2))(p)}

    outputs[scale], grads[scale] = fast_jit(outputs_and_grads, params)(params)
  jax.tree.map(np.testing.assert_allclose, outputs[1.0], outputs[0.25])
  for name in grads[1.0]['class']:
    factor = 1.0 if name.endswith('_head') else 0.25
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, factor * a, rtol=1e-4, atol=1e-8),
                 grads[1.0]['class'][name], grads[0.25]['class'][name])
  assert any(np.abs(v).max() > 0 for v in jax.tree.leaves(grads[1.0]['class']['dec_0']))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8),
               grads[1.0]['signal'], grads[0.25]['signal'])
  config = convergence.get_config('test')
  config.training.head_gradient_scale = 0.25
  assert models.create_model(config).head_gradient_scale == 0.25  # The config reaches it.
  config.training.head_gradient_scale = -1.0
  with pytest.raises(ValueError, match='head_gradient_scale'):
    models.create_model(config)
