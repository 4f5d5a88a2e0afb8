"""train/reshard.py's coordinates: every rank's tensor-parallel shard (megatron's partition stride included) and
every expert block lands where the full tensor holds it, and a ZeRO range of a flattened tensor is covered exactly
by its rectangles."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megamoe.models.sharding import shard_tp
from megamoe.parallel.groups import ParallelGroups
from megamoe.train.reshard import flat_rectangles, geometry, pieces_of


def _groups(tp_rank: int = 0, tp_size: int = 1, ep_rank: int = 0, ep_size: int = 1) -> ParallelGroups:
    return dataclasses.replace(ParallelGroups.single_process(), tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank,
                               ep_size=ep_size)


def _assemble(shards: list[tuple[torch.Tensor, object]]) -> torch.Tensor:
    """The global 2-D tensor from every rank's pieces (each element written exactly once)."""
    size = shards[0][1].size
    full, written = torch.zeros(size), torch.zeros(size, dtype=torch.int)
    for local, geo in shards:
        for piece in pieces_of("t", geo, local.reshape(geo.local)):
            (r, c), (h, w) = piece.offsets, piece.tensor.shape
            full[r:r + h, c:c + w] = piece.tensor
            written[r:r + h, c:c + w] += 1
    assert (written == 1).all()
    return full


@pytest.mark.parametrize("dim, stride, shape", [(0, 1, (8, 6)), (0, 2, (8, 6)), (1, 1, (6, 8)), (1, 2, (4, 8)),
                                                 (1, 2, (2, 8, 3))])
def test_tensor_parallel_shards_land_where_the_full_tensor_holds_them(dim, stride, shape):
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    param = torch.nn.Parameter(torch.empty(0))
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, stride
    shards = []
    for rank in range(2):
        groups = _groups(tp_rank=rank, tp_size=2)
        local = shard_tp(full, param, groups)
        shards.append((local, geometry("t", _like(local, param), groups, None)))
    split = max(dim, 1)
    want = full.reshape(torch.Size(shape[:split]).numel(), -1)
    assert torch.equal(_assemble(shards), want)


def _like(local: torch.Tensor, param: torch.nn.Parameter) -> torch.nn.Parameter:
    """A parameter shaped like the shard, with the full parameter's partition attributes."""
    out = torch.nn.Parameter(torch.empty_like(local))
    out.tensor_model_parallel, out.partition_dim = param.tensor_model_parallel, param.partition_dim
    out.partition_stride = param.partition_stride
    return out


def test_expert_blocks_sit_at_their_global_ids():
    class Experts(torch.nn.Module):
        def __init__(self, first: int) -> None:
            super().__init__()
            self.first_expert, self.num_local = first, 2

    full = torch.arange(4 * 3 * 5, dtype=torch.float32).reshape(4, 3, 5)  # 4 experts of [3, 5]
    shards = [(full[r * 2:(r + 1) * 2], geometry("w", full[r * 2:(r + 1) * 2], _groups(ep_rank=r, ep_size=2),
                                                 Experts(r * 2))) for r in range(2)]
    assert torch.equal(_assemble(shards), full.reshape(4, 15))


@pytest.mark.parametrize("start, numel, cols", [(0, 12, 4), (3, 7, 4), (5, 2, 4), (4, 8, 4), (1, 1, 1), (7, 30, 5)])
def test_a_flat_range_is_covered_exactly_by_its_rectangles(start, numel, cols):
    covered = []
    for r0, r1, c0, c1 in flat_rectangles(start, numel, cols):
        assert r0 < r1 and 0 <= c0 < c1 <= cols and (r1 - r0 == 1 or (c0, c1) == (0, cols))
        covered += [r * cols + c for r in range(r0, r1) for c in range(c0, c1)]
    assert covered == list(range(start, start + numel))
