"""Task heads on the decoder's per-time-step features [B, 200, C].

The signal head works per time step. Every other task owns one pooled head (existence, latency,
amplitude, class, threshold): no parameter is shared between two tasks' losses, so a term of
small weight (amplitude, 0.01) is not drowned in a shared layer by the larger ones (Adam
normalises each parameter's step by its own gradient's scale, whatever the weight). A pooled
head attends over time with learned queries; beside the features it sees where each time step
is (a sinusoidal embedding, and the position itself, linear in time, so that the pooled
position of a query that attends to one peak is that peak's time: a soft argmax) and the input
trace (the value at a time step, which the normalised features no longer carry), and its MLP
sees the standardised static parameters directly (intensity above all decides latency and
threshold), not only through the FiLM conditioning of the trunk. A head may also read other
heads' answers (`evidence`): the threshold head reads the class probabilities and the wave-V
existence, latency and amplitude, as a clinician reads the threshold from them; those inputs
carry no gradient back, so each task still trains only its own head.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxtrain.models import layers

# Log-scales are bounded smoothly to (-LOG_SCALE_BOUND, LOG_SCALE_BOUND) by
# raw / sqrt(1 + (raw / bound)^2): like tanh, but the gradient decays polynomially instead of
# rounding to 0 in float32, so a scale pushed far out still gets pulled back (a hard clip's zero
# gradient froze the original's sigma at e^2). In standardised units sigma lies in [0.018, 55].
LOG_SCALE_BOUND = 4.0
# Last layers start small: outputs near 0 (standardised means, log-scales, logits) at init,
# so every loss starts at its order-1 value instead of on a saturated range.
OUTPUT_INIT = nn.initializers.variance_scaling(0.01, 'fan_in', 'normal')
# The pooled heads, one per task: their parameters (under module_name(task)) are the task heads
# that optim.create_optimizer trains at training.head_learning_rate_scale x the learning rate.
TASKS = ('exist', 'class', 'latency', 'amplitude', 'threshold')
POSITION_DIM = 16  # Sinusoidal position features appended before pooling.
N_QUERIES = 4  # Attention-pooling queries per head.


def module_name(task):
  """Name of the pooled head of `task` (one of TASKS) among the model's parameters."""
  return f'{task}_head'


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x, scale):
  """x itself; its gradient multiplied by `scale` on the way back (the heads' into the trunk)."""
  return x


def _scale_gradient_forward(x, scale):
  del scale
  return x, None


def _scale_gradient_backward(scale, _, gradient):
  return (gradient * scale,)


scale_gradient.defvjp(_scale_gradient_forward, _scale_gradient_backward)


def bounded_log_scale(raw):
  """Smoothly bounds a raw log-scale to (-LOG_SCALE_BOUND, LOG_SCALE_BOUND); slope 1 at 0."""
  return raw * jax.lax.rsqrt(1.0 + (raw / LOG_SCALE_BOUND)**2)


class SignalHead(nn.Module):
  """Per-time-step denoiser output: [B, L, C] -> [B, L] float32."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    h = nn.gelu(layers.group_norm(h))
    h = nn.gelu(nn.Conv(h.shape[-1], (3,), dtype=self.dtype)(h))
    return nn.Dense(1, kernel_init=OUTPUT_INIT, dtype=self.dtype)(h)[..., 0].astype(jnp.float32)


class PooledHead(nn.Module):
  """Attention pooling over time, then an MLP on [pooled, static]: -> [B, n_out] float32.

  Attributes:
    n_out: outputs.
    hidden: MLP width.
    dropout: dropout rate on the hidden layer.
    dtype: compute dtype of the dense layers (the pooling softmax is float32).
  """
  n_out: int
  hidden: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, x, static, train, evidence=None):
    """h [B, L, C] features, x [B, L] input trace, static [B, S] standardised, evidence
    optional [B, E] other heads' outputs (gradients stopped here)."""
    batch, length, _ = h.shape
    steps = jnp.arange(length)
    position = jnp.concatenate(  # [L, POSITION_DIM + 1]
        [layers.sinusoidal_embedding(steps, POSITION_DIM, max_period=length),
         (steps / (length - 1) - 0.5)[:, None]], axis=-1)
    z = jnp.concatenate(
        [nn.LayerNorm()(h), jnp.broadcast_to(position, (batch,) + position.shape).astype(h.dtype),
         x[..., None].astype(h.dtype)], axis=-1)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    scores = dense(N_QUERIES)(nn.gelu(dense(self.hidden)(z)))  # [B, L, Q]
    weights = nn.softmax(scores.astype(jnp.float32), axis=1)
    pooled = jnp.einsum('blq,blc->bqc', weights, z).reshape(batch, -1)
    side = [static] if evidence is None else [static, jax.lax.stop_gradient(evidence)]
    hidden = nn.gelu(dense(self.hidden)(
        jnp.concatenate([pooled] + [v.astype(pooled.dtype) for v in side], axis=-1)))
    hidden = nn.Dropout(self.dropout, deterministic=not train)(hidden)
    return dense(self.n_out, kernel_init=OUTPUT_INIT)(hidden).astype(jnp.float32)
