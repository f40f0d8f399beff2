"""Scalar fits shared by the block quantizers, compiled with numba.

The searches are the ones llama.cpp's k-quants use (ggml-quants.c: an affine fit of a sub-block
to integer levels with a sweep over candidate scales, and a scale-only fit with a least-squares
refinement). They run per sub-block of 16 or 32 values, so they are written as scalar loops and
compiled: one call quantizes many rows without returning to Python, and releases the GIL so that
rows can be split across threads.
"""

from __future__ import annotations

import math

import numba
import numpy as np

# Below this a group counts as all zeros.
GROUP_MAX_EPS = 1e-15

jit = numba.njit(cache=True, nogil=True, fastmath=False, error_model="numpy")


@jit
def round_half(x: float) -> float:
    """x rounded to the nearest fp16 value (ties to even), as a float: what storing it as fp16 keeps."""
    ax = abs(x)
    if ax == 0.0 or not math.isfinite(x):
        return x
    if ax < 6.103515625e-05:  # fp16 subnormals: a fixed step of 2**-24
        return np.rint(x * 16777216.0) / 16777216.0
    mantissa, exponent = math.frexp(x)
    return math.ldexp(np.rint(mantissa * 2048.0), exponent - 11)


@jit
def fit_affine(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    levels: np.ndarray,
    trial: np.ndarray,
) -> tuple[float, float]:
    """Levels 0..nmax, scale and offset so that scale * level - offset approximates x, weighted by w.

    Starts from the min-max fit, then tries nstep + 1 stretched level counts (nmax + rmin +
    rdelta * k spanning max - min) and keeps the least weighted error (absolute with use_mad,
    else squared), solving scale and offset by weighted least squares for each. The offset is
    never negative (a group of positive values is fitted from zero). Returns (scale, offset).
    """
    n = x.shape[0]
    lo = x[0]
    hi = x[0]
    sum_w = 0.0
    sum_x = 0.0
    for i in range(n):
        lo = min(lo, x[i])
        hi = max(hi, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = min(lo, 0.0)
    if hi <= lo:
        levels[:n] = 0
        return 0.0, -lo
    inverse = nmax / (hi - lo)
    scale = 1.0 / inverse
    best = 0.0
    for i in range(n):
        level = min(nmax, max(0, int(np.rint(inverse * (x[i] - lo)))))
        levels[i] = level
        diff = scale * level + lo - x[i]
        best += w[i] * (abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        inverse = (rmin + rdelta * step + nmax) / (hi - lo)
        sum_l = 0.0
        sum_l2 = 0.0
        sum_xl = 0.0
        for i in range(n):
            level = min(nmax, max(0, int(np.rint(inverse * (x[i] - lo)))))
            trial[i] = level
            sum_l += w[i] * level
            sum_l2 += w[i] * level * level
            sum_xl += w[i] * level * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det <= 0:
            continue
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_lo = (sum_l2 * sum_x - sum_l * sum_xl) / det
        if this_lo > 0:
            this_lo = 0.0
            this_scale = sum_xl / sum_l2
        error = 0.0
        for i in range(n):
            diff = this_scale * trial[i] + this_lo - x[i]
            error += w[i] * (abs(diff) if use_mad else diff * diff)
        if error < best:
            levels[:n] = trial[:n]
            best = error
            scale = this_scale
            lo = this_lo
    return scale, -lo


@jit
def fit_scale(x: np.ndarray, nmax: int, w: np.ndarray, levels: np.ndarray) -> float:
    """Levels 0..nmax and one scale for x (sub-block scales, or magnitudes; negatives map to 0), weighted.

    Tries nine scales around max / nmax, then moves single levels while that raises the
    least-squares gain (sum w x l)^2 / sum w l^2. Returns the least-squares scale.
    """
    n = x.shape[0]
    hi = 0.0
    for i in range(n):
        hi = max(hi, x[i])
    if hi < GROUP_MAX_EPS:
        levels[:n] = 0
        return 0.0
    inverse = nmax / hi
    scale = 1.0 / inverse
    best = 0.0
    for i in range(n):
        diff = x[i] - scale * max(0.0, np.rint(inverse * x[i]))
        best += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        trial_inverse = (0.1 * step + nmax) / hi
        trial_scale = 1.0 / trial_inverse
        error = 0.0
        for i in range(n):
            level = min(nmax, max(0, int(np.rint(trial_inverse * x[i]))))
            diff = x[i] - trial_scale * level
            error += w[i] * diff * diff
        if error < best:
            best = error
            inverse = trial_inverse
    sum_lx = 0.0
    sum_l2 = 0.0
    for i in range(n):
        level = min(nmax, max(0, int(np.rint(inverse * x[i]))))
        levels[i] = level
        sum_lx += w[i] * x[i] * level
        sum_l2 += w[i] * level * level
    for _ in range(5):
        changed = 0
        for i in range(n):
            lx = sum_lx - w[i] * x[i] * levels[i]
            l2 = sum_l2 - w[i] * levels[i] * levels[i]
            if lx > 0 and l2 > 0:
                level = min(nmax, max(0, int(np.rint(x[i] * l2 / lx))))
                if level != levels[i]:
                    lx += w[i] * x[i] * level
                    l2 += w[i] * level * level
                    if lx * lx * sum_l2 > sum_lx * sum_lx * l2:
                        levels[i] = level
                        sum_lx = lx
                        sum_l2 = l2
                        changed += 1
        if changed == 0:
            break
    return sum_lx / sum_l2 if sum_l2 > 0 else 0.0
