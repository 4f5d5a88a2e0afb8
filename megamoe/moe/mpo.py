"""Matrix product operators (MPO): a matrix W [I, J] as a chain of n local tensors (variants.md §6.2).

With I = i_1 ... i_n and J = j_1 ... j_n, tensor k is T_k [d_{k-1}, i_k, j_k, d_k] (d_0 = d_n = 1) and
    W[(i_1..i_n), (j_1..j_n)] = sum over bonds of T_1[1, i_1, j_1, d_1] T_2[d_1, i_2, j_2, d_2] ... T_n[.., 1].
Bond rule: d_k = min(a_1...a_k, a_{k+1}...a_n, D) with a_k = i_k j_k; without a truncation D the MPO is exact.
The gauge is mixed-canonical around the central tensor c = (n-1)/2: tensors left of it are left-orthonormal,
right of it right-orthonormal, and the central tensor carries the singular values ("core information").

Shapes: e a leading batch of experts (any number of leading dims), P/Q products of left/right modes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class MPOShape:
    """The factorisation of one matrix: out dims i and in dims j (equal length n, odd), truncation D."""

    i: tuple[int, ...]
    j: tuple[int, ...]
    max_bond: int | None = None

    def __post_init__(self) -> None:
        if len(self.i) != len(self.j) or len(self.i) < 3 or len(self.i) % 2 == 0:
            raise ValueError(f"MPO factorisation {self.i} x {self.j}: i and j need the same odd length >= 3")
        if min(self.i + self.j) < 1:
            raise ValueError(f"MPO factorisation {self.i} x {self.j}: factors must be >= 1")

    @property
    def n(self) -> int:
        return len(self.i)

    @property
    def center(self) -> int:
        """0-based index of the central tensor."""
        return (self.n - 1) // 2

    @property
    def rows(self) -> int:
        return math.prod(self.i)

    @property
    def cols(self) -> int:
        return math.prod(self.j)

    @cached_property
    def bonds(self) -> tuple[int, ...]:
        """d_0 ... d_n by the bond rule."""
        modes = [a * b for a, b in zip(self.i, self.j, strict=True)]
        out = [1]
        for k in range(1, self.n):
            bond = min(math.prod(modes[:k]), math.prod(modes[k:]))
            out.append(bond if self.max_bond is None else min(bond, self.max_bond))
        return tuple(out + [1])

    def tensor_shape(self, k: int) -> tuple[int, int, int, int]:
        return self.bonds[k], self.i[k], self.j[k], self.bonds[k + 1]

    def sizes(self) -> list[int]:
        """Elements of each local tensor."""
        return [math.prod(self.tensor_shape(k)) for k in range(self.n)]

    @property
    def central_size(self) -> int:
        return self.sizes()[self.center]

    @property
    def auxiliary_size(self) -> int:
        """Elements of the non-central tensors (one expert's own parameters)."""
        return sum(self.sizes()) - self.central_size


def factorize(size: int, parts: int) -> list[int]:
    """`size` as `parts` factors as equal as its primes allow, in descending order."""
    factors = [1] * parts
    for prime in sorted(_prime_factors(size), reverse=True):
        factors[factors.index(min(factors))] *= prime
    return sorted(factors, reverse=True)


def _prime_factors(size: int) -> list[int]:
    primes, p = [], 2
    while p * p <= size:
        while size % p == 0:
            primes.append(p)
            size //= p
        p += 1
    return primes + ([size] if size > 1 else [])


def auto_shape(rows: int, cols: int, n: int, max_bond: int | None = None) -> MPOShape:
    """The derived factorisation of a [rows, cols] matrix (config may give its own): near-equal factors, the
    largest of each in the middle, the others placed to minimise the auxiliary (per-expert) size."""
    i_factors, j_factors = factorize(rows, n), factorize(cols, n)
    center = (n - 1) // 2

    def place(middle: int, outer: tuple[int, ...]) -> tuple[int, ...]:
        return (*outer[:center], middle, *outer[center:])

    if math.factorial(n - 1) > 24:  # beyond n = 5 the search grows too fast: alternate outwards instead
        order = [center] + [p for d in range(1, center + 1) for p in (center + d, center - d)]
        i, j = [0] * n, [0] * n
        for position, a, b in zip(order, i_factors, j_factors, strict=True):
            i[position], j[position] = a, b
        return MPOShape(i=tuple(i), j=tuple(j), max_bond=max_bond)
    candidates = (MPOShape(i=place(i_factors[0], i_outer), j=place(j_factors[0], j_outer), max_bond=max_bond)
                  for i_outer in set(itertools.permutations(i_factors[1:]))
                  for j_outer in set(itertools.permutations(j_factors[1:])))
    return min(candidates, key=lambda shape: (shape.auxiliary_size, shape.i, shape.j))


def decompose(w_IJ: Tensor, shape: MPOShape) -> list[Tensor]:
    """The n local tensors of W (computed in float64, returned in W's dtype); exact unless shape truncates.

    Left-to-right SVD sweep (TT-SVD) keeping d_k triplets, then a right-to-left QR sweep that moves the
    norm onto the central tensor (mixed-canonical gauge).
    """
    if tuple(w_IJ.shape) != (shape.rows, shape.cols):
        raise ValueError(f"matrix {tuple(w_IJ.shape)} does not match the MPO factorisation "
                         f"{shape.i} x {shape.j} ({shape.rows} x {shape.cols})")
    n = shape.n
    w = w_IJ.detach().to(torch.float64).reshape(*shape.i, *shape.j)
    w = w.permute([p for k in range(n) for p in (k, n + k)])  # (i_1, j_1, ..., i_n, j_n)
    tensors, rest = [], w.reshape(1, -1)
    for k in range(n - 1):
        d_in, a_k, d_out = shape.bonds[k], shape.i[k] * shape.j[k], shape.bonds[k + 1]
        u, s, vh = torch.linalg.svd(rest.reshape(d_in * a_k, -1), full_matrices=False)
        u, s, vh = _pad_rank(u, s, vh, d_out)
        tensors.append(u.reshape(shape.tensor_shape(k)))
        rest = s[:, None] * vh
    tensors.append(rest.reshape(shape.tensor_shape(n - 1)))
    for k in range(n - 1, shape.center, -1):  # right-orthonormalise k, push its R factor left
        d_in = shape.bonds[k]
        q, r = torch.linalg.qr(tensors[k].reshape(d_in, -1).T)
        tensors[k] = q.T.reshape(shape.tensor_shape(k))
        tensors[k - 1] = torch.einsum("aijb,cb->aijc", tensors[k - 1], r)
    return [t.to(w_IJ.dtype) for t in tensors]


def _pad_rank(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first `rank` triplets; zero-padded where the matrix has fewer (bonds keep their rule sizes)."""
    have = s.shape[0]
    if have >= rank:
        return u[:, :rank], s[:rank], vh[:rank]
    pad = rank - have
    return (torch.cat([u, u.new_zeros(u.shape[0], pad)], 1), torch.cat([s, s.new_zeros(pad)]),
            torch.cat([vh, vh.new_zeros(pad, vh.shape[1])], 0))


def reconstruct(tensors: list[Tensor], shape: MPOShape) -> Tensor:
    """W [..., I, J] from local tensors [..., d, i, j, d'] (leading dims broadcast: experts' auxiliary
    tensors [e, ...] with one shared central [d, i, j, d']).

    Contracts the left tensors, then the right ones, then both with the centre: the centre, the largest
    tensor, is touched twice (≈ |W| (d_c + d_{c+1}) multiply-adds per matrix).
    """
    c, n = shape.center, shape.n
    left_PD = _merge_left(tensors[:c])  # [..., P, d_c]
    right_DQ = _merge_right(tensors[c + 1:])  # [..., d_{c+1}, Q]
    core = tensors[c]
    lead = core.shape[:-4]
    core_DX = core.reshape(*lead, core.shape[-4], -1)  # [..., d_c, i_c j_c d_{c+1}]
    mid = (left_PD @ core_DX) if left_PD is not None else core_DX
    mid = mid.reshape(*mid.shape[:-2], -1, core.shape[-1])  # [..., P i_c j_c, d_{c+1}]
    full = (mid @ right_DQ) if right_DQ is not None else mid
    batch = full.shape[:-2]
    interleaved = [x for k in range(n) for x in (shape.i[k], shape.j[k])]
    w = full.reshape(*batch, *interleaved)
    b = len(batch)
    w = w.permute(*range(b), *(b + 2 * k for k in range(n)), *(b + 2 * k + 1 for k in range(n)))
    return w.reshape(*batch, shape.rows, shape.cols)


def _merge_left(tensors: list[Tensor]) -> Tensor | None:
    """T_1 ... T_k contracted over their bonds: [..., P, d_k] with P = (i_1 j_1 ... i_k j_k)."""
    if not tensors:
        return None
    acc = tensors[0].reshape(*tensors[0].shape[:-4], -1, tensors[0].shape[-1])  # d_0 = 1
    for t in tensors[1:]:
        acc = acc @ t.reshape(*t.shape[:-4], t.shape[-4], -1)
        acc = acc.reshape(*acc.shape[:-2], -1, t.shape[-1])
    return acc


def _merge_right(tensors: list[Tensor]) -> Tensor | None:
    """T_k ... T_n contracted over their bonds: [..., d_{k-1}, Q] with Q = (i_k j_k ... i_n j_n)."""
    if not tensors:
        return None
    last = tensors[-1]
    acc = last.reshape(*last.shape[:-4], last.shape[-4], -1)  # d_n = 1
    for t in reversed(tensors[:-1]):
        acc = t.reshape(*t.shape[:-4], -1, t.shape[-1]) @ acc  # [..., d i j, Q]
        acc = acc.reshape(*acc.shape[:-2], t.shape[-4], -1)
    return acc


def apply_chain(x_RJ: Tensor, tensors: list[Tensor], shape: MPOShape) -> Tensor:
    """x W^T [R, I] contracted through the chain without forming W (one expert's tensors, no batch dims).

    Absorbs the in-modes j_n ... j_1 from the right end while emitting the out-modes i_n ... i_1: the
    alternative to `reconstruct` + GEMM, cheaper only for strongly truncated MPOs (tools/bench_mpo.py).
    """
    n, rows = shape.n, x_RJ.shape[0]
    # state [R, j_1..j_k, d_k, i_{k+1}..i_n] with k = n at the start (d_n = 1)
    state = x_RJ.reshape(rows, shape.cols, 1, 1)  # [R, J, d_n = 1, I-so-far = 1] (explicit sizes: R may be 0)
    for k in range(n - 1, -1, -1):
        t = tensors[k]  # [d_{k-1}, i_k, j_k, d_k]
        j_left = math.prod(shape.j[:k])
        i_right = math.prod(shape.i[k + 1:])
        s = state.reshape(rows, j_left, shape.j[k], shape.bonds[k + 1], i_right)  # [R, J<, j_k, d_k, I>]
        s = torch.einsum("rajdo,bijd->rabio", s, t)  # [R, J<, d_{k-1}, i_k, I>]
        state = s.reshape(rows, j_left, shape.bonds[k], shape.i[k] * i_right)
    return state.reshape(rows, shape.rows)
