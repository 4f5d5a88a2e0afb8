"""Matrix product operators (MPO): a matrix W [I, J] as a chain of n local tensors (docs/variants.md §6.2).

With I = i_1 ... i_n and J = j_1 ... j_n, tensor k is T_k [d_{k-1}, i_k, j_k, d_k] (d_0 = d_n = 1) and
    W[(i_1..i_n), (j_1..j_n)] = sum over bonds of T_1[1, i_1, j_1, d_1] T_2[d_1, i_2, j_2, d_2] ... T_n[.., 1].
Bond rule: d_k = min(a_1...a_k, a_{k+1}...a_n, D) with a_k = i_k j_k; without a truncation D the MPO is exact.
The gauge is mixed-canonical around the central tensor c = (n-1)/2: tensors left of it are left-orthonormal,
right of it right-orthonormal, and the central tensor carries the singular values ("core information").

Shapes: e a leading batch of experts (any number of leading dims), P/Q products of left/right modes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from megamoe.variants.mpo.shapes import MPOShape, auto_shape, factorize  # noqa: F401 (part of this module's API)


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
