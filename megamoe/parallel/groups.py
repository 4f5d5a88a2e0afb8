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
    """Data-parallel peers of dense parameters (same shard of the model, different data; includes EP)."""
    ep_group: dist.ProcessGroup | None
    """Expert-parallel peers: together they hold all experts of a layer and exchange tokens."""
    edp_group: dist.ProcessGroup | None
    """Expert-data-parallel peers: they hold the same experts."""
    tp_dp_group: dist.ProcessGroup | None
    """Every rank of this pipeline stage: the ranks that see different tokens (MoE statistics)."""
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    ep_rank: int
    ep_size: int
    edp_rank: int
    sequence_parallel: bool
    pp_group: dist.ProcessGroup | None = None
    """This rank's pipeline: one rank per stage, holding the same TP/DP coordinates."""
    pp_rank: int = 0
    pp_size: int = 1
    pp_prev: int | None = None
    """Global rank of the previous stage's peer (None on the first stage)."""
    pp_next: int | None = None
    """Global rank of the next stage's peer (None on the last stage)."""

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def sp_group(self) -> dist.ProcessGroup | None:
        """Where replicated parameters of the MoE layer see different tokens (sequence parallelism)."""
        return self.tp_group if self.sequence_parallel and self.tp_size > 1 else None

    @classmethod
    def single_process(cls) -> ParallelGroups:
        """The layout of one process holding the whole model."""
        return cls(tp_group=None, dp_group=None, ep_group=None, edp_group=None, tp_dp_group=None, tp_rank=0,
                   tp_size=1, dp_rank=0, dp_size=1, ep_rank=0, ep_size=1, edp_rank=0,
                   sequence_parallel=False)
