"""The config tree: frozen dataclasses, one per YAML section. Defaults are the base; YAML files hold deltas.

Field names follow Megatron-LM's command-line arguments where one exists (`--train-iters` is
`train.train_iters`), grouped by section. Every field has a docstring; the configuration
reference (docs/configuration.md) is generated from them (`tools/config_reference.py`).
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
    add_qkv_bias: bool = False
    """Biases on the query, key and value projections only (Qwen2, Qwen2-MoE)."""
    qk_layernorm: bool = False
    """Normalise each attention head's queries and keys (model.normalization, over the head dimension) before the
    rotary embedding (Qwen3, Qwen3-MoE)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    attention_backend: Literal["sdpa", "unfused"] = "sdpa"
    """How self-attention's softmax(q k^T) v is computed: torch's scaled_dot_product_attention (flash kernels on CPU
    and GPU), or megatron-core's unfused DotProductAttention (its own scores, masked softmax and bmm). sdpa hands a
    layer to the unfused module where it cannot match it (attention dropout, an explicit padding mask)."""
    vocab_size: int | None = None
    """Rows of the embedding and output layer. None: the tokenizer's vocabulary (data.tokenizer_model). May exceed it,
    never fall short: a Hugging Face checkpoint's padded vocabulary (Qwen's 151,936 rows for 151,665 tokens)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this times the tensor-parallel size (Megatron's rule)."""
    objective: Literal["causal_lm", "masked_lm"] = "causal_lm"
    """causal_lm: GPT (causal attention, next-token loss). masked_lm: an encoder, the same stack with
    bidirectional attention and a masked-token loss (BERT-style masking, data.mlm_probability)."""


@dataclass(kw_only=True, frozen=True)
class MoEConfig:
    """Mixture-of-Experts layers in the MLP slot. Keys shared by every variant; `variant` picks the subclass
    (its megamoe.variants entry) reads the rest. Megatron's `moe_*` names, without the prefix."""

    variant: str = "topk"
    """The MoE layer: a key of megamoe.variants.VARIANTS."""
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


def default_moe_config() -> MoEConfig:
    """The moe: section of a config that has none: the default variant's defaults (no MoE layers)."""
    from megamoe import variants  # the registry reads this module: import it on use

    return variants.get(MoEConfig.variant).config()


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
    """The tokenizer the data was tokenized with: a sentencepiece .model (SentencePieceTokenizer), or a
    tokenizer.json or a directory holding one (HuggingFaceTokenizer)."""
    tokenizer_type: Literal["SentencePieceTokenizer", "HuggingFaceTokenizer"] = "SentencePieceTokenizer"
    """What data.tokenizer_model is (Megatron-LM's --tokenizer-type names)."""
    seq_length: int = 1024
    """Tokens per training sample."""
    split: str = "969,30,1"
    """Train/valid/test proportions of every dataset, e.g. '90,5,5'. With data.valid_data_path, training reads
    data_path whole and only the train share matters."""
    valid_data_path: list[str] | None = None
    """Held-out datasets validation reads instead of a split of data_path (Megatron-LM's --valid-data-path): each
    prefix whole, in an order fixed whatever train.seed, so runs of every seed see the same tokens. valid/loss pools
    them; with several, valid/<name>/loss and valid/<name>/ppl report each (name: the prefix's file name without
    '_text_document'), e.g. one held-out set per domain."""
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
    """Checkpoints: weights in DeepSpeed's model-file layout, expert shards, optimizer state in any-layout form,
    megamoe's own state (data position, RNG, resolved config)."""

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
    async_save: bool = True
    """Write checkpoints in the background (Megatron-LM's --async-save): at the step boundary each rank copies its
    part to host memory (for the length of the write, host memory holds that copy) and training continues while a
    thread writes and publishes it; at most one save is in flight, the last step's and a stop signal's are waited
    for. A kill during the write leaves `latest` on the previous checkpoint. False: training waits for each write."""
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
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device (or one rank's CPU share) for the MFU shown in the log. None: the device's dense
    bf16 peak from megamoe's table on CUDA, a float32 GEMM timed once on a CPU (megamoe/train/flops.py)."""
    profile_steps: list[int] | None = None
    """[first, last]: profile these optimizer steps (1-based, inclusive) with the PyTorch profiler: a trace and
    the step's time by part (attention, routing, dispatch, experts, optimizer, ...) with its host syncs, under
    log_dir/profile (docs/benchmarks.md). None: no profiling."""
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    """Global ranks that profile profile_steps."""
    step_timers: bool = False
    """Time the parts of every step (data, forward, backward, gradient reduction, optimizer) and log them per step
    as time/<part>_ms; the device is synchronised at the parts' boundaries (a few synchronisations per step, none
    on a CPU), so a part's time is its work, unlike the profiler's breakdown (docs/benchmarks.md)."""


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """Everything a training run needs; saved as config.yaml beside every checkpoint."""

    model: ModelConfig
    """Model architecture."""
    data: DataConfig
    """Training data."""
    train: TrainConfig
    """Optimisation."""
    moe: MoEConfig = field(default_factory=lambda: default_moe_config())
    """Mixture-of-Experts layers (none unless moe.num_experts is set)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""
