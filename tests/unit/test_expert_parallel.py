"""megamoe/parallel/experts.py in one process: the placement rule, DeepSpeed's tags, and the expert-shard files
(saved at one EP size, filled at others, merged for export)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megamoe.parallel import experts as ep
from megamoe.parallel.groups import ParallelGroups

E = 8


def groups_at(ep_rank: int = 0, ep_size: int = 1, **kw) -> ParallelGroups:
    """A single process's groups, posing as expert-parallel rank `ep_rank` of `ep_size` (no real group)."""
    return dataclasses.replace(ParallelGroups.single_process(), ep_rank=ep_rank, ep_size=ep_size, **kw)


class FakeExperts(torch.nn.Module):
    """What the shard functions need of an expert module: first_expert, num_local, [num_local, ...] parameters."""

    def __init__(self, placement: ep.ExpertPlacement, width: int = 3) -> None:
        super().__init__()
        self.first_expert, self.num_local = placement.first_expert, placement.num_local
        self.w1 = torch.nn.Parameter(torch.zeros(self.num_local, width, 2))
        self.w2 = torch.nn.Parameter(torch.zeros(self.num_local, width))


def full_values(name: str, width: int = 3) -> dict[str, torch.Tensor]:
    """Distinct values for every expert: row e of each tensor holds e (+ an offset per module and parameter)."""
    base = 100.0 * (name == "b")
    ids = torch.arange(E, dtype=torch.float32)
    return {"w1": (base + ids)[:, None, None].expand(E, width, 2) + torch.arange(2.0) / 10,
            "w2": (base + 50 + ids)[:, None].expand(E, width).clone()}


def modules_at(ep_rank: int, ep_size: int, filled: bool) -> dict[str, FakeExperts]:
    out = {}
    for name in ("a", "b"):
        placement = ep.ExpertPlacement(E, groups_at(ep_rank, ep_size))
        module = FakeExperts(placement)
        if filled:
            with torch.no_grad():
                for pname, value in full_values(name).items():
                    getattr(module, pname).copy_(value[placement.experts_of(ep_rank)])
        out[f"decoder.layers.0.{name}"] = module
    return out


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
def test_placement_cuts_experts_into_equal_contiguous_blocks(ep_size):
    seen = []
    for rank in range(ep_size):
        placement = ep.ExpertPlacement(E, groups_at(rank, ep_size))
        assert placement.num_local == E // ep_size
        assert placement.first_expert == rank * (E // ep_size)
        assert list(placement.local_experts) == list(range(E))[placement.experts_of(rank)]
        assert [e for e in range(E) if placement.owns(e)] == list(placement.local_experts)
        seen += list(placement.local_experts)
    assert seen == list(range(E))  # every expert on exactly one rank, in rank order


def test_placement_replica_group_and_dispatch_kind():
    sp = object()  # stands for the tensor-parallel group under sequence parallelism
    alone = ep.ExpertPlacement(E, ParallelGroups.single_process())
    assert alone.replica_group is None and not alone.all_to_all
    replicated = ep.ExpertPlacement(E, groups_at(tp_group=sp, tp_size=2, sequence_parallel=True))
    assert replicated.replica_group is sp and not replicated.all_to_all
    sharded = ep.ExpertPlacement(E, groups_at(1, 2, ep_group=object(), tp_group=sp, tp_size=2,
                                              sequence_parallel=True))
    assert sharded.replica_group is None and sharded.all_to_all


def test_expert_parameters_are_tagged_for_deepspeed_only_with_expert_parallelism():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    assert ep.mark_expert_parameters(params, groups_at()) == 0
    assert not hasattr(params[0], "allreduce")
    assert ep.mark_expert_parameters(params, groups_at(1, 4)) == 3
    assert all(p.allreduce is False and p.group_name == "ep_size_4" for p in params)
    assert not any(hasattr(p, "model_parallel") for p in params)  # TP = 1: no model-parallel marking
    assert ep.expert_group_name(4) == "ep_size_4"
    with pytest.raises(RuntimeError, match="no expert parameters to tag"):
        ep.mark_expert_parameters([], groups_at(0, 2))


def test_shard_file_names():
    assert ep.shard_file_name(1) == "experts_ep001.pt"
    assert ep.shard_file_name(12, pp_rank=3, pp_size=4) == "experts_ep012_pp03.pt"
    assert ep.shard_file_name(0, pp_rank=0, pp_size=1) == "experts_ep000.pt"


def test_shards_saved_at_ep2_fill_ep1_and_ep4_and_merge(tmp_path):
    for rank in range(2):
        written = ep.save_shard(modules_at(rank, 2, filled=True), tmp_path, groups_at(rank, 2))
        assert written == tmp_path / f"experts_ep{rank:03d}.pt"
    # An expert-data-parallel replica writes nothing.
    assert ep.save_shard(modules_at(0, 2, filled=True), tmp_path, groups_at(0, 2, edp_rank=1)) is None
    assert [p.name for p in ep.shard_files(tmp_path)] == ["experts_ep000.pt", "experts_ep001.pt"]

    for ep_size in (1, 4):
        for rank in range(ep_size):
            modules = modules_at(rank, ep_size, filled=False)
            ep.fill_local_experts(modules, tmp_path)
            for name, module in modules.items():
                for pname, value in full_values(name[-1]).items():
                    want = value[module.first_expert:module.first_expert + module.num_local]
                    torch.testing.assert_close(getattr(module, pname).detach(), want, rtol=0, atol=0)

    merged = ep.merge_shards(tmp_path)
    assert sorted(merged) == [f"decoder.layers.0.{m}.{p}" for m in "ab" for p in ("w1", "w2")]
    for name in "ab":
        for pname, value in full_values(name).items():
            torch.testing.assert_close(merged[f"decoder.layers.0.{name}.{pname}"], value, rtol=0, atol=0)


def test_a_missing_shard_names_the_missing_expert(tmp_path):
    ep.save_shard(modules_at(0, 2, filled=True), tmp_path, groups_at(0, 2))
    ep.fill_local_experts(modules_at(0, 4, filled=False), tmp_path)  # experts 0-1: in the shard of rank 0
    with pytest.raises(ep.ExpertShardError, match=r"expert 4 of decoder.layers.0.a is in none of the expert shards "
                                                  r"\(experts_ep000.pt\): a shard file is missing"):
        ep.fill_local_experts(modules_at(0, 1, filled=False), tmp_path)


def test_no_shards_and_wrong_shapes_are_refused(tmp_path):
    with pytest.raises(ep.ExpertShardError, match=r"holds no experts_ep\*.pt expert shards"):
        ep.fill_local_experts(modules_at(0, 1, filled=False), tmp_path)
    ep.fill_local_experts({}, tmp_path)  # a dense model reads no shards
    ep.save_shard(modules_at(0, 1, filled=True), tmp_path, groups_at())
    wider = {"decoder.layers.0.a": FakeExperts(ep.ExpertPlacement(E, groups_at()), width=5)}
    with pytest.raises(ep.ExpertShapeMismatch, match=r"the experts of decoder.layers.0.a.w1 are \[3, 2\] in the "
                                                     r"checkpoint, \[5, 2\] in this model"):
        ep.fill_local_experts(wider, tmp_path)
