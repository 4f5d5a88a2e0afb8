"""The config tree: frozen dataclasses, one per YAML section. Defaults are the base; YAML files hold deltas.

Field names follow Megatron-LM's command-line arguments where one exists (`--train-iters` is
`train.train_iters`), grouped by section. Every field has a docstring; the README's configuration
reference is generated from them (`tools/config_reference.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """GPT architecture, built from megatron-core (Llama/Mixtral options by default)."""

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width d."""
    num_attention_heads: int
    """Query heads."""
    ffn_hidden_size: int | None = None
    """Width of the dense MLP. None: 4 * hidden_size (Megatron's default)."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention. None: one per query head (multi-head attention)."""
    kv_channels: int | None = None
    """Head dimension. None: hidden_size / num_attention_heads."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Norm type of every norm in the model."""
    norm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    swiglu: bool = True
    """SwiGLU MLP (gated SiLU). False: GELU MLP."""
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """Rotary (Llama) or learned absolute (GPT-2) position embeddings."""
    rotary_base: int = 10000
    """RoPE theta."""
    max_position_embeddings: int | None = None
    """Longest sequence the position embedding covers. None: data.seq_length."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output projection (Llama). False ties them (GPT-2)."""
    add_bias_linear: bool = False
    """Biases in the linear layers (False for Llama/Mixtral)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    vocab_size: int | None = None
    """Tokenizer vocabulary size. None: read from data.tokenizer_model; if set it must agree with it."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the tensor-parallel size (Megatron's rule)."""
    objective: Literal["causal_lm", "masked_lm"] = "causal_lm"
    """causal_lm: GPT (causal attention, next-token loss). masked_lm: an encoder, the same stack with
    bidirectional attention and a masked-token loss (BERT-style masking, data.mlm_probability)."""


@dataclass(kw_only=True, frozen=True)
class MoEConfig:
    """Mixture-of-Experts layers in the MLP slot. Keys shared by every variant; `variant` picks the subclass
    (config.MOE_CONFIGS) that reads the rest. Megatron's `moe_*` names, without the prefix."""

    variant: str = "topk"
    """The MoE layer: one of config.MOE_CONFIGS (= megamoe.moe.VARIANTS)."""
    num_experts: int | None = None
    """Routed experts per MoE layer. None: a dense model (no MoE layers)."""
    layer_freq: int | list[int] | Literal["middle"] = 1
    """Which layers are MoE: N = every N-th layer starting with the first (1 = all), a 0/1 list per layer, or
    'middle' (the one layer ceil(L/2), PEER's placement)."""
    ffn_hidden_size: int | None = None
    """Width of one routed expert. None: model.ffn_hidden_size (fine-grained experts use a fraction)."""
    shared_expert_intermediate_size: int | None = None
    """Width of the always-on shared expert(s) (DeepSeekMoE). None: no shared expert."""
    shared_expert_combine: Literal["add", "gate", "residual"] = "add"
    """How the shared expert joins: 'add' (DeepSeekMoE), 'gate' = sigmoid(x w) scaling (Qwen2-MoE),
    'residual' = softmax(Linear(d, 2)) mix of routed and shared outputs (DeepSpeed Residual-MoE)."""
    router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "aux_loss"
    """Switch balancing loss over each micro-batch, over each sequence, or over the global batch (all ranks,
    all micro-batches of the step so far)."""
    aux_loss_coeff: float = 0.01
    """Weight alpha of the Switch load-balancing loss."""
    z_loss_coeff: float = 0.0
    """Weight beta of the router z-loss (ST-MoE); 0 disables it."""
    expert_capacity_factor: float | None = None
    """None: dropless. Else each expert takes at most ceil(factor x copies / experts) copies per rank."""
    token_drop_policy: Literal["probs", "position"] = "probs"
    """Which copies an over-full expert keeps: the highest router probabilities, or the earliest tokens."""
    pad_expert_input_to_capacity: bool = False
    """Pad every expert's input to its capacity: static shapes, and no count exchange before the all-to-all."""
    grouped_gemm: Literal["auto", "on", "off"] = "auto"
    """Expert GEMMs through torch._grouped_mm ('auto': on CUDA in bf16) or a loop over experts."""
    drop_top_ranks: int = 0
    """Evaluation only: skip each token's r most probable experts and route to the next k (the robustness test
    of CartesianMoE, arXiv:2410.16077); training is unaffected."""


@dataclass(kw_only=True, frozen=True)
class TopKMoEConfig(MoEConfig):
    """Token-choice top-k routing: Switch (top-1), GShard (top-2), Mixtral (top-k), fine-grained + shared."""

    router_topk: int = 2
    """Experts per token k."""
    router_pre_softmax: bool = False
    """True: weights are the full softmax's probabilities of the chosen experts (Switch, Qwen2-MoE).
    False: softmax over the chosen k logits, i.e. renormalised (Mixtral, GShard)."""
    input_jitter_eps: float = 0.0
    """Multiply router inputs by U(1 - eps, 1 + eps) while training (Switch); 0 disables it."""
    router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for selection only."""
    router_bias_update_rate: float = 1e-3
    """Step of the expert-bias update per optimizer step."""
    router_bias: bool = False
    """Router Linear(d, E) with a trained bias (the Switch code MPOE builds on); false: bias-free (Megatron)."""
    router_gate: Literal["weights", "unit_st"] = "weights"
    """How the chosen expert's output is scaled: by the routing weight, or 'unit_st' = p / stopgrad(p) (value 1,
    the router still gets p's gradient; top-1 with router_pre_softmax only). unit_st keeps an upcycled layer
    equal to the dense FFN at the start."""


@dataclass(kw_only=True, frozen=True)
class DynamicMoEConfig(MoEConfig):
    """DA-MoE (arXiv:2409.06669): each token's number of experts K from its importance (variants.md §3)."""

    variant: str = "dynamic"
    """The MoE layer (this class reads moe.variant=dynamic)."""

    importance_mode: Literal["attention_received", "predicted"] = "attention_received"
    """attention_received: the attention each token receives in the same block (the paper; needs
    model.objective=masked_lm). predicted: a head on the token's own hidden state predicts it (a named,
    causal-safe deviation for GPT), trained toward the attention-received target by an MSE loss."""
    normalize: Literal["max", "minmax", "rank", "softmax"] = "max"
    """Per-sequence normalisation of importance to [0, 1]."""
    softmax_temperature: float = 1.0
    """Temperature of normalize=softmax (values scaled so the largest is 1)."""
    k_min: int = 1
    """Fewest experts a (valid) token gets; 0 allowed."""
    k_max: int = 4
    """Most experts a token gets: K = clamp(ceil(s K_max), K_min, K_max)."""
    budget: Literal["none", "batch", "running"] = "none"
    """Match a mean K: 'batch' exactly per micro-batch (couples tokens: bidirectional only), 'running' by a
    scale calibrated over past micro-batches (causal-safe)."""
    budget_k_mean: float = 2.0
    """The target mean K of a budget."""
    budget_momentum: float = 0.95
    """budget=running: c <- momentum c + (1 - momentum) c_batch."""
    renormalize: Literal["k>1", "always", "never"] = "k>1"
    """Renormalise the chosen experts' probabilities: 'k>1' makes K = 1 Switch and K = k Mixtral exactly."""
    predictor_loss_coeff: float = 1.0
    """importance_mode=predicted: weight gamma of the MSE loss of the importance head."""
    target_norm: Literal["count", "uniform_relative"] = "count"
    """predicted: divide attention received by the number of queries that see the token ('count'), or
    weight queries by their key count so uniform causal attention gives 1 ('uniform_relative')."""


@dataclass(kw_only=True, frozen=True)
class PEERMoEConfig(MoEConfig):
    """PEER (arXiv:2407.04153): product-key retrieval over num_experts single-neuron experts (variants.md §4).
    num_experts must be a perfect square; the expert tables are row-sharded over the expert-parallel group."""

    variant: str = "peer"
    """The MoE layer (this class reads moe.variant=peer)."""
    layer_freq: int | list[int] | Literal["middle"] = "middle"
    """PEER replaces the middle block's MLP by default (the paper's placement)."""
    router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "global_aux_loss", "none"] = "none"
    """PEER has no balancing loss: the query BatchNorm balances retrieval."""
    num_heads: int = 8
    """Retrieval heads h (each retrieves its own experts; outputs are summed)."""
    topk_per_head: int = 16
    """Experts per head k (h x k single-neuron experts per token)."""
    key_dim: int = 128
    """Query / product-key dimension d_k (even: two halves of d_k/2)."""
    shared_keys: bool = True
    """One pair of sub-key tables for all heads (the paper); False: per-head keys."""
    query_norm: Literal["batchnorm", "layernorm", "none"] = "batchnorm"
    """BatchNorm on the queries (the paper; statistics over valid tokens); layernorm is the causal-safe
    deviation (BatchNorm's batch statistics include later tokens of the sequence)."""
    gate: Literal["softmax", "sigmoid"] = "softmax"
    """Weights of a head's k experts: softmax over their scores (Alg. 1), or sigmoid of each (Eq. 2)."""
    chunk_tokens: int = 1024
    """Tokens per chunk of the expert computation: bounds the gathered [tokens, h, k, d] rows."""
    placement_seed: int = 0
    """Seed of the fixed permutation placing experts on table rows (stored in checkpoints)."""


@dataclass(kw_only=True, frozen=True)
class CartesianMoEConfig(TopKMoEConfig):
    """CartesianMoE (arXiv:2410.16077): two sequential sub-layers A then B, each a top-k MoE with its own
    norm, router, experts and shared expert; a token's composite expert is FFN_B o FFN_A (variants.md §5)."""

    variant: str = "cartesian"
    """The MoE layer (this class reads moe.variant=cartesian)."""
    shared_expert_combine: Literal["add", "gate", "residual"] = "residual"
    """The authors' mix: c = softmax(Linear(d, 2)(x)) with bias; y = c0 routed + c1 shared."""
    drop_top_scope: Literal["a", "b", "both"] = "both"
    """The sub-layers moe.drop_top_ranks applies to."""


@dataclass(kw_only=True, frozen=True)
class MPOEMoEConfig(TopKMoEConfig):
    """MPOE (arXiv:2203.01104): every expert matrix is a matrix product operator whose central tensor is shared
    by all experts of the layer and whose auxiliary tensors are the expert's own (variants.md §6). Defaults are
    the from-scratch preset; tools/upcycle.py writes the upcycling preset (p_mask=1, aux_loss_coeff=0)."""

    variant: str = "mpo"
    """The MoE layer (this class reads moe.variant=mpo)."""
    router_topk: int = 1
    """Switch top-1 (the paper's router); other k allowed with router_gate=weights."""
    router_pre_softmax: bool = True
    """The chosen expert's probability under the softmax over all experts (Switch)."""
    router_bias: bool = True
    """Switch's router is a Linear(d, E) with bias."""
    router_gate: Literal["weights", "unit_st"] = "unit_st"
    """Value-1 straight-through gate (the released code's default)."""
    mpo_num_tensors: int = 5
    """Local tensors n per matrix (odd; the central one is number (n+1)/2)."""
    mpo_shapes: dict[str, list[list[int]]] | None = None
    """Factorisation per matrix, {name: [[i_1..i_n], [j_1..j_n]]} over out (i) and in (j) dims; names are
    gate, up, down (SwiGLU) or fc1, fc2. Missing names: near-equal factors, the largest in the middle."""
    mpo_max_bond: int | None = None
    """Truncation D of every bond; None: exact (bonds min(left, right))."""
    p_mask: float = 0.5
    """Probability that a step's gradient of a central tensor is masked (drawn per step, layer and matrix,
    identically on every rank). 1.0 freezes the central tensors (the upcycling preset); 0 never masks."""
    mask_granularity: Literal["tensor", "element"] = "tensor"
    """Mask the whole central gradient, or each element (kept ones scaled by 1 / (1 - p_mask), Child-Tuning)."""
    aux_init_noise_std: float = 0.0
    """From-scratch initialisation: experts start as the same decomposed dense FFN, plus this noise on their
    auxiliary tensors (0: identical experts, the paper's upcycling)."""
    mpo_lr_mult: float = 1.0
    """Learning-rate multiplier of the MPO tensors (central and auxiliary; the released --mpo_lr)."""


MOE_CONFIGS: dict[str, type[MoEConfig]] = {"topk": TopKMoEConfig, "dynamic": DynamicMoEConfig,
                                           "peer": PEERMoEConfig, "cartesian": CartesianMoEConfig,
                                           "mpo": MPOEMoEConfig}


@dataclass(kw_only=True, frozen=True)
class ParallelConfig:
    """Process layout. Data-parallel size is derived: world size / (TP x PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel (Megatron intra-layer) size."""
    pipeline_model_parallel_size: int = 1
    """Pipeline stages."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size: each group of this many ranks shares the experts of a layer (tokens travel
    by all-to-all). Expert-tensor parallelism is 1: every expert lives whole on one rank."""
    sequence_parallel: bool = False
    """Shard norms and dropout along the sequence across the tensor-parallel group (needs TP > 1)."""
    distributed_timeout_minutes: float = 10.0
    """A collective that waits longer than this fails instead of hanging (a rank died). At least 1."""
    step_timeout_minutes: float | None = 30.0
    """A rank on which no training step (nor the set-up before the first, nor the exit after the last) finishes
    within this time prints every thread's stack and exits 1, and the launcher ends the job: a stall anywhere (a
    collective without a timeout, a data worker, the file system) does not hold the nodes until the time limit.
    Allow for a step's validation and checkpoint save. None: no limit."""


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Optimisation schedule and batch sizes."""

    micro_batch_size: int = 1
    """Sequences per rank per forward pass."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all data-parallel ranks. None: micro_batch_size x DP (no accumulation).
    Gradient-accumulation steps = global_batch_size / (micro_batch_size x DP)."""
    train_iters: int
    """Optimizer steps to train for."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up steps from 0 to lr."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay from lr to min_lr after warm-up."""
    lr_decay_iters: int | None = None
    """Steps over which warm-up + decay run. None: train_iters."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    bf16: bool = False
    """bfloat16 training (fp32 master weights in the optimizer)."""
    fp16: bool = False
    """float16 training with dynamic loss scaling (CUDA only)."""
    seed: int = 1234
    """Seed of every random number generator (weights, data order, dropout); in [0, 2**32)."""
    eval_interval: int = 100
    """Run validation every this many steps (and at step 0 and at the end)."""
    eval_iters: int = 10
    """Micro-batches per validation run on every data-parallel rank; 0 disables validation."""
    log_interval: int = 10
    """Log training metrics every this many steps."""
    max_skipped_steps: int = 10
    """Abort after this many optimizer steps in a row were skipped for a non-finite loss or gradient (each
    skipped step is counted and logged; its update is not applied)."""


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Megatron indexed datasets made by tools/preprocess_data.py."""

    data_path: list[str]
    """Dataset prefixes (without .bin/.idx), Megatron style: [prefix] or [weight1, prefix1, weight2, prefix2, ...]
    for a weighted blend."""
    tokenizer_model: str
    """The sentencepiece model the data was tokenized with."""
    seq_length: int = 1024
    """Tokens per training sample."""
    split: str = "969,30,1"
    """Train/valid/test proportions of every dataset, e.g. '90,5,5'."""
    data_cache_path: str | None = None
    """Where sample indices are cached. None: a 'cache' folder next to the first dataset."""
    num_workers: int = 1
    """DataLoader worker processes per rank for training data (validation reads its few batches in the rank)."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""
    mlm_probability: float = 0.15
    """model.objective=masked_lm: share of tokens to predict (80% of them shown as <mask>, 10% as a random
    token, 10% unchanged), drawn per sample from the seed: every run and layout masks alike."""


@dataclass(kw_only=True, frozen=True)
class DeepSpeedConfig:
    """The DeepSpeed engine. Its JSON config is generated from the whole tree (train.*, here)."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys, merged into the generated config (e.g. {'zero_optimization':
    {'overlap_comm': true}}). Keys megamoe generates from other settings are refused."""


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """DeepSpeed checkpoints plus megamoe's own state (data position, RNG, resolved config)."""

    save: str | None = None
    """Directory to save checkpoints to. None: no checkpoints. One that holds another run's checkpoints is refused
    (resume that run with checkpoint.load set to it); while a run lives, its rank 0 locks the directory."""
    load: str | None = None
    """Directory to resume from (its 'latest' tag). One that holds no checkpoint is an error, except when it is
    checkpoint.save as well (the first start of a job that resumes where it saves). A resumed run keeps the
    checkpoint's step count and takes this config's learning-rate schedule and Adam settings."""
    save_interval: int = 1000
    """Save every this many steps (and at the end of training)."""
    finetune: bool = False
    """Load only the weights of checkpoint.load (Megatron's --finetune): iteration, data position, optimizer and
    LR schedule start afresh; drop it to resume the fine-tuning run itself. Weights-only checkpoints
    (tools/upcycle.py) always load this way."""
    keep_last: int | None = None
    """Keep only the newest this many checkpoints in checkpoint.save (older ones are deleted after a new one is
    published). None keeps every checkpoint."""
    verify: Literal["hashes", "sizes", "none"] = "hashes"
    """Before resuming, check every file of the checkpoint against its manifest: sizes and SHA-256 ('hashes'),
    sizes only (fast on huge checkpoints), or not at all."""


@dataclass(kw_only=True, frozen=True)
class LoggingConfig:
    """Console, metrics.jsonl, TensorBoard and Weights & Biases."""

    log_dir: str = "runs/megamoe"
    """Run directory: metrics.jsonl, tensorboard/ and wandb/ go here."""
    tensorboard: bool = True
    """Write TensorBoard event files to log_dir/tensorboard."""
    wandb: bool = True
    """Log to Weights & Biases; offline (log_dir/wandb) when no API key is configured."""
    wandb_project: str = "megamoe"
    """W&B project."""
    wandb_exp_name: str | None = None
    """W&B run name. None: the last component of log_dir."""


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """Everything a training run needs; saved as config.yaml beside every checkpoint."""

    model: ModelConfig
    """Model architecture."""
    data: DataConfig
    """Training data."""
    train: TrainConfig
    """Optimisation."""
    moe: MoEConfig = field(default_factory=TopKMoEConfig)
    """Mixture-of-Experts layers (none unless moe.num_experts is set)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
