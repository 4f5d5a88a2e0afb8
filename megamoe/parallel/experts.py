"""Expert parallelism in one place: which experts a rank holds, how tokens reach them, how DeepSpeed reduces their
gradients, and the expert-shard files of a checkpoint.

Layout: the E experts of a layer are cut into EP equal, contiguous blocks; expert-parallel rank r holds experts
[r * e, (r + 1) * e), e = E / EP. With EP = 1 every rank holds all experts, replicated over the sequence-parallel
group (whose ranks see different tokens: their gradients are summed in autograd).

Shard files (in a checkpoint's tag directory): `experts_ep<r>.pt`, `experts_ep<r>_pp<s>.pt` per pipeline stage s
under pipeline parallelism, written by the first expert-data-parallel replica of each EP rank:
{module's global name: {"first_expert": int, "tensors": {parameter name: tensor [e, ...]}}}. Any EP/PP layout
reads shards written by any other.

Modules holding experts are found by the caller: anything with `first_expert`, `num_local` and its expert
parameters directly on it ([num_local, ...] each) will do; this module does not know megamoe.moe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megamoe.parallel.groups import ParallelGroups

SHARD_GLOB = "experts_ep*.pt"
"""Every expert-shard file of a tag directory, whatever EP and PP sizes wrote them."""


@dataclass(frozen=True)
class ExpertPlacement:
    """Where the `num_experts` experts of a layer live for this rank's `groups`."""

    num_experts: int
    groups: ParallelGroups

    @property
    def num_local(self) -> int:
        """Experts this rank holds."""
        return self.num_experts // self.groups.ep_size

    @property
    def first_expert(self) -> int:
        """Global id of this rank's first expert."""
        return self.groups.ep_rank * self.num_local

    @property
    def local_experts(self) -> range:
        """Global ids of this rank's experts."""
        return range(self.first_expert, self.first_expert + self.num_local)

    def owns(self, expert_id: int) -> bool:
        return expert_id in self.local_experts

    def owner(self, expert_N: torch.Tensor) -> torch.Tensor:
        """The expert-parallel rank holding each expert id."""
        return expert_N // self.num_local

    def experts_of(self, ep_rank: int) -> slice:
        """Global ids of expert-parallel rank `ep_rank`'s experts, as a slice over an [E] sequence."""
        return slice(ep_rank * self.num_local, (ep_rank + 1) * self.num_local)

    @property
    def replica_group(self) -> dist.ProcessGroup | None:
        """Ranks holding copies of the same experts that see different tokens (their expert gradients are summed
        in autograd): the sequence-parallel group without expert parallelism, else none."""
        return self.groups.sp_group if self.groups.ep_size == 1 else None

    @property
    def all_to_all(self) -> bool:
        """Whether routed tokens travel to their experts' ranks by all-to-all over the expert-parallel group
        (else every expert is local)."""
        return self.groups.ep_group is not None


# DeepSpeed ------------------------------------------------------------------------------------------------------


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert(-data)-parallel groups of size `ep_size` (parameters carry it)."""
    return f"ep_size_{ep_size}"


def mark_expert_parameters(params: list[torch.nn.Parameter], groups: ParallelGroups) -> int:
    """Tag expert parameters for DeepSpeed (EP > 1); returns the number tagged.

    Tagged parameters (`allreduce=False`, `group_name`) are reduced over the expert-data-parallel group only;
    everything else over the whole data-parallel group. Where tensor-parallel peers hold different experts
    (EP folded over TP), experts are also marked model-parallel so the global norm counts each once.
    Collective over the tensor-parallel group when TP > 1 and EP > 1.
    """
    if groups.ep_size == 1:
        return 0
    if not params:
        raise RuntimeError("expert parallelism is on but the model has no expert parameters to tag")
    tp_peers_differ = groups.tp_size > 1 and tp_peers_hold_different_experts(groups)
    for param in params:
        param.allreduce = False
        param.group_name = expert_group_name(groups.ep_size)
        if tp_peers_differ:
            param.model_parallel = True
    return len(params)


def tp_peers_hold_different_experts(groups: ParallelGroups) -> bool:
    """Whether every tensor-parallel peer of this rank has another expert-parallel rank. Collective (TP group)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None  # NCCL
    ep_ranks = [torch.zeros((), dtype=torch.int64, device=device) for _ in range(groups.tp_size)]
    dist.all_gather(ep_ranks, torch.tensor(groups.ep_rank, device=device), group=groups.tp_group)
    return len({int(r) for r in ep_ranks}) == groups.tp_size


# Shard files ----------------------------------------------------------------------------------------------------


class ExpertShardError(ValueError):
    """The expert shards of a checkpoint are missing, or lack an expert this rank holds."""


class ExpertShapeMismatch(ExpertShardError):
    """A saved expert tensor's per-expert shape differs from the model's."""


def shard_file_name(ep_rank: int, pp_rank: int = 0, pp_size: int = 1) -> str:
    """The shard file of expert-parallel rank `ep_rank` (of pipeline stage `pp_rank` when PP > 1)."""
    stage = f"_pp{pp_rank:02d}" if pp_size > 1 else ""
    return f"experts_ep{ep_rank:03d}{stage}.pt"


def shard_files(tag_dir: Path) -> list[Path]:
    """Every expert-shard file of `tag_dir`, sorted by name."""
    return sorted(tag_dir.glob(SHARD_GLOB))


def save_shard(modules: Mapping[str, torch.nn.Module], tag_dir: Path, groups: ParallelGroups) -> Path | None:
    """Write this rank's experts (`modules` by global name) if it is the first expert-data-parallel replica of its
    EP rank; returns the file written, or None."""
    if (shard := shard_state(modules, groups)) is None:
        return None
    name, state = shard
    torch.save(state, tag_dir / name)
    return tag_dir / name


def shard_state(modules: Mapping[str, torch.nn.Module], groups: ParallelGroups,
                copy: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> tuple[str, dict] | None:
    """This rank's shard file name and content if it is the first expert-data-parallel replica of its EP rank (the
    one that writes it), else None; each tensor passed through `copy(name, tensor)` (default: a host copy)."""
    if not modules or groups.edp_rank != 0:
        return None
    copy = copy or (lambda _, tensor: tensor.detach().to("cpu", copy=True))
    shard = {name: {"first_expert": m.first_expert,
                    "tensors": {p: copy(f"{name}.{p}", t) for p, t in m.named_parameters(recurse=False)}}
             for name, m in modules.items()}
    return shard_file_name(groups.ep_rank, groups.pp_rank, groups.pp_size), shard


def shards_holding(modules: Mapping[str, torch.nn.Module], tag_dir: Path, saved_ep: int, ep_size: int,
                   stage_of: Callable[[str], tuple[int, int]]) -> list[Path]:
    """The shard files of `tag_dir` (written by `saved_ep` expert-parallel ranks) holding any expert of the modules
    (this rank's, with `ep_size` EP ranks now); `stage_of(name)`: (saved pipeline stage of the module's layer, saved
    stage count). Each EP rank holds a contiguous block of the experts (module docstring): the files follow from
    the two layouts alone."""
    files = set()
    for name, module in modules.items():
        stage, stages = stage_of(name)
        per_saved_rank = module.num_local * ep_size // saved_ep
        last_expert = module.first_expert + module.num_local - 1
        files |= {tag_dir / shard_file_name(ep_rank, stage, stages)
                  for ep_rank in range(module.first_expert // per_saved_rank, last_expert // per_saved_rank + 1)}
    return sorted(files)


@torch.no_grad()
def fill_local_experts(modules: Mapping[str, torch.nn.Module], tag_dir: Path, files: list[Path] | None = None) -> None:
    """Copy each module's experts [first_expert, first_expert + num_local) from the shards of `tag_dir` (`files`:
    those holding them, see shards_holding; default: every shard), whatever EP and PP sizes wrote them.
    ExpertShardError when there are no shards or an expert is in none of them; ExpertShapeMismatch when a saved
    expert's shape differs from the module's."""
    if not modules:
        return
    every_file = shard_files(tag_dir)
    files = [f for f in files if f.is_file()] if files is not None else every_file
    if not every_file:
        raise ExpertShardError(f"{tag_dir} holds no {SHARD_GLOB} expert shards, but this model has MoE layers: the "
                               "checkpoint is of a dense model or incomplete")
    shards = [torch.load(path, weights_only=True) for path in files]
    for name, module in modules.items():
        for pname, param in module.named_parameters(recurse=False):
            filled = torch.zeros(module.num_local, dtype=torch.bool)
            for shard in (s for s in shards if name in s):
                first, saved = shard[name]["first_expert"], shard[name]["tensors"][pname]
                if saved.shape[1:] != param.shape[1:]:
                    raise ExpertShapeMismatch(f"{tag_dir}: the experts of {name}.{pname} are "
                                              f"{list(saved.shape[1:])} in the checkpoint, {list(param.shape[1:])} "
                                              "in this model")
                mine = module.first_expert
                lo, hi = max(first, mine), min(first + len(saved), mine + module.num_local)
                if lo < hi:
                    param[lo - mine:hi - mine] = saved[lo - first:hi - first]
                    filled[lo - mine:hi - mine] = True
            if not filled.all():
                gone = module.first_expert + int((~filled).nonzero()[0])
                raise ExpertShardError(
                    f"{tag_dir}: expert {gone} of {name} is in none of the expert shards "
                    f"({', '.join(f.name for f in files)}): a shard file is missing; restore it or resume from an "
                    "earlier checkpoint")


def merge_shards(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Each expert parameter ("<module>.<parameter>") over all experts, [E, ...] in expert order, from the shards
    of `tag_dir` (written by any EP/PP size); dtypes as saved."""
    parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for path in shard_files(tag_dir):
        for module, shard in torch.load(path, weights_only=True).items():
            for pname, tensor in shard["tensors"].items():
                parts.setdefault(f"{module}.{pname}", []).append((shard["first_expert"], tensor))
    return {name: torch.cat([t for _, t in sorted(pieces, key=lambda p: p[0])]) for name, pieces in parts.items()}
