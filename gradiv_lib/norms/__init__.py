"""Per-sample squared gradient norms in one backward pass ("ghost norms").

Derived in chapter 2 of the book (book/ch02_computing_fast).

* :func:`per_sample_sq_norms`, :func:`per_sample_sq_norms_and_grad_sum`: one forward + one backward
  pass on a batch, ``.grad`` untouched.
* :class:`DiversityMeter`: the same measurement inside the user's own training step.
* :class:`PerSampleNormEngine`: the hooks behind both; :data:`LAYER_RULES` lists the layer types with
  a fast rule (others use a ``torch.func`` fallback with a one-time warning).
"""

from gradiv_lib.norms.engine import PerSampleNormEngine
from gradiv_lib.norms.functional import per_sample_sq_norms, per_sample_sq_norms_and_grad_sum
from gradiv_lib.norms.loss_scale import batch_loss_factor, per_sample_losses
from gradiv_lib.norms.meter import DiversityMeter
from gradiv_lib.norms.rules import LAYER_RULES, SequenceStrategy

__all__ = [
    "DiversityMeter",
    "LAYER_RULES",
    "PerSampleNormEngine",
    "SequenceStrategy",
    "batch_loss_factor",
    "per_sample_losses",
    "per_sample_sq_norms",
    "per_sample_sq_norms_and_grad_sum",
]
