"""Generated and bundled problems: synthetic regression and classification (ch. 1, 3, 4) and scikit-learn's digits."""

from __future__ import annotations

import math
from typing import Any

import torch

from .core import InMemoryData, _check_positive_int


# --------------------------------------------------------------------------------------------
# Synthetic problems
# --------------------------------------------------------------------------------------------


def synthetic_regression(
    n: int,
    d: int,
    noise: float = 0.0,
    seed: int = 0,
    duplicates: int = 1,
    condition_number: float = 1.0,
    outputs: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InMemoryData:
    r"""Linear regression with Gaussian features, optionally with every sample duplicated.

    .. math::
        x_i \sim \mathcal N(0, \Sigma),\quad
        y_i = W_\star x_i + \sigma\,\varepsilon_i,\quad
        \varepsilon_i \sim \mathcal N(0, I),\quad
        W_\star \in \mathbb R^{\text{outputs}\times d},\ (W_\star)_{jk} \sim \mathcal N(0, 1/d).

    :math:`\Sigma` is diagonal with eigenvalues spaced geometrically from 1 down to
    ``1 / condition_number`` (isotropic when it is 1).

    **Duplication.** ``n // duplicates`` distinct samples are drawn and each is repeated
    ``duplicates`` times (noise included), so the data set always has ``n`` samples; the copies
    are stacked in blocks (rows ``i, i + n/r, i + 2n/r, ...`` are equal). With
    :math:`r` copies of every sample, :math:`\sum_i\|\nabla f_i\|^2` grows by :math:`r` and
    :math:`\|\sum_i\nabla f_i\|^2` by :math:`r^2`: gradient diversity :math:`\Delta` falls by a
    factor :math:`r` at any :math:`w`, while :math:`B_S = N\Delta` stays that of the distinct set.

    Parameters
    ----------
    n : int
        Total number of samples (a multiple of ``duplicates``).
    d : int
        Input dimension.
    noise : float
        Label-noise standard deviation :math:`\sigma \ge 0`.
    seed : int
        Seed; the same seed gives the same data.
    duplicates : int
        Copies of each distinct sample, :math:`r \ge 1`.
    condition_number : float
        Ratio of the largest to the smallest feature variance, :math:`\ge 1`.
    outputs : int
        Number of regression targets; ``y`` has shape ``(n, outputs)``.
    device, dtype
        Where and in which floating type the tensors are made.

    Returns
    -------
    InMemoryData
        ``info`` holds ``w_star`` (outputs × d), ``feature_variances`` (d,), ``noise`` and
        ``duplicates``.
    """
    _check_positive_int(n, "n")
    _check_positive_int(d, "d")
    _check_positive_int(duplicates, "duplicates")
    _check_positive_int(outputs, "outputs")
    if not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    if not (condition_number >= 1 and math.isfinite(condition_number)):
        raise ValueError(f"condition_number must be a finite number >= 1, got {condition_number}")
    if n % duplicates:
        raise ValueError(
            f"n must be a multiple of duplicates so that every sample has the same number of "
            f"copies; got n={n}, duplicates={duplicates}"
        )
    generator = torch.Generator().manual_seed(seed)
    distinct = n // duplicates
    variances = torch.logspace(0.0, -math.log10(condition_number), d, dtype=torch.float64)
    x = torch.randn(distinct, d, generator=generator, dtype=torch.float64) * variances.sqrt()
    w_star = torch.randn(outputs, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
    y = x @ w_star.T + noise * torch.randn(
        distinct, outputs, generator=generator, dtype=torch.float64
    )
    x, y = x.repeat(duplicates, 1), y.repeat(duplicates, 1)
    info = {
        "w_star": w_star.to(device=device, dtype=dtype),
        "feature_variances": variances.to(device=device, dtype=dtype),
        "noise": noise,
        "duplicates": duplicates,
    }
    return InMemoryData(x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype), info)


def synthetic_classification(
    n: int,
    d: int,
    classes: int,
    seed: int = 0,
    separation: float = 3.0,
    kind: str = "blobs",
    teacher_width: int = 32,
    label_noise: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> InMemoryData:
    r"""Synthetic classification: Gaussian blobs or the labels of a random teacher network.

    * ``kind="blobs"``: balanced classes, :math:`x_i = \mu_{y_i} + \varepsilon_i`,
      :math:`\varepsilon_i\sim\mathcal N(0, I_d)`, class means
      :math:`\mu_c = s\,u_c/\sqrt 2` with random unit vectors :math:`u_c`, so two means are about
      ``separation`` :math:`= s` noise standard deviations apart.
    * ``kind="teacher"``: :math:`x_i\sim\mathcal N(0, I_d)` and
      :math:`y_i = \arg\max_c\,[V\tanh(Ux_i)]_c` for a random one-hidden-layer teacher with
      ``teacher_width`` units (the planted-model set-up of the width chapter). Classes need not be
      balanced; ``separation`` scales the teacher's logits and has no effect on the argmax.

    ``label_noise`` replaces that fraction of the labels (chosen at random) by uniform random
    classes.

    Returns
    -------
    InMemoryData
        ``y`` is ``long`` of shape ``(n,)``; ``info`` holds ``kind`` and the class means or the
        teacher weights.
    """
    _check_positive_int(n, "n")
    _check_positive_int(d, "d")
    _check_positive_int(classes, "classes", minimum=2)
    _check_positive_int(teacher_width, "teacher_width")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if not (separation >= 0 and math.isfinite(separation)):
        raise ValueError(f"separation must be a finite number >= 0, got {separation}")
    generator = torch.Generator().manual_seed(seed)
    info: dict[str, Any] = {"kind": kind}
    if kind == "blobs":
        directions = torch.randn(classes, d, generator=generator, dtype=torch.float64)
        means = separation / math.sqrt(2.0) * directions / directions.norm(dim=1, keepdim=True)
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=generator)]
        x = means[y] + torch.randn(n, d, generator=generator, dtype=torch.float64)
        info["means"] = means.to(device=device, dtype=dtype)
    elif kind == "teacher":
        u = torch.randn(teacher_width, d, generator=generator, dtype=torch.float64) / math.sqrt(d)
        v = torch.randn(classes, teacher_width, generator=generator, dtype=torch.float64)
        v = v / math.sqrt(teacher_width)
        x = torch.randn(n, d, generator=generator, dtype=torch.float64)
        y = (separation * torch.tanh(x @ u.T) @ v.T).argmax(dim=1)
        info["teacher"] = {
            "U": u.to(device=device, dtype=dtype),
            "V": v.to(device=device, dtype=dtype),
        }
    else:
        raise ValueError(f"kind must be one of 'blobs', 'teacher'; got {kind!r}")
    if label_noise > 0:
        flip = torch.rand(n, generator=generator) < label_noise
        y = torch.where(flip, torch.randint(classes, (n,), generator=generator), y)
    return InMemoryData(x.to(device=device, dtype=dtype), y.to(device), info)


def load_digits(
    seed: int = 0,
    test_fraction: float = 0.2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    flat: bool = True,
    stratify: bool = False,
) -> tuple[InMemoryData, InMemoryData]:
    """scikit-learn's bundled handwritten digits (1 797 images of 8×8 pixels, 10 classes).

    Works offline (the data ships with scikit-learn). Pixel values 0–16 are divided by 16, so
    features lie in [0, 1]. The split is :meth:`InMemoryData.split` with ``seed``: the same seed
    gives the same split on every machine.

    Parameters
    ----------
    seed : int
        Seed of the train/test split.
    test_fraction : float
        Fraction of samples in the test part (``ceil(test_fraction * 1797)`` samples).
    device, dtype
        Where the tensors live and the floating type of the inputs.
    flat : bool
        Inputs as ``(N, 64)`` vectors if ``True``, else as ``(N, 1, 8, 8)`` images.
    stratify : bool
        Keep the class proportions in both parts.

    Returns
    -------
    (train, test) : tuple of InMemoryData
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError('load_digits reads the digits data set that ships with scikit-learn, which is not '
                          'installed: pip install "gradiv_lib[book]" (or scikit-learn)') from error

    bunch = sklearn_load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64) / 16.0
    if not flat:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    data = InMemoryData(x.to(dtype), y, {"classes": [str(c) for c in range(10)]})
    train, test = data.split(test_fraction, seed=seed, stratify=stratify)
    return train.to(device), test.to(device)


