"""The one parity metric: how far an artifact's outputs are from the source's.

Every check that compares two models' outputs — ``validate`` (per output and per layer),
``finalize``'s self-check, the pipelines' read-back checks and the converters' own
verification — goes through :func:`compare` / :func:`compare_outputs`, so they cannot disagree
about what "equal" means.

Finite values are compared by their absolute difference, measured against the output's scale
(its largest finite ``|reference|``). Non-finite values must match position by position: NaN
where the reference is NaN, ``+inf`` where it is ``+inf``, ``-inf`` where it is ``-inf``.
Anything else (an infinity of the other sign, NaN for a finite value, a finite value for NaN)
is a *mismatch*, and a single one makes the relative error infinite: it is never averaged
away, and positions where the reference is non-finite are never skipped.

This module imports nothing from the rest of the project (converters use it too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Parity", "compare", "compare_outputs", "relative_error"]


def relative_error(max_abs: float, scale: float, min_scale: float = 0.0) -> float:
    """``max_abs / max(scale, min_scale)``; with a zero scale an output is matched only exactly.

    ``min_scale`` is a caller's floor for outputs that are (nearly) zero everywhere, where
    fp32 rounding alone would make the ratio large.
    """
    if math.isnan(max_abs):
        return math.inf
    scale = max(scale, min_scale)
    if scale > 0:
        return max_abs / scale
    return 0.0 if max_abs == 0 else math.inf


@dataclass(frozen=True)
class Parity:
    """Agreement of an actual output with its reference."""

    max_abs: float = 0.0  # largest |reference - actual| over positions where both are finite
    scale: float = 0.0  # largest finite |reference|
    cosine: float = 1.0  # lowest cosine similarity (per row with rows=True) over finite positions
    mismatches: int = 0  # positions whose non-finite values differ (NaN<->NaN, same-sign inf)
    first_mismatch: str | None = None  # "index (0, 3): reference +inf, actual -inf"
    shape: str | None = None  # why the outputs cannot be compared at all (shape or count)
    rel: float = 0.0  # max_abs / scale (worst over outputs); inf on a mismatch or a shape problem

    @property
    def comparable(self) -> bool:
        return self.shape is None

    @property
    def error(self) -> float:
        """The max abs error, infinite when non-finite values or shapes disagree."""
        return self.max_abs if self.shape is None and not self.mismatches else math.inf

    def within(self, rel_tolerance: float, abs_tolerance: float | None = None) -> bool:
        """True when shapes and non-finite values agree and the errors are within tolerance."""
        if self.shape is not None or self.mismatches:
            return False
        if abs_tolerance is not None and not self.max_abs <= abs_tolerance:
            return False
        return self.rel <= rel_tolerance

    def mismatch_text(self, reference: str = "reference", actual: str = "actual") -> str | None:
        """One line naming the non-finite mismatch, e.g. ``2 position(s) whose non-finite values
        differ (first at index (0, 3): source +inf, artifact -inf)``; None without one."""
        if not self.mismatches:
            return None
        first = (self.first_mismatch or "").replace("reference", reference).replace("actual", actual)
        return (f"{self.mismatches} position(s) whose non-finite values differ"
                + (f" (first at {first})" if first else ""))

    def describe(self, reference: str = "reference", actual: str = "actual") -> str:
        """One line: the shape problem, the non-finite mismatch, or the error figures."""
        if self.shape is not None:
            return self.shape.replace("reference", reference).replace("actual", actual)
        text = self.mismatch_text(reference, actual)
        if text is not None:
            return text
        return f"max abs error {self.max_abs:.3g} = {self.rel:.3g} of the output scale {self.scale:.3g}"


def _as_float64(x: Any) -> np.ndarray:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_complex():
            raise TypeError("parity: complex outputs are not supported")
        return x.to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64, copy=False)


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:.6g}"


def _row_cosines(r: np.ndarray, g: np.ndarray) -> np.ndarray:
    dots = np.einsum("ij,ij->i", r, g)
    nr = np.linalg.norm(r, axis=1)
    ng = np.linalg.norm(g, axis=1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cos = dots / (nr * ng)
    cos = np.where((nr == 0) & (ng == 0), 1.0, np.where((nr == 0) | (ng == 0), 0.0, cos))
    # norms that overflow float64 (huge finite values): fall back to scaled vectors
    bad = ~np.isfinite(cos)
    if bad.any():
        for i in np.nonzero(bad)[0]:
            a = r[i] / max(float(np.abs(r[i]).max()), 1e-300)
            b = g[i] / max(float(np.abs(g[i]).max()), 1e-300)
            na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
            cos[i] = float(np.dot(a, b) / (na * nb)) if na and nb else 0.0
    return np.clip(cos, -1.0, 1.0)


def compare(reference: Any, actual: Any, *, rows: bool = False, min_scale: float = 0.0) -> Parity:
    """Compare one output (numpy array or torch tensor) with its reference.

    ``rows=True`` takes the cosine per row of the first axis (one sample each) and keeps the
    lowest; otherwise over the whole tensor. ``min_scale``: see :func:`relative_error`.
    """
    r = _as_float64(reference)
    g = _as_float64(actual)
    if r.shape != g.shape:
        return Parity(max_abs=math.inf, scale=0.0, cosine=0.0, rel=math.inf,
                      shape=f"actual shape {tuple(g.shape)} differs from the reference's {tuple(r.shape)}")
    if r.size == 0:
        return Parity()
    fr, fg = np.isfinite(r), np.isfinite(g)
    both = fr & fg
    same = (np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g))
    mismatch = ~both & ~same
    n_bad = int(mismatch.sum())
    first = None
    if n_bad:
        flat = int(np.flatnonzero(mismatch)[0])
        idx = tuple(int(i) for i in np.unravel_index(flat, r.shape))
        first = f"index {idx}: reference {_fmt(float(r.flat[flat]))}, actual {_fmt(float(g.flat[flat]))}"
    r0 = np.where(both, r, 0.0)
    g0 = np.where(both, g, 0.0)
    with np.errstate(over="ignore"):
        max_abs = float(np.abs(r0 - g0).max())
    scale = float(np.abs(np.where(fr, r, 0.0)).max())
    if rows and r.ndim >= 2:
        r2, g2 = r0.reshape(r.shape[0], -1), g0.reshape(g.shape[0], -1)
    else:
        r2, g2 = r0.reshape(1, -1), g0.reshape(1, -1)
    cosine = float(_row_cosines(r2, g2).min()) if r2.shape[0] else 1.0
    rel = math.inf if n_bad else relative_error(max_abs, scale, min_scale)
    return Parity(max_abs=max_abs, scale=scale, cosine=cosine, mismatches=n_bad,
                  first_mismatch=first, rel=rel)


def compare_outputs(references: Sequence[Any], actuals: Sequence[Any], *,
                    min_scale: float = 0.0) -> Parity:
    """Compare every output of a model with its reference: the worst figures over outputs
    (the relative error is each output's own, so outputs of any magnitude count alike)."""
    references, actuals = list(references), list(actuals)
    if len(references) != len(actuals):
        return Parity(max_abs=math.inf, cosine=0.0, rel=math.inf,
                      shape=f"actual has {len(actuals)} output(s), the reference has {len(references)}")
    worst = Parity()
    for i, (ref, got) in enumerate(zip(references, actuals, strict=True)):
        p = compare(ref, got, min_scale=min_scale)
        shape = worst.shape
        if shape is None and p.shape is not None:
            shape = p.shape if len(references) == 1 else f"output {i}: {p.shape}"
        first = worst.first_mismatch
        if first is None and p.first_mismatch is not None:
            first = p.first_mismatch if len(references) == 1 else f"output {i} {p.first_mismatch}"
        worst = Parity(max_abs=max(worst.max_abs, p.max_abs), scale=max(worst.scale, p.scale),
                       cosine=min(worst.cosine, p.cosine), mismatches=worst.mismatches + p.mismatches,
                       first_mismatch=first, shape=shape, rel=max(worst.rel, p.rel))
    return worst
