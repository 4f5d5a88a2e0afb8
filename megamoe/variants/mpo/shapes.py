"""MPO factorisations: the shapes of a matrix's n local tensors, without torch (the planner counts with them).

Tensor k is [d_{k-1}, i_k, j_k, d_k]; bond rule d_k = min(a_1...a_k, a_{k+1}...a_n, D) with a_k = i_k j_k.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property


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
    def reconstruct_madds(self) -> int:
        """Multiply-adds of contracting the n tensors into the [rows, cols] matrix in operators.reconstruct's
        order: the left tensors, the right ones, the centre with the left product, then with the right one."""
        a, d, c, n = [i * j for i, j in zip(self.i, self.j, strict=True)], self.bonds, self.center, self.n
        madds, left = 0, a[0]
        for k in range(1, c):
            madds += left * d[k] * a[k] * d[k + 1]
            left *= a[k]
        right = a[n - 1]
        for k in range(n - 2, c, -1):
            madds += d[k] * a[k] * d[k + 1] * right
            right *= a[k]
        if c > 0:
            madds += left * d[c] * a[c] * d[c + 1]
        if c < n - 1:
            madds += (left if c > 0 else 1) * a[c] * d[c + 1] * right
        return madds

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
