"""Statistical checks for randomized gradient estimators (shared by the estimator tests)."""
from __future__ import annotations

import math

import torch
from scipy.stats import chi2

# False-alarm probability of one unbiasedness check on fresh random inputs.
FALSE_ALARM = 1e-6


def bias_statistic(samples: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Normalised squared error of the Monte-Carlo mean and its rejection threshold.

    For ``N`` i.i.d. draws ``g_m`` of an unbiased estimator of ``exact`` with covariance
    ``C``, ``E||mean - exact||^2 = tr(C) / N``. The statistic ``T = ||mean - exact||^2 N /
    tr(C_hat)`` therefore has mean ~1, and is approximately ``chi2(df) / df`` with the
    effective degrees of freedom ``df = tr(C)^2 / tr(C^2)`` (Satterthwaite). A bias ``b``
    adds ``||b||^2 N / tr(C)``, which grows with N.

    Args:
        samples: ``[N, *shape]`` draws of the estimate.
        exact: ``[*shape]`` exact value.
    Returns:
        ``(T, threshold)``; unbiasedness is rejected when ``T > threshold``.
    """
    n = samples.shape[0]
    flat = samples.reshape(n, -1).double()
    centered = flat - flat.mean(0)
    gram = centered @ centered.t() / (n - 1)  # same non-zero spectrum as C_hat
    trace, trace_sq = gram.trace().item(), (gram * gram).sum().item()
    df = trace**2 / trace_sq
    t = ((flat.mean(0) - exact.reshape(-1).double()).pow(2).sum().item()) * n / trace
    # 1.15: slack for estimating tr(C) and df from the same N draws.
    return t, 1.15 * chi2.ppf(1 - FALSE_ALARM, df) / df


def total_variance(samples: torch.Tensor) -> float:
    """``tr(C_hat)``: the summed per-entry variance of ``[N, *shape]`` draws."""
    flat = samples.reshape(samples.shape[0], -1).double()
    return flat.var(0).sum().item()


def assert_sum_to_rounding(got: torch.Tensor, terms: torch.Tensor, dims) -> None:
    """``got`` is ``terms`` summed over ``dims`` up to float rounding: within the error bound of
    pairwise summation in ``terms``' dtype, ``ceil(log2 n) * u * sum |terms|`` (Higham, "Accuracy and
    Stability of Numerical Algorithms", 2002, section 4.2), taken with ``eps = 2u`` for torch's cascade
    sum, plus the rounding of the result to ``got``'s dtype; the exact sum is taken in float64."""
    n = terms.numel() // got.numel()
    exact = terms.double().sum(dims)
    bound = (math.ceil(math.log2(max(n, 2))) * torch.finfo(terms.dtype).eps * terms.double().abs().sum(dims)
             + torch.finfo(got.dtype).eps * exact.abs())
    error = (got.double() - exact).abs()
    assert (error <= bound).all(), f"sum off by {(error / bound).max():.2f}x its rounding bound"
