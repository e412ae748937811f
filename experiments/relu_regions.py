"""Every activation region of a ReLU ``nn.Sequential`` on R^n0, and inputs inside each one.

At a fixed θ, a ReLU MLP (Linear + ReLU, the sweep's layout) is affine on each *region*: the
set of inputs x with a given 0/1 activation pattern P (one bit per hidden unit, bit = z > 0).
Given P, every pre-activation is affine in x, z_k(x) = A_k^P x + c_k^P, so the region is the
polyhedron {x : s_j (a_j·x + c_j) ≥ 0 for every hidden unit j} (s_j = ±1 from P).

:func:`enumerate_regions` walks from region to neighbouring region: crossing the zero set of
unit j flips bit j only (the other pre-activations are continuous and nonzero there), so the
graph of full-dimensional regions under single-bit flips is connected and a breadth-first
walk that tests every flip of every region found reaches all of them. Each test is one
linear program (scipy's HiGHS): the Chebyshev centre of the polyhedron, maximise t subject
to s_j (â_j·x + ĉ_j) ≥ t (rows normalized, t ≤ 1). t* > 0: the region has interior (the
centre is the certificate, re-checked by a plain forward pass); t* ≤ 0: it has none.
Without biases the regions are cones and t* is 1 or 0 exactly.

:func:`region_inputs` gives n0 + 1 points in each region (its centre and the centre moved
along each axis halfway to the boundary): the data fields of a region are affine in x, so
these points span all of them.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.ReLU(), torch.nn.Linear(3, 1, bias=False))
    >>> regions = enumerate_regions(relu_layers(net))
    >>> len(regions.patterns), regions.certified  # 3 lines through 0 cut the plane into 6 cones
    (6, True)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linprog
from torch import nn

ZERO_ROW = 1e-12
"""A pre-activation row with norm below this (relative) is constant in x on the region."""

INTERIOR_TOL = 1e-9
"""t* above this: the region has interior (the gap to the largest rejected t* is reported)."""


def relu_layers(model: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(W_k, b_k)] of a Linear/ReLU ``nn.Sequential`` in float64 (b_k = 0 without bias)."""
    layers = []
    for m in model:
        if isinstance(m, nn.Linear):
            w = m.weight.detach().to(torch.float64).numpy()
            b = np.zeros(w.shape[0]) if m.bias is None else m.bias.detach().to(torch.float64).numpy()
            layers.append((w.copy(), b.copy()))
        elif not isinstance(m, nn.ReLU):
            raise ValueError(f"relu_layers takes Linear and ReLU modules only, got {type(m).__name__}")
    return layers


def patterns_of(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activation bits (N × H, z > 0) and pre-activations (N × H) of inputs x (N × n0)."""
    h, bits, zs = x, [], []
    for w, b in layers[:-1]:
        z = h @ w.T + b
        zs.append(z)
        bits.append(z > 0)
        h = np.maximum(z, 0.0)
    return np.concatenate(bits, 1), np.concatenate(zs, 1)


def affine_rows(layers: list[tuple[np.ndarray, np.ndarray]], pattern: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pre-activations of every hidden unit as affine maps of x on the region of ``pattern``: A (H × n0), c (H)."""
    a, c = np.eye(layers[0][0].shape[1]), np.zeros(layers[0][0].shape[1])
    rows, offsets, start = [], [], 0
    for w, b in layers[:-1]:
        a, c = w @ a, w @ c + b
        rows.append(a)
        offsets.append(c)
        gate = pattern[start : start + w.shape[0]].astype(float)
        a, c = gate[:, None] * a, gate * c
        start += w.shape[0]
    return np.concatenate(rows), np.concatenate(offsets)


@dataclass
class Regions:
    """The full-dimensional activation regions of a ReLU MLP on R^n0 at one θ.

    Attributes:
        patterns: one bool row per region (H hidden-unit bits, layer by layer).
        centres: a Chebyshev centre of each region (n0 floats; for cones scaled to norm 1).
        radii: the inscribed radius at that centre.
        n_lp: linear programs solved.
        smallest_accepted: the smallest t* of a region accepted (normalized constraints).
        largest_rejected: the largest t* of a pattern rejected (−inf when none).
        certified: every accepted centre has exactly its pattern in a plain forward pass, and
            the walk finished (no ``max_regions`` cut).
        constant_units: hidden units with the same bit in every region (dead or always active
            on R^n0; empty while the walk is not complete).
    """

    patterns: np.ndarray
    centres: np.ndarray
    radii: np.ndarray
    n_lp: int = 0
    smallest_accepted: float = float("inf")
    largest_rejected: float = float("-inf")
    certified: bool = False
    constant_units: list[int] = field(default_factory=list)


def _chebyshev(layers, pattern: np.ndarray) -> tuple[float, np.ndarray | None]:
    """max t s.t. s_j(â_j·x + ĉ_j) ≥ t, t ≤ 1 over the non-constant units; −inf if a constant unit contradicts the pattern."""
    a, c = affine_rows(layers, pattern)
    norms = np.linalg.norm(a, axis=1)
    scale = max(1.0, float(norms.max()))
    flat = norms <= ZERO_ROW * scale
    if flat.any():
        # constant in x on the region: z ≡ c (bit c > 0; z ≡ 0 counts as off, as ReLU's z > 0 test)
        if np.any(pattern[flat] != (c[flat] > ZERO_ROW * scale)):
            return float("-inf"), None
    s = np.where(pattern, 1.0, -1.0)[~flat]
    an, cn = a[~flat] / norms[~flat, None], c[~flat] / norms[~flat]
    n0 = a.shape[1]
    # variables (x, t): minimise −t;  −s â x + t ≤ s ĉ
    a_ub = np.hstack([-s[:, None] * an, np.ones((an.shape[0], 1))])
    b_ub = s * cn
    res = linprog(
        np.r_[np.zeros(n0), -1.0], A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * n0 + [(None, 1.0)], method="highs"
    )
    if res.status != 0:
        raise RuntimeError(f"the region LP failed: {res.message}")
    return float(res.x[-1]), res.x[:-1]


class RegionWalk:
    """The breadth-first walk of :func:`enumerate_regions`, resumable: ``grow(n)`` walks on until
    n regions are found or none is left (``complete``), so that a caller can stop early.

    Args:
        layers: :func:`relu_layers` of the network.
        starts: Gaussian inputs whose regions seed the walk.
        seed: seeds those inputs.
    """

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], *, starts: int = 64, seed: int = 0):
        self.layers = layers
        n0 = layers[0][0].shape[1]
        self._cone = not any(np.any(b != 0) for _, b in layers[:-1])
        self._seen: set[bytes] = set()
        self._queue: deque[np.ndarray] = deque()
        self._patterns: list[np.ndarray] = []
        self._centres: list[np.ndarray] = []
        self._radii: list[float] = []
        self._verified = True
        self.n_lp = 0
        self.smallest_accepted, self.largest_rejected = float("inf"), float("-inf")
        start_bits, _ = patterns_of(layers, np.random.default_rng(seed).standard_normal((starts, n0)))
        for p in start_bits:
            self._visit(p)

    @property
    def complete(self) -> bool:
        """True when every region found has had all its single-bit flips tested."""
        return not self._queue

    def _visit(self, p: np.ndarray) -> None:
        key = p.tobytes()
        if key in self._seen:
            return
        self._seen.add(key)
        t, x = _chebyshev(self.layers, p)
        self.n_lp += 1
        if t <= INTERIOR_TOL:
            self.largest_rejected = max(self.largest_rejected, t)
            return
        self.smallest_accepted = min(self.smallest_accepted, t)
        r = t
        if self._cone:  # a cone: the centre direction, with its radius, at norm 1
            norm = float(np.linalg.norm(x))
            x, r = x / norm, t / norm
        bits, _ = patterns_of(self.layers, x[None])
        self._verified = self._verified and bool(np.array_equal(bits[0], p))
        self._patterns.append(p)
        self._centres.append(x)
        self._radii.append(r)
        self._queue.append(p)

    def grow(self, max_regions: int) -> Regions:
        """Walk on until ``max_regions`` regions are found or the walk is complete; the regions so far."""
        while self._queue and len(self._patterns) < max_regions:
            p = self._queue.popleft()
            for j in range(p.size):
                q = p.copy()
                q[j] = not q[j]
                self._visit(q)
        patterns = np.array(self._patterns)
        constant = [j for j in range(patterns.shape[1]) if patterns[:, j].all() or not patterns[:, j].any()]
        return Regions(
            patterns,
            np.array(self._centres),
            np.array(self._radii),
            n_lp=self.n_lp,
            smallest_accepted=self.smallest_accepted,
            largest_rejected=self.largest_rejected,
            certified=self._verified and self.complete,
            constant_units=constant if self.complete else [],
        )


def enumerate_regions(
    layers: list[tuple[np.ndarray, np.ndarray]], *, starts: int = 64, seed: int = 0, max_regions: int = 200_000
) -> Regions:
    """All full-dimensional activation regions, by a breadth-first walk over single-bit flips (module docstring).

    ``certified`` is False when ``max_regions`` cut the walk short.
    """
    return RegionWalk(layers, starts=starts, seed=seed).grow(max_regions)


def _ray_step(a: np.ndarray, c: np.ndarray, pattern: np.ndarray, x: np.ndarray, d: np.ndarray) -> float:
    """Half the distance from x along d to the region's boundary (at most half of max(1, |x|))."""
    s = np.where(pattern, 1.0, -1.0)
    slack, rate = s * (a @ x + c), s * (a @ d)
    moving = rate < -ZERO_ROW * np.linalg.norm(a, axis=1).clip(min=1.0)
    reach = float(np.min(slack[moving] / -rate[moving])) if moving.any() else np.inf
    return 0.5 * min(reach, max(1.0, float(np.linalg.norm(x))))


def region_inputs(layers: list[tuple[np.ndarray, np.ndarray]], regions: Regions) -> np.ndarray:
    """n0 + 1 inputs per region, centres first: (n0 + 1)·R × n0 (row block k: every region's k-th point).

    Block 0 holds the centres; block i the centres moved along axis i (+ or −, the longer way)
    halfway to the region's boundary (at most max(1, |centre|)/2), so inside the region and
    well apart. The fields of a region are affine in x: these points span them all.
    """
    n0 = regions.centres.shape[1]
    blocks = [regions.centres.copy()] + [np.empty_like(regions.centres) for _ in range(n0)]
    eye = np.eye(n0)
    for r, (p, x) in enumerate(zip(regions.patterns, regions.centres)):
        a, c = affine_rows(layers, p)
        for i in range(n0):
            up, down = _ray_step(a, c, p, x, eye[i]), _ray_step(a, c, p, x, -eye[i])
            blocks[i + 1][r] = x + up * eye[i] if up >= down else x - down * eye[i]
    return np.concatenate(blocks)


def pattern_outputs(widths: list[int], bias: bool, patterns: np.ndarray):
    """φ(θ): the gated-surrogate outputs of the flat θ (``nn.Sequential`` layout, biases on hidden
    layers only) at exactly these 0/1 patterns, on the inputs 0, e_1, …, e_n0 (R·(n0+1)·n_L values).

    Each region's network is affine in x, so these outputs span its data fields: the Lie count
    of φ (:func:`torch_conslaw.trace_dimension`) is the path-lifting count restricted to the
    patterns, computed without the ``nn.Module`` and without ReLU.
    """
    gates = torch.as_tensor(patterns, dtype=torch.float64)
    n0 = widths[0]
    basis = torch.cat([torch.zeros(1, n0, dtype=torch.float64), torch.eye(n0, dtype=torch.float64)])
    shapes = []
    for k in range(len(widths) - 1):
        shapes.append((widths[k + 1], widths[k]))
        if bias and k < len(widths) - 2:
            shapes.append((widths[k + 1],))
    sizes = [int(np.prod(s)) for s in shapes]

    def phi(theta: torch.Tensor) -> torch.Tensor:
        parts = iter(torch.split(theta, sizes))
        h = basis.expand(gates.shape[0], -1, -1)  # R × (n0+1) × n0
        start = 0
        for k in range(len(widths) - 1):
            w = next(parts).reshape(widths[k + 1], widths[k])
            h = torch.einsum("ij,rpj->rpi", w, h)
            if k < len(widths) - 2:
                if bias:
                    h = h + next(parts)
                h = h * gates[:, None, start : start + widths[k + 1]]
                start += widths[k + 1]
        return h.reshape(-1)

    return phi
