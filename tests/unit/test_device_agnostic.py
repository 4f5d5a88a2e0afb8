"""Every variant's layer runs forward and backward on the `meta` device: a stand-in for an accelerator where a
tensor created on a fixed device, or a device value read on the host, fails. The host reads an MoE layer genuinely
needs pass through megamoe.moe.host.read_on_host: the test replays the values a CPU run read there, in the same
order and for the same reasons, and names every reason it allows."""

from __future__ import annotations

import pytest
import torch

from megamoe import variants
from megamoe.moe import LayerShape, host
from megamoe.moe.layer import Importance, TokenInfo
from megamoe.parallel.groups import ParallelGroups

D, F, TOKENS, SEQUENCES = 32, 64, 24, 2
CASES = {
    "top-2": ("topk", {"num_experts": 4, "router_topk": 2}),
    "fine-grained + shared, expert bias": ("topk", {"num_experts": 8, "router_topk": 4, "ffn_hidden_size": 16,
                                                    "shared_expert_intermediate_size": 16,
                                                    "router_enable_expert_bias": True}),
    "capacity, dropping by probability": ("topk", {"num_experts": 4, "router_topk": 2,
                                                   "expert_capacity_factor": 1.0}),
    "capacity, padded": ("topk", {"num_experts": 4, "router_topk": 2, "expert_capacity_factor": 1.0,
                                  "pad_expert_input_to_capacity": True}),
    "DA-MoE, predicted, running budget": ("dynamic", {"num_experts": 4, "importance_mode": "predicted",
                                                      "budget": "running", "k_max": 3}),
    "DA-MoE, attention, batch budget": ("dynamic", {"num_experts": 4, "budget": "batch", "k_max": 3}),
    "PEER": ("peer", {"num_experts": 64, "num_heads": 2, "topk_per_head": 4, "key_dim": 8}),
    "CartesianMoE": ("cartesian", {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 16,
                                   "shared_expert_intermediate_size": 16}),
    "MPOE": ("mpo", {"num_experts": 4}),
}
ALLOWED = {
    "row range of each expert's GEMMs": "the per-expert GEMM loop slices each expert's rows (torch._grouped_mm, "
                                         "used for bf16 on CUDA, takes the counts on the device and reads nothing)",
    "DA-MoE: the valid tokens sharing the budget": "the budget bisection runs over the valid tokens only",
    "copies of a variable number of experts per token": "DA-MoE's copies: their number is data-dependent",
    "copies within the expert capacity": "capacity dropping keeps a data-dependent number of copies",
    "MPOE: the optimizer step seeding the gradient mask": "the mask of the central tensor's gradient is drawn on "
                                                          "the host from a seed of the step, once per step",
}
"""Host reads allowed at EP = 1, and why each is needed. (Under expert parallelism the dispatcher adds one: the split
sizes of the all-to-all, which torch.distributed takes as Python ints; PEER adds the slots of its busiest token.)"""


def build(variant: str, options: dict) -> torch.nn.Module:
    cfg = variants.get(variant).config(**options)
    shape = LayerShape(hidden_size=D, ffn_hidden_size=F, swiglu=True, init_std=0.05, num_layers=2, layer_number=1,
                       seed=5)
    layer = variants.resolve(variants.get(variant).layer)(cfg, shape, ParallelGroups.single_process())
    return layer.train()


def forward_backward(layer: torch.nn.Module, device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    x_TD = torch.randn(TOKENS, D, generator=generator).to(device).requires_grad_()
    score_T = torch.rand(TOKENS, generator=generator).to(device)
    valid_T = torch.ones(TOKENS, dtype=torch.bool).to(device)
    tokens = TokenInfo(sequence_T=(torch.arange(TOKENS) % SEQUENCES).to(device), num_sequences=SEQUENCES,
                       importance=Importance(score_T=score_T, valid_T=valid_T))
    layer(x_TD, tokens).float().square().sum().backward()
    for sublayer in (m for m in layer.modules() if hasattr(m, "finish_step")):
        sublayer.finish_step()


@pytest.mark.parametrize("case", list(CASES))
def test_the_layer_runs_on_the_meta_device(case, monkeypatch):
    variant, options = CASES[case]
    layer = build(variant, options)
    with torch.device("meta"):  # built there (a module moved to meta gets new Parameter objects, without hooks)
        meta_layer = build(variant, options)
    read = host.read_on_host
    reads = []

    def recorded(values, why):
        reads.append((why, read(values, why)))
        return reads[-1][1]

    monkeypatch.setattr(host, "read_on_host", recorded)
    forward_backward(layer, torch.device("cpu"))
    assert {why for why, _ in reads} <= set(ALLOWED), f"unexpected host reads: {[w for w, _ in reads]}"
    replay = list(reads)

    def replayed(values, why):
        assert values.device.type == "meta"
        expected, value = replay.pop(0)
        assert why == expected, f"host read {why!r} where the CPU run read {expected!r}"
        return value

    monkeypatch.setattr(host, "read_on_host", replayed)
    forward_backward(meta_layer, torch.device("meta"))
    assert not replay, f"the meta run skipped host reads the CPU run made: {replay}"
    grads = [p.grad for p in meta_layer.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.device.type == "meta" for g in grads)
