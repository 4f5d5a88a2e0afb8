"""MPO decomposition and the MPOE layer (docs/variants.md §8, M1-M7, M10-M12), single process, fp64 where exact."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megamoe.moe import LayerShape, build_moe
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.mpo import MPOEMoEConfig
from megamoe.variants.mpo.operators import MPOShape, apply_chain, auto_shape, decompose, reconstruct

T5_WI = MPOShape(i=(4, 4, 8, 6, 4), j=(3, 4, 4, 4, 4))
D, FFN = 16, 24
SHAPE = LayerShape(hidden_size=D, ffn_hidden_size=FFN, swiglu=True, init_std=0.2, num_layers=2, layer_number=1,
                   seed=3)


def _random(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [T5_WI, auto_shape(352, 128, 5), auto_shape(128, 352, 5), auto_shape(96, 40, 3),
                                   auto_shape(64, 48, 7)], ids=["t5_wi", "352x128", "128x352", "n3", "n7"])
def test_decompose_then_reconstruct_is_exact_in_float64(shape):
    w = _random(shape.rows, shape.cols)
    tensors = decompose(w, shape)
    assert [tuple(t.shape) for t in tensors] == [shape.tensor_shape(k) for k in range(shape.n)]
    modes = [a * b for a, b in zip(shape.i, shape.j, strict=True)]
    assert list(shape.bonds) == [1] + [min(math.prod(modes[:k]), math.prod(modes[k:])) for k in range(1, shape.n)] + [1]
    assert (reconstruct(tensors, shape) - w).abs().max().item() <= 1e-10


def test_t5_base_wi_sizes_match_the_released_code():
    assert T5_WI.bonds == (1, 12, 192, 384, 16, 1)
    assert T5_WI.sizes() == [144, 36_864, 2_359_296, 147_456, 256]


def test_truncation_bonds_error_and_gauge():
    shape = auto_shape(96, 40, 5)
    w = _random(96, 40, seed=1)
    errors = []
    for bond in (1, 2, 4, 8, 16, 32, 64):
        truncated = dataclasses.replace(shape, max_bond=bond)
        assert truncated.bonds[1:-1] == tuple(min(b, bond) for b in shape.bonds[1:-1])
        tensors = decompose(w, truncated)
        errors.append((reconstruct(tensors, truncated) - w).norm().item())
        for k, t in enumerate(tensors):  # mixed-canonical around the centre
            if k < truncated.center:
                m = t.reshape(-1, t.shape[-1])
                keep = m.T @ m
            elif k > truncated.center:
                m = t.reshape(t.shape[0], -1)
                keep = m @ m.T
            else:
                continue
            rank = int((keep.diagonal() > 0.5).sum())  # zero-padded bonds beyond the matrix rank are allowed
            assert torch.allclose(keep[:rank, :rank], torch.eye(rank, dtype=keep.dtype), atol=1e-10)
    assert all(a >= b - 1e-9 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] <= 1e-10 and max(shape.bonds) <= 64


def test_chain_contraction_equals_rebuilt_matrix():
    shape = auto_shape(48, 40, 5)
    w = _random(48, 40, seed=2)
    x = _random(7, 40, seed=3)
    assert torch.allclose(apply_chain(x, decompose(w, shape), shape), x @ w.T, atol=1e-10)


def test_auto_shape_puts_the_largest_factor_in_the_middle():
    shape = auto_shape(352, 128, 5)
    assert math.prod(shape.i) == 352 and math.prod(shape.j) == 128
    assert shape.i[2] == max(shape.i) == 11 and shape.j[2] == max(shape.j)


def _layer(**overrides) -> torch.nn.Module:
    cfg = MPOEMoEConfig(num_experts=4, aux_loss_coeff=0.0, **overrides)
    return build_moe(cfg, SHAPE, ParallelGroups.single_process())


def test_central_tensor_is_one_shared_parameter_outside_the_experts():
    from megamoe.moe.experts import Experts

    layer = _layer()
    names = [n for n, _ in layer.named_parameters()]
    assert [n for n in names if "central" in n] == ["mpo.gate.central", "mpo.up.central", "mpo.down.central"]
    assert sum("central" in k for k in layer.state_dict()) == 3
    expert_params = {id(p) for m in layer.modules() if isinstance(m, Experts) for p in m.parameters()}
    assert all(id(m.central) not in expert_params for m in layer.mpo.values())
    assert all(p.shape[0] == 4 for p in layer.experts.parameters())


def _dense_ffn(x: torch.Tensor, dense: dict[str, torch.Tensor]) -> torch.Tensor:
    gate, up = (x @ dense["linear_fc1.weight"].T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ dense["linear_fc2.weight"].T


def test_upcycled_layer_reconstructs_and_equals_the_dense_ffn():
    layer = _layer(p_mask=1.0).double()
    gen = torch.Generator().manual_seed(4)
    dense = {"linear_fc1.weight": torch.randn(2 * FFN, D, generator=gen, dtype=torch.float64),
             "linear_fc2.weight": torch.randn(D, FFN, generator=gen, dtype=torch.float64)}
    layer.load_dense_ffn(dense)
    w = layer.experts.matrices()
    gate, up = dense["linear_fc1.weight"].chunk(2)
    for name, want in {"gate": gate, "up": up, "down": dense["linear_fc2.weight"]}.items():
        assert (w[name] - want).abs().max().item() <= 1e-10, name
    torch.nn.init.normal_(layer.router.weight, 0.0, 1.0)  # any routing
    x = torch.randn(20, D, generator=gen, dtype=torch.float64)
    assert torch.allclose(layer(x), _dense_ffn(x, dense), atol=1e-10)


def test_central_gradient_is_the_sum_of_every_experts_contribution():
    layer = _layer(aux_init_noise_std=0.05, p_mask=0.0).double()
    x = torch.randn(40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    layer(x).square().sum().backward()
    assert layer.experts.num_local == 4 and layer.pop_stats()["tokens_per_expert"].min() > 0
    untied = {n: m.central.detach().expand(4, *m.central.shape).clone().requires_grad_() for n, m in layer.mpo.items()}
    layer.central_tensors = lambda: untied
    layer.experts.central_tensors = layer.central_tensors
    layer(x).square().sum().backward()
    for name, module in layer.mpo.items():
        assert torch.allclose(untied[name].grad.sum(0), module.central.grad, rtol=1e-10, atol=1e-12), name


def test_p_mask_one_freezes_the_central_tensors_while_auxiliaries_train():
    from megamoe.config import TrainConfig
    from megamoe.train.optim import param_groups

    layer = _layer(p_mask=1.0)
    assert all(not m.central.requires_grad for m in layer.mpo.values())
    groups = param_groups(layer, TrainConfig(train_iters=1, weight_decay=0.1))
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert all(id(m.central) not in in_optimizer for m in layer.mpo.values())
    optimizer = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for step in range(3):
        x = torch.randn(30, D, generator=torch.Generator().manual_seed(step))
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        layer.finish_step()
    for name, param in layer.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == ("central" not in name), name


def test_masks_are_deterministic_at_the_requested_rate_and_resume():
    a, b = _layer(p_mask=0.3), _layer(p_mask=0.3)  # two ranks build the same layer independently
    draws = [a.central_mask("up", step) is not None for step in range(2000)]
    assert draws == [b.central_mask("up", step) is not None for step in range(2000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.04
    other = [a.central_mask("gate", step) is not None for step in range(2000)]
    assert other != draws  # matrices (and layers) draw independently
    element = _layer(p_mask=0.3, mask_granularity="element").central_mask("down", 0)
    assert abs(element.mean().item() - 1.0) < 0.1
    assert set(element.unique().tolist()) == {0.0, torch.tensor(1.0 / 0.7).item()}
    for _ in range(5):
        a.finish_step()
    resumed = _layer(p_mask=0.3)
    resumed.load_state_dict(a.state_dict())
    assert int(resumed.mask_step) == 5


def test_masked_step_zeroes_only_the_central_gradient():
    layer = _layer(p_mask=0.5)
    masked_step = next(s for s in range(100) if layer.central_mask("gate", s) is not None)
    kept_step = next(s for s in range(100) if layer.central_mask("gate", s) is None)
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(6))
    grads = {}
    for step in (masked_step, kept_step):
        layer.zero_grad()
        layer.mask_step.fill_(step)
        layer._step_masks, layer._masked_step = {}, None  # as finish_step leaves them
        layer(x).square().sum().backward()
        central, aux = layer.mpo["gate"].central.grad, layer.experts.gate_aux1.grad
        grads[step] = (central.abs().sum().item(), aux.abs().sum().item())
    assert grads[masked_step][0] == 0.0 and grads[kept_step][0] > 0.0
    assert grads[masked_step][1] == grads[kept_step][1] > 0.0


def test_switch_router_with_bias_and_unit_gate():
    layer = _layer(aux_init_noise_std=0.05)
    assert layer.router.bias is not None and layer.cfg.router_topk == 1
    routing, _ = layer.route(torch.randn(10, D), layer_tokens())
    assert torch.equal(routing.weight_N, torch.ones(10)) and routing.token_N.tolist() == list(range(10))
    layer(torch.randn(10, D)).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.router.bias.grad.abs().sum() > 0
    assert float(layer.pop_stats()["dropped"]) == 0.0  # dropless


def layer_tokens():
    from megamoe.moe.layer import TokenInfo

    return TokenInfo()


def test_unit_gate_and_input_scaling_agree_for_relu_free_experts():
    # A bias-free ReLU expert is positively homogeneous: F(p x) = p F(x), so scaling the input (released code)
    # or the output (megamoe) by the gate gives the same value.
    w1, w2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    x, p = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 1, dtype=torch.float64)
    expert = lambda v: torch.relu(v @ w1.T) @ w2.T  # noqa: E731
    assert torch.allclose(expert(p * x), p * expert(x))


def test_parameter_ratio_against_switch():
    from megamoe.variants.mpo.sizing import mpoe_parameter_report

    t5 = {"fc1": [list(T5_WI.i), list(T5_WI.j)], "fc2": [list(T5_WI.j), list(T5_WI.i)]}
    for experts, want in ((16, 7.10), (8, 4.92)):
        report = mpoe_parameter_report(MPOEMoEConfig(num_experts=experts, mpo_shapes=t5), hidden_size=768,
                                       ffn_hidden_size=3072, swiglu=False, count_router=False)
        assert round(report.ratio, 2) == want, report


def test_parameter_tool_reports_the_tiny_model_ratio_at_e8_and_e16(capsys):
    """T6: the demo model's exact MPOE layer is >= 4.5x smaller than Switch at E=8 (routers counted)."""
    from tests.helpers import ROOT
    from tools.mpoe_params import main

    assert main(["--config", str(ROOT / "configs" / "tiny-dense.yaml"), "--num-experts", "8,16"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    ratios = {int(row[1]): float(row[7].strip().rstrip("x")) for row in rows}
    assert ratios[8] >= 4.5 and ratios[16] > ratios[8], ratios
