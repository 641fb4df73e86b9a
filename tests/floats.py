"""Float comparisons that say which rounding they tolerate.

Machines of this project's kind differ in CPU: Intel with AVX-512, AMD EPYC with or without it. torch dispatches
other SIMD kernels on each (``torch.backends.cpu.get_cpu_capability()``), MKL and oneDNN pick their own, and a
thread count splits a reduction differently. A float32 sum then adds its terms in another order and rounds
differently. The same float32 computation, on two machines or along two code paths of one machine, differs by
a few units in the last place (ulp, 2**-23 of the magnitude) for each reduction on the way, relative to the
magnitude of the numbers involved, not to each element: a logit near 0 that came from terms near 20 carries
their rounding.

``assert_float32_close`` states that budget as ``ulps`` float32 epsilons at the tensor's scale, ``max |want|``
(at least ``floor``). Each caller names the computation and why ``ulps`` covers it; as a rule, a few ulps times
the number of reductions in series. ``assert_beyond_rounding`` is the companion check: a real change (a wrong
weight, a skipped guidance round) must move the result by orders of magnitude more than that budget, so the
tolerance still catches one.

Measured budgets (this file's callers, 2026-12): the 0.1 fixture's logits differ by up to 9 ulps at their scale
between AVX-512, AVX2 and non-SIMD kernels (``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
``ONEDNN_MAX_CPU_ISA``) at one and two threads.
"""

from __future__ import annotations

import torch

#: One float32 ulp at 1.0 (2**-23).
EPS32 = torch.finfo(torch.float32).eps


def float32_atol(want, ulps: float, floor: float = 1.0) -> float:
    """``ulps`` float32 epsilons at the scale of ``want`` (its largest magnitude, at least ``floor``)."""
    want = torch.as_tensor(want)
    scale = float(want.abs().max()) if want.numel() else 0.0
    return ulps * EPS32 * max(floor, scale)


def assert_float32_close(got, want, *, ulps: float, floor: float = 1.0) -> float:
    """Every element of ``got`` within ``ulps`` float32 ulps of ``want`` at ``want``'s scale; returns that tolerance.

    Compared in float64, so the comparison itself adds no rounding."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    atol = float32_atol(want, ulps, floor)
    torch.testing.assert_close(
        got, want, rtol=0, atol=atol, msg=lambda m: f"{m}\n(budget: {ulps} float32 ulps at scale, atol {atol:.3g})"
    )
    return atol


def assert_beyond_rounding(got, want, *, ulps: float, floor: float = 1.0, factor: float = 100.0) -> float:
    """The companion check: ``got`` (from a deliberately wrong computation) misses ``want`` by more than ``factor``
    times the budget ``assert_float32_close`` allows; returns how many budgets it misses by."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    atol = float32_atol(want, ulps, floor)
    times = float((got - want).abs().max()) / atol
    assert times > factor, f"a real change moves the result by only {times:.1f}x the rounding budget"
    return times
