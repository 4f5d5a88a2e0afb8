"""A variant is one plug-in: one defined here, in the test, joins megamoe through the registry alone.

"Fixed-projection top-1" routes each token to the expert of its largest score under a frozen random projection
(a hash-layer-like router: no router parameters, no balancing loss). It has its own config key, its own check, its
own layer over the shared MoE pipeline (dispatcher, experts, expert parallelism) and its own counts; nothing in
megamoe names it. Through the normal config path (`moe.variant=fixed_top1`) it is validated, planned, counted
and trained, at EP = 1 and EP = 2 with equal losses.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml
from torch import Tensor

from megamoe import config, variants
from megamoe.config import ModelConfig, MoEConfig, RunConfig
from megamoe.moe.layer import LayerShape, MoELayer, TokenInfo
from megamoe.moe.routing import Routing, topk_route
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.base import Variant, expert_params, expert_width, fail
from tests.helpers import max_rel_diff, spawn, tiny_config, train_steps


@dataclasses.dataclass(kw_only=True, frozen=True)
class FixedTop1Config(MoEConfig):
    """Top-1 routing by a frozen random projection (no router parameters)."""

    variant: str = "fixed_top1"
    """The MoE layer (this class reads moe.variant=fixed_top1)."""
    projection_seed: int = 7
    """Seed of the frozen projection."""
    projection_scale: float = 1.0
    """Scale of the projection's scores before the softmax (their temperature)."""
    router_load_balancing_type: str = "none"
    """No balancing loss: the projection is not trained."""


class FixedTop1MoE(MoELayer):
    def __init__(self, cfg: FixedTop1Config, shape: LayerShape, groups: ParallelGroups) -> None:
        super().__init__(cfg, shape, groups, nominal_k=1)
        generator = torch.Generator().manual_seed(cfg.projection_seed + shape.layer_number)
        projection = torch.randn(cfg.num_experts, shape.hidden_size, generator=generator)
        self.register_buffer("projection", projection / math.sqrt(shape.hidden_size))

    def route(self, x_TD: Tensor, tokens: TokenInfo) -> tuple[Routing, None]:
        logits_TE = self.cfg.projection_scale * (x_TD.float() @ self.projection.float().t())
        return topk_route(logits_TE, 1, True, tokens.valid_T), None


def _check(moe: FixedTop1Config, cfg: RunConfig) -> None:
    if moe.projection_scale <= 0:
        fail(f"moe.projection_scale={moe.projection_scale} must be > 0")


def _layer_params(moe: FixedTop1Config, model: ModelConfig, num_local: int) -> tuple[int, int]:
    return 0, num_local * expert_params(model, expert_width(moe, model))


PLUGIN = Variant(name="fixed_top1", config=FixedTop1Config, layer=FixedTop1MoE, check=_check,
                 experts_per_token=lambda moe: 1, layer_params=_layer_params,
                 ffn_madds=lambda moe, model: 3 * model.hidden_size * expert_width(moe, model))


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Registered for this file's tests only (other tests see megamoe's own variants); ranks register it first."""
    monkeypatch.setitem(variants.VARIANTS, PLUGIN.name, PLUGIN)


OVERRIDES = ["moe.variant=fixed_top1", "moe.num_experts=4", "moe.projection_scale=2.0", "train.clip_grad=0"]


def test_the_config_path_reads_and_checks_the_plugin(tiny_data):
    cfg = tiny_config(tiny_data, *OVERRIDES)
    assert type(cfg.moe) is FixedTop1Config and cfg.moe.projection_scale == 2.0
    assert config.from_dict(yaml.safe_load(config.dump(cfg))) == cfg  # as saved beside checkpoints, and read back
    with pytest.raises(config.ConfigError, match=r"moe.projection_scale=-1.0 must be > 0"):
        _validate(tiny_config(tiny_data, *OVERRIDES, "moe.projection_scale=-1"))
    with pytest.raises(config.ConfigError, match=r"unknown config key 'moe.projection_sede'; did you mean"):
        tiny_config(tiny_data, *OVERRIDES, "moe.projection_sede=3")


@pytest.fixture(scope="module")
def one_process(tiny_data) -> dict:
    """Counted and planned, then trained for 3 steps, in one process."""
    return spawn(_count_and_train, 1, tiny_data, [*OVERRIDES, "deepspeed.zero_stage=1"])[0]


def test_the_planner_counts_the_plugin_as_built(one_process):
    built, planned, stages = one_process["built"], one_process["planned"], one_process["stages"]
    assert planned == built, f"planned (dense, expert) {planned} vs built {built}"
    assert stages[0].expert_params == built[1] // 2 and stages[0].a2a_bytes_per_step > 0  # EP = 2 on 2 ranks


def test_the_plugin_trains_alike_at_ep1_and_ep2(tiny_data, one_process):
    one = one_process
    two = spawn(_train, 2, tiny_data, [*OVERRIDES, "deepspeed.zero_stage=1", "train.micro_batch_size=2",
                                       "parallel.expert_model_parallel_size=2"])
    assert all(math.isfinite(loss) for loss in one["losses"])
    assert two[0]["losses"] == two[1]["losses"]
    assert max(abs(a - b) / abs(b) for a, b in zip(two[0]["losses"], one["losses"], strict=True)) < 1e-5
    assert max_rel_diff(two[0]["full"], one["full"]) < 1e-5


def _validate(cfg: RunConfig) -> None:
    config.validate(cfg, config.Environment(world_size=1, cuda_available=False, tokenizer_vocab_size=None,
                                            check_files=False))


def _count_and_train(data: dict, overrides: list[str]) -> dict:
    variants.register(PLUGIN)
    built, planned, stages = _counts(data)
    return {"built": built, "planned": planned, "stages": stages, **_train(data, overrides)}


def _counts(data: dict) -> tuple[tuple[int, int], tuple[int, int], list]:
    from megamoe.data.tokenizer import spm_vocab_size
    from megamoe.models.gpt import build_model
    from megamoe.moe import plan
    from megamoe.moe.experts import Experts
    from megamoe.parallel.initialize import initialize

    cfg = tiny_config(data, *OVERRIDES)
    vocab = spm_vocab_size(cfg.data.tokenizer_model)
    model = build_model(cfg, vocab, initialize(cfg.parallel, cfg.train.seed))
    assert any(isinstance(m, FixedTop1MoE) for m in model.modules())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    sized = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    planned = plan.stage_params(sized, plan.ClusterLayout(world_size=1, tp=1, pp=1, ep=1), 0)
    ep2 = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, expert_model_parallel_size=2),
                              deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=1))
    return (sum(p.numel() for p in model.parameters()) - experts, experts), planned, plan.plan(ep2, 2, vocab)


def _train(data: dict, overrides: list[str]) -> dict:
    variants.register(PLUGIN)
    out = train_steps(data, overrides, steps=3)
    assert any(isinstance(m, FixedTop1MoE) for m in out.pop("trainer").engine.module.modules())
    return out
