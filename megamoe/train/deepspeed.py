"""Everything DeepSpeed: the generated config, the mpu adapter over megatron's groups, the engine."""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import sys
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import logger as ds_logger
from megatron.core import parallel_state

from megamoe.config import Layout, RunConfig, TrainConfig
from megamoe.moe.experts import Experts
from megamoe.parallel.experts import expert_group_name, mark_expert_parameters
from megamoe.parallel.groups import ParallelGroups
from megamoe.train.optim import build_optimizer, lr_scheduler_factory, param_groups


def to_deepspeed_config(cfg: RunConfig, layout: Layout) -> dict[str, Any]:
    """The DeepSpeed JSON config for `cfg`; deepspeed.extra is merged over it (validated not to clash)."""
    train = cfg.train
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage in (1, 2):
        # DeepSpeed requires both for MoE under ZeRO-2 and warns without them for ZeRO-1.
        zero.update(contiguous_gradients=True, reduce_scatter=True)
    generated = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum_steps,
        "gradient_clipping": train.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # megamoe passes torch/apex AdamW as a client optimizer
        # A non-finite gradient norm skips the step in bf16 too (DeepSpeed does it by default in fp32 and fp16).
        "bf16": {"enabled": train.bf16, "check_grad_overflow": True},
        "fp16": {"enabled": train.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # megamoe logs itself
        "wall_clock_breakdown": False,
    }
    return _merge(generated, cfg.deepspeed.extra)


class _ReadKeys(dict):
    """A config dict noting which of its keys DeepSpeed reads (it ignores the others without a word)."""

    def __init__(self, data: dict, read: set) -> None:
        super().__init__(data)
        self.read = read

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def read_deepspeed_config(cfg: RunConfig, layout: Layout) -> list[str]:
    """Parse the generated config (deepspeed.extra merged in) with DeepSpeed's own parser, in one process and
    before the engine exists: its errors (a wrong value, a refused combination) surface at start-up. Returns the
    top-level keys of deepspeed.extra DeepSpeed never read."""
    from deepspeed.runtime.config import DeepSpeedConfig

    generated = to_deepspeed_config(cfg, layout)
    generated.pop("train_batch_size")  # checked against the world size, which is not known here; derived instead
    read: set = set()
    DeepSpeedConfig(_ReadKeys(generated, read))
    return sorted(set(cfg.deepspeed.extra) - read)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class MegatronMPU:
    """megatron-core's parallel_state through the `mpu` interface DeepSpeed reads (Megatron-DeepSpeed's).

    ZeRO reduces over megatron's data-parallel group (within a pipeline stage). DeepSpeed's "model parallel"
    group is megatron's tensor x pipeline group: the global gradient norm sums every stage's share, counting
    TP-sharded gradients (tensor_model_parallel=True) on every TP rank and replicated ones on TP rank 0. The
    "model parallel rank" names checkpoint files: stage-major, pp_rank x TP + tp_rank (= the TP rank without
    pipeline parallelism), so every stage writes its own files.
    """

    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_group = staticmethod(parallel_state.get_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return (parallel_state.get_pipeline_model_parallel_rank()
                * parallel_state.get_tensor_model_parallel_world_size()
                + parallel_state.get_tensor_model_parallel_rank())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return (parallel_state.get_pipeline_model_parallel_world_size()
                * parallel_state.get_tensor_model_parallel_world_size())


def skip_if_not_finite(engine: deepspeed.DeepSpeedEngine, grad_norm: float | None) -> None:
    """ZeRO-0 in fp32 steps megamoe's own optimizer, which DeepSpeed does not check for overflow: set its
    StepGuard flag for a non-finite gradient norm (no update; DeepSpeed counts the step as skipped and holds the
    LR schedule), as DeepSpeed's ZeRO and bf16 optimizers do themselves."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return
    # DeepSpeed's norm helpers report a NaN or Inf norm as -1.
    engine.optimizer.overflow = not (grad_norm is not None and math.isfinite(grad_norm) and grad_norm >= 0)


def grad_norm_before_step(engine: deepspeed.DeepSpeedEngine) -> float | None:
    """The global gradient norm where DeepSpeed does not report one (ZeRO-0 in fp32 clips without keeping
    it). Call after the last backward of a step, before engine.step(); None where DeepSpeed reports it."""
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    from deepspeed.runtime.utils import is_model_parallel_parameter

    # Each TP rank holds its own shard of a TP-parallel weight but a copy of a replicated one (norms):
    # count the copies once, as DeepSpeed's clipping does (ZeRO-0: no pipeline parallelism, validate.py).
    tp_rank = engine.mpu.get_tensor_model_parallel_rank()
    params = [p for p in engine.module.parameters() if tp_rank == 0 or is_model_parallel_parameter(p)]
    return grad_norm(params, engine.mpu.get_model_parallel_group())


def grad_norm(params: list[torch.nn.Parameter], model_parallel_group) -> float:
    """DeepSpeed's get_flattened_grad_norm (2-norm over the model-parallel group; -1 where not finite) with one
    host read where it reads each parameter's norm (a synchronisation each on an accelerator). Its arithmetic:
    fp32 norms, squares summed in float64, the sum all-reduced in fp32."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    squares = (torch.stack(torch._foreach_norm(grads)).double().pow(2).sum() if grads
               else torch.zeros((), dtype=torch.float64))
    total = squares.float().reshape(1)
    dist.all_reduce(total, group=model_parallel_group)
    norm = total.item() ** 0.5
    return norm if math.isfinite(norm) else -1.0


class ExpertParallelMarker(DeepSpeedMoE):
    """Tells DeepSpeed the model holds expert-parallel parameters it did not create (docs/integration.md §6.3).

    Without a deepspeed.moe.layer.MoE in the model, DeepSpeed broadcasts every parameter from rank 0 and
    averages every gradient over all data-parallel ranks: experts of different EP ranks silently become
    copies of rank 0's. This zero-parameter subclass makes the engine MoE-aware, owns the creation of
    DeepSpeed's expert groups, and checks them against megatron-core's. `num_local_experts = 0`: DeepSpeed
    neither writes nor expects per-expert checkpoint files (megamoe writes its own expert shards).
    """

    def __init__(self, num_experts: int, ep_size: int) -> None:
        torch.nn.Module.__init__(self)  # not MoE.__init__: no gate, no experts, no parameters
        self.num_experts, self.ep_size, self.num_local_experts = num_experts, ep_size, 0
        self.expert_group_name = expert_group_name(ep_size)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine: create DeepSpeed's EP/EDP groups and require them equal to megatron's."""
        want = (dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()),
                dist.get_process_group_ranks(parallel_state.get_expert_data_parallel_group()))
        name = self.expert_group_name
        if name in ds_groups._get_expert_parallel_group_dict() and self._deepspeed_ranks() != want:
            # Built for an earlier layout of this process (megamoe rebuilds megatron's groups per run): drop them.
            for group in (ds_groups._get_expert_parallel_group(name), ds_groups._get_expert_data_parallel_group(name)):
                ds_groups._release_process_group_references(group)
        if name not in ds_groups._get_expert_parallel_group_dict():
            ds_groups._create_expert_and_data_parallel(
                self.ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        if (got := self._deepspeed_ranks()) != want:
            raise RuntimeError(f"DeepSpeed's expert-parallel / expert-data-parallel ranks {got} differ from "
                               f"megatron-core's {want}: expert gradients would be reduced over the wrong ranks")

    def _deepspeed_ranks(self) -> tuple[list[int], list[int]]:
        return (list(ds_groups._get_expert_parallel_group_ranks(self.expert_group_name)),
                list(ds_groups._get_expert_data_parallel_group_ranks(self.expert_group_name)))

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertParallelMarker is a marker; the MoE layers live in the MLP slots")


def expert_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, Experts) for p in m.parameters(recurse=False)]


def prepare_expert_parallelism(model: torch.nn.Module, groups: ParallelGroups, num_experts: int | None) -> int:
    """Tag expert parameters for DeepSpeed (parallel/experts.py: mark_expert_parameters) and add the marker
    (EP > 1); returns the number tagged."""
    tagged = mark_expert_parameters(expert_parameters(model), groups)
    if tagged:
        model.add_module("deepspeed_ep_marker", ExpertParallelMarker(num_experts, groups.ep_size))
    return tagged


def optimizer_param_groups(model: torch.nn.Module, groups: ParallelGroups, train: TrainConfig) -> list[dict]:
    """megamoe's weight-decay groups, split so that expert parameters sit in DeepSpeed MoE groups."""
    param_groups_ = param_groups(model, train)
    if groups.ep_size == 1:
        return param_groups_
    return split_params_into_different_moe_groups_for_optimizer(param_groups_)


def base_optimizer(engine: deepspeed.DeepSpeedEngine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16): the one holding the parameter groups."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def optimized_parameters(engine: deepspeed.DeepSpeedEngine) -> set[int]:
    """ids of the model parameters the optimizer updates."""
    owner = engine.optimizer
    groups = getattr(owner, "bit16_groups", None) or getattr(owner, "bf16_groups", None)  # ZeRO 1-2, bf16
    if groups is not None:
        return {id(p) for group in groups for p in group}
    return {id(p) for group in base_optimizer(engine).param_groups for p in group["params"]}


def partition_moments(engine: deepspeed.DeepSpeedEngine, mapping, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A ZeRO / bf16 parameter's range (its `_hp_mapping`) of the optimizer state `keys`, from the flat state of its
    parameter group (DeepSpeed 0.19 links `_hp_mapping.optim_fragment` for the first parameter group only)."""
    inner = engine.optimizer.optimizer
    state = inner.state.get(inner.param_groups[mapping.param_group_index]["params"][0], {})
    address = mapping.hp_fragment_address
    return {k: state[k].narrow(0, address.start, address.numel) for k in keys if k in state}


def set_partitioned_state(engine: deepspeed.DeepSpeedEngine, values: dict[int, dict[str, torch.Tensor]], step: int,
                          keys: tuple[str, ...]) -> None:
    """ZeRO 1-2 / bf16: each parameter's range (by id) of the fp32 master weights ('master', if given) and of the
    optimizer state `keys`, then the optimizer's flat state built from them, as DeepSpeed's universal-checkpoint
    loading does."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    owner = engine.optimizer
    lp_groups = getattr(owner, "bit16_groups", None) or owner.bf16_groups
    inner = owner.optimizer
    for i, group in enumerate(lp_groups):
        for lp in group:
            mapping = lp._hp_mapping
            if mapping is None:
                continue
            mine = values[id(lp)]
            if "master" in mine:
                mapping.get_hp_fragment().data.copy_(mine["master"])
            mapping.optim_fragment = {k: mine[k].to(mapping.get_hp_fragment().device) for k in keys}
        hp_param = inner.param_groups[i]["params"][0]
        inner.state[hp_param]["step"] = torch.tensor(float(step))
        map_to_flat_opt_states(hp_param, group, inner.state, keys)
        if "step" in inner.param_groups[i]:
            inner.param_groups[i]["step"] = step


def aux_loss_scale(engine: deepspeed.DeepSpeedEngine) -> float:
    """The gradient of an attached aux loss: DeepSpeed divides the LM loss by the accumulation steps and, in
    fp16, multiplies it by the current loss scale; the aux losses must be scaled alike."""
    scale = 1.0 / engine.gradient_accumulation_steps()
    if engine.fp16_enabled():
        scale *= float(engine.optimizer.cur_scale)
    return scale


def build_engine(model: torch.nn.Module, cfg: RunConfig, layout: Layout,
                 groups: ParallelGroups) -> deepspeed.DeepSpeedEngine:
    """deepspeed.initialize with megamoe's optimizer, LR schedule, expert parallelism and megatron's groups."""
    ds_logger.setLevel(logging.WARNING)
    prepare_expert_parallelism(model, groups, cfg.moe.num_experts)
    optimizer = build_optimizer(optimizer_param_groups(model, groups, cfg.train), cfg.train)
    no_cpu_shared_memory_all_reduce()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler_factory(cfg.train),
        mpu=MegatronMPU(), config=to_deepspeed_config(cfg, layout), dist_init_required=False)
    return engine


def no_cpu_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce (csrc/cpu/comm/shm.cpp)
    in every rank's set-up, for inference_all_reduce (AutoTP inference) alone, which megamoe never calls: it is
    not built (on GPUs there is nothing to build). Building it took each launch ~1.5 s (a first build ~20 s, 60+
    s on a busy machine), mapped an undeleted ~69 MB /dev/shm file per rank, and rebuilt whenever a run found a
    different `ninja` on PATH (an activated venv or not); a rank killed during a build (the stall watchdog,
    SIGKILL, scancel) left torch's build lock behind, on which every later launch waited forever."""
    if torch.cuda.is_available():
        return
    # By module name: `import deepspeed.comm.torch` binds deepspeed.comm's attribute `torch`, which is PyTorch.
    backend = importlib.import_module("deepspeed.comm.torch")
    backend.build_shm_op = lambda: None  # TorchBackend's inference_all_reduce then uses torch.distributed


def build_deepspeed_moe_layer(hidden_size: int, expert: torch.nn.Module, *, num_experts: int, topk: int,
                              ep_size: int) -> DeepSpeedMoE:
    """DeepSpeed's own MoE layer outside an engine (benchmarks): dropless and deterministic.

    Needs the torch process group. Dropless: each expert's capacity is the largest count any rank routes to
    it. Deterministic: top-2's second expert is the second-highest logit (DeepSpeed samples it by default),
    and no random token selection.
    """
    no_cpu_shared_memory_all_reduce()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints group creation to stdout
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing torch group
        layer = DeepSpeedMoE(hidden_size=hidden_size, expert=expert, num_experts=num_experts, ep_size=ep_size,
                             k=topk, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        layer.set_deepspeed_parallelism()  # deepspeed.initialize would: create and attach the expert group
    return layer


def zero_fp32_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint DeepSpeed's engine wrote (its ZeRO files), by parameter name."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
