"""Per-sample squared gradient norms in one backward pass ("ghost norms").

Derived in chapter 2 of the book (book/ch02_computing_fast).

* :func:`per_sample_sq_norms`, :func:`per_sample_sq_norms_and_grad_sum`: one forward + one backward
  pass on a batch, ``.grad`` untouched.
* :class:`DiversityMeter`: the same measurement inside the user's own training step.
* :class:`PerSampleNormEngine`: the hooks behind both; :data:`LAYER_RULES` lists the layer types with
  a fast rule; ``nn.MultiheadAttention`` has a batched rule (``rules_attention.py``); every other layer
  with parameters (RNN/LSTM/GRU, EmbeddingBag, Conv3d, ConvTranspose, InstanceNorm, custom modules)
  uses the exact ``torch.func`` fallback (a per-sample loop where ``vmap`` cannot batch the layer),
  with a one-time warning. In the meter, convolutions and Linear layers on sequences (after the checked
  first call, where timed faster) sum their per-sample gradients into the weight gradient instead of
  letting autograd form it a second time (``fused.py``; ``.grad`` equal to float rounding, ``exact_grad=True`` for bit
  for bit).

Right or loud: a one-time permutation probe finds each layer's batch axis (``batch_axes.py``), and a
first-call check that the per-sample gradients add up to the autograd gradient catches parameters
used where no hook sees them and layers that mix samples (``engine.py``); both raise naming the layer
or parameter and the way out. Agreement with ``torch.func`` (relative to the largest per-sample
squared norm; ``tests/test_norms_harness.py``): 1e-6 in float64, 1e-4 in float32, 5e-2 for bfloat16
and float16 models and under ``torch.autocast`` (the forward pass itself is that coarse).
"""

from gradiv_lib.norms.engine import Check, PerSampleNormEngine
from gradiv_lib.norms.functional import per_sample_sq_norms, per_sample_sq_norms_and_grad_sum
from gradiv_lib.norms.loss_scale import batch_loss_factor, per_sample_losses
from gradiv_lib.norms.meter import DiversityMeter
from gradiv_lib.norms.rules import LAYER_RULES, SequenceStrategy

__all__ = [
    "Check",
    "DiversityMeter",
    "LAYER_RULES",
    "PerSampleNormEngine",
    "SequenceStrategy",
    "batch_loss_factor",
    "per_sample_losses",
    "per_sample_sq_norms",
    "per_sample_sq_norms_and_grad_sum",
]
