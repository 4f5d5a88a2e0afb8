"""ParallelGroups: the process groups a rank belongs to, passed explicitly to whatever communicates."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's groups and coordinates. A group of None means size 1 (nothing to communicate)."""

    tp_group: dist.ProcessGroup | None
    """Tensor-parallel peers (they hold shards of the same layers and see the same data)."""
    dp_group: dist.ProcessGroup | None
    """Data-parallel peers (same shard of the model, different data)."""
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int

    @classmethod
    def single_process(cls) -> ParallelGroups:
        """The layout of one process holding the whole model."""
        return cls(tp_group=None, dp_group=None, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1)
