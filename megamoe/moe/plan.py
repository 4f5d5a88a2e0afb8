"""Memory and all-to-all planner: what one rank of each pipeline stage holds for a config on a cluster shape.

Per rank: parameters, gradients and optimizer states (Adam's two moments plus DeepSpeed's fp32 master partition)
under the ZeRO stage, activations kept for backward, and the bytes each rank sends through the expert-parallel
all-to-all per optimizer step. Everything is arithmetic on the config — no model is built — so it answers for
clusters that do not exist yet; tests/distributed/test_plan.py checks it against measured CPU runs.

Model states (P parameters on the rank, d = their dtype's bytes; dense parameters partitioned over the DP ranks,
expert parameters over the expert-DP ranks):
    ZeRO 0: P d (weights) + P d (gradients) + 8 P (Adam m, v) [+ 4 P fp32 master copy in bf16]
    ZeRO 1: P d + P d + (8 + 4) P / DP      (DeepSpeed keeps an fp32 master copy of its partition)
    ZeRO 2: P d + 4 P / DP + (8 + 4) P / DP  (gradients reduced into the fp32 partition)
    ZeRO 3: the weights are partitioned too.
Activations, per micro-batch (s sequence, b micro-batch, h hidden, a heads, g key/value heads, dh head width, F
FFN width, T = s b tokens, N = T k routed copies), counted as the tensors megamoe's implementation saves for
backward (megatron's unfused local layers; the expert loop keeps its input rows and fc1 output):
    a layer's attention:  7 s b h + 3 b a s dh + b a s^2  (+ b a s^2 bytes of dropout mask)
    a dense MLP:          5 s b F
    a top-k MoE MLP:      3 N h + N X + T h + 2 T E + ... (X = fc1 width: 2F for SwiGLU)
    outside the layers:   3 s b h + s b V (logits) on the stages holding them
divided by TP where megatron shards them (heads, F, vocabulary; s under sequence parallelism), times the
micro-batches a stage keeps alive (1F1B: P - stage, at most the accumulation steps). Every variant's
MoE activations are estimated by its routed copies (like top-k with the variant's mean experts per token and
number of sub-layers); its model states are exact (the variant's own parameter count, megamoe.variants).
All-to-all: each copy routed to an expert on another EP rank crosses twice forward (dispatch, combine) and twice
backward; with balanced experts a share (EP - 1) / EP of a rank's copies leaves it.

A checkpoint (train/checkpoint.py) writes, per pipeline stage: a model file per tensor-parallel rank (the stage's
dense weights, from data-parallel rank 0), the expert shards (each expert-parallel rank's experts, once) and the
optimizer state (Adam's moments, and the fp32 master under ZeRO 1-2 or bf16, each piece written once over the
replicas, spread evenly: under ZeRO every rank its partition).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megamoe import variants
from megamoe.config import RunConfig
from megamoe.config.validate import batch_layout, moe_layer_numbers
from megamoe.parallel.layout import padded_vocab_size, stage_layer_numbers
from megamoe.variants.base import expert_width, mlp_params

GiB = 2 ** 30


@dataclass(frozen=True)
class ClusterLayout:
    """The process layout of a run: world = TP x PP x DP; expert parallelism within the DP x TP ranks of a stage."""

    world_size: int
    tp: int
    pp: int
    ep: int

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        """Replicas of each expert (megatron's expert-data-parallel size with expert-TP 1)."""
        return self.dp * self.tp // self.ep


@dataclass(frozen=True)
class StagePlan:
    """One rank of pipeline stage `stage` (bytes unless named otherwise)."""

    stage: int
    dense_params: int
    expert_params: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    micro_batches_alive: int
    a2a_bytes_per_step: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes


@dataclass(frozen=True)
class CheckpointPlan:
    """Bytes one checkpoint writes (tensor data, no file overhead): the most any rank writes, and in all."""

    parts: dict[str, int]
    """What each kind of file holds over all ranks."""
    rank_bytes: int
    """The rank writing the most: data-parallel rank 0 of the largest stage."""

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    def seconds(self, gbytes_per_s: float) -> float:
        """The save at a file system's aggregate bandwidth."""
        return self.total_bytes / (gbytes_per_s * 1e9)


def checkpoint_plan(cfg: RunConfig, world_size: int, vocab_size: int) -> CheckpointPlan:
    """The bytes of one checkpoint of `cfg` on `world_size` ranks (see the module's docstring)."""
    par = cfg.parallel
    layout = ClusterLayout(world_size=world_size, tp=par.tensor_model_parallel_size,
                           pp=par.pipeline_model_parallel_size, ep=par.expert_model_parallel_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    zero, half = cfg.deepspeed.zero_stage, cfg.train.bf16 or cfg.train.fp16
    width, optimizer_width = (2 if half else 4), 8 + (4 if zero or half else 0)
    parts = dict.fromkeys(("model files", "expert shards", "optimizer"), 0)
    rank_most = 0
    for stage in range(layout.pp):
        dense, experts = stage_params(cfg, layout, stage)  # one rank's: its TP shard, its EP rank's experts
        share = dense / layout.dp + experts / max(1, layout.edp)
        model_file, expert_shard, optimizer = dense * width, experts * width, int(share * optimizer_width)
        parts["model files"] += layout.tp * model_file
        parts["expert shards"] += layout.ep * expert_shard
        parts["optimizer"] += optimizer * layout.dp * layout.tp
        rank_most = max(rank_most, model_file + expert_shard + optimizer)
    return CheckpointPlan(parts=parts, rank_bytes=rank_most)


def format_checkpoint(checkpoint: CheckpointPlan, gbytes_per_s: float) -> str:
    lines = [f"checkpoint: {checkpoint.total_bytes / GiB:.2f} GiB in all, at most {checkpoint.rank_bytes / GiB:.2f} "
             f"GiB from one rank; {checkpoint.seconds(gbytes_per_s):.1f} s at {gbytes_per_s:g} GB/s of file-system "
             "bandwidth (written in the background: training waits only for the copy to host memory; with "
             "checkpoint.async_save=false it waits for the write)", "", "| part | GiB |", "|---|---|"]
    return "\n".join(lines + [f"| {name} | {value / GiB:.2f} |" for name, value in checkpoint.parts.items()])


def plan(cfg: RunConfig, world_size: int, vocab_size: int) -> list[StagePlan]:
    """The plan of every pipeline stage for `cfg` on `world_size` ranks (`vocab_size`: the tokenizer's)."""
    par = cfg.parallel
    layout = ClusterLayout(world_size=world_size, tp=par.tensor_model_parallel_size,
                           pp=par.pipeline_model_parallel_size, ep=par.expert_model_parallel_size)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    return [stage_plan(cfg, layout, stage) for stage in range(layout.pp)]


def stage_plan(cfg: RunConfig, layout: ClusterLayout, stage: int) -> StagePlan:
    dense, experts = stage_params(cfg, layout, stage)
    params, grads, optimizer = model_state_bytes(cfg, layout, dense, experts)
    gas = batch_layout(cfg.train, layout.dp).grad_accum_steps
    alive = min(layout.pp - stage, gas)
    return StagePlan(stage=stage, dense_params=dense, expert_params=experts, params_bytes=params,
                     grads_bytes=grads, optimizer_bytes=optimizer,
                     activations_bytes=alive * stage_activation_bytes(cfg, layout, stage), micro_batches_alive=alive,
                     a2a_bytes_per_step=gas * stage_a2a_bytes(cfg, layout, stage))


# ---- parameters ----

def stage_params(cfg: RunConfig, layout: ClusterLayout, stage: int) -> tuple[int, int]:
    """(dense, expert) parameters on one rank of `stage`."""
    model, tp = cfg.model, layout.tp
    vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    h, norm = model.hidden_size, _norm_params(cfg)
    dense = experts = 0
    if stage == 0:
        dense += vocab * h // tp
        if model.position_embedding_type == "learned_absolute":
            dense += (model.max_position_embeddings or cfg.data.seq_length) * h
    moe_layers = set(moe_layer_numbers(cfg.moe, model.num_layers))
    for number in stage_layer_numbers(model.num_layers, layout.pp, stage):
        dense += norm + attention_params(cfg, tp)
        if number in moe_layers:
            variant = variants.of(cfg.moe)
            layer_dense, layer_experts = variant.layer_params(cfg.moe, model, cfg.moe.num_experts // layout.ep)
            dense += layer_dense + (0 if variant.owns_pre_mlp_norm else norm)
            experts += layer_experts
        else:
            dense += norm + mlp_params(model, model.ffn_hidden_size or 4 * h, tp)
    if stage == layout.pp - 1:
        dense += norm + (vocab * h // tp if model.untie_embeddings_and_output_weights else 0)
    return dense, experts


def _norm_params(cfg: RunConfig) -> int:
    return (2 if cfg.model.normalization == "LayerNorm" else 1) * cfg.model.hidden_size


def attention_params(cfg: RunConfig, tp: int) -> int:
    model = cfg.model
    heads, groups = model.num_attention_heads, model.num_query_groups or model.num_attention_heads
    head_dim, h = model.kv_channels or model.hidden_size // heads, model.hidden_size
    qkv = (heads + 2 * groups) * head_dim
    bias = (qkv // tp + h) if model.add_bias_linear else 0
    return (qkv * h + h * heads * head_dim) // tp + bias


# ---- model states ----

def model_state_bytes(cfg: RunConfig, layout: ClusterLayout, dense: int, experts: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) bytes of one rank under the ZeRO stage."""
    stage, half = cfg.deepspeed.zero_stage, cfg.train.bf16 or cfg.train.fp16
    width = 2 if half else 4
    total = dense + experts
    partition = dense / layout.dp + experts / max(1, layout.edp) if layout.ep > 1 else total / layout.dp
    if stage == 0:
        return total * width, total * width, total * (12 if half else 8)
    weights = partition * width if stage == 3 else total * width
    grads = total * width if stage == 1 else partition * 4
    return int(weights), int(grads), int(partition * 12)


# ---- activations and all-to-all ----

def stage_activation_bytes(cfg: RunConfig, layout: ClusterLayout, stage: int) -> int:
    """Bytes saved for backward by one micro-batch on one rank of `stage`."""
    model, tp = cfg.model, layout.tp
    width = 2 if cfg.train.bf16 or cfg.train.fp16 else 4
    s, b, h = cfg.data.seq_length, cfg.train.micro_batch_size, model.hidden_size
    heads = model.num_attention_heads
    head_dim = model.kv_channels or h // heads
    sp = tp if cfg.parallel.sequence_parallel and tp > 1 else 1
    moe_layers = set(moe_layer_numbers(cfg.moe, model.num_layers))
    elements = bool_bytes = 0
    for number in stage_layer_numbers(model.num_layers, layout.pp, stage):
        elements += 7 * s * b * h / sp + (3 * b * heads * s * head_dim + b * heads * s * s) / tp
        if model.attention_dropout > 0:
            bool_bytes += b * heads * s * s / tp
        if number in moe_layers:
            elements += moe_activation_elements(cfg, layout, s * b / sp)
        else:
            elements += 5 * s * b * (model.ffn_hidden_size or 4 * h) / tp
    if stage == 0:
        elements += s * b * h / sp
    if stage == layout.pp - 1:
        vocab = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
        elements += 2 * s * b * h / sp + s * b * vocab / tp
    return int(elements * width + bool_bytes)


def moe_activation_elements(cfg: RunConfig, layout: ClusterLayout, tokens: float) -> float:
    """A MoE MLP's saved elements for `tokens` tokens on the rank (routed rows balanced over EP ranks)."""
    moe, h, variant = cfg.moe, cfg.model.hidden_size, variants.of(cfg.moe)
    width = expert_width(moe, cfg.model)
    copies = tokens * variant.experts_per_token(moe)
    fc1 = (2 if cfg.model.swiglu else 1) * width
    routed = 3 * copies * h + copies * fc1 + tokens * h + 2 * tokens * moe.num_experts + 4 * copies
    shared = 5 * tokens * moe.shared_expert_intermediate_size if moe.shared_expert_intermediate_size else 0
    return variant.sublayers * (routed + shared)


def stage_a2a_bytes(cfg: RunConfig, layout: ClusterLayout, stage: int) -> int:
    """Bytes one rank sends to other EP ranks per micro-batch (forward and backward) on `stage`."""
    moe = cfg.moe
    if layout.ep == 1 or moe.num_experts is None or not variants.of(moe).all_to_all:
        return 0  # e.g. PEER shards its tables and gathers tokens instead
    width = 2 if cfg.train.bf16 or cfg.train.fp16 else 4
    sp = layout.tp if cfg.parallel.sequence_parallel and layout.tp > 1 else 1
    tokens = cfg.data.seq_length * cfg.train.micro_batch_size / sp
    numbers = set(stage_layer_numbers(cfg.model.num_layers, layout.pp, stage))
    layers = len(numbers & set(moe_layer_numbers(moe, cfg.model.num_layers)))
    variant = variants.of(moe)
    remote = tokens * variant.experts_per_token(moe) * (layout.ep - 1) / layout.ep
    return int(layers * variant.sublayers * 4 * remote * cfg.model.hidden_size * width)


def format_plan(stages: list[StagePlan], cfg: RunConfig, world_size: int) -> str:
    """A markdown table: one row per pipeline stage (one rank of it)."""
    par = cfg.parallel
    lines = [f"world {world_size}: TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size} "
             f"EP={par.expert_model_parallel_size} ZeRO-{cfg.deepspeed.zero_stage}, "
             f"{'bf16' if cfg.train.bf16 else 'fp16' if cfg.train.fp16 else 'fp32'}", "",
             "| stage | params (dense + expert) | weights GiB | grads GiB | optimizer GiB | activations GiB "
             "(micro-batches) | total GiB | all-to-all GiB/step |", "|---|---|---|---|---|---|---|---|"]
    for p in stages:
        lines.append(f"| {p.stage} | {p.dense_params:,} + {p.expert_params:,} | {p.params_bytes / GiB:.3f} | "
                     f"{p.grads_bytes / GiB:.3f} | {p.optimizer_bytes / GiB:.3f} | "
                     f"{p.activations_bytes / GiB:.3f} ({p.micro_batches_alive}) | {p.total_bytes / GiB:.3f} | "
                     f"{p.a2a_bytes_per_step / GiB:.3f} |")
    return "\n".join(lines)
