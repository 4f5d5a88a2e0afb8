"""Cross-field checks, done once at start-up before any process group exists.

Pure: the facts about the environment (world size, CUDA, the tokenizer's vocabulary) are arguments.
Every error is a one-line ConfigError naming the key, the value and the fix.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from megamoe import variants
from megamoe.config.loader import ConfigError
from megamoe.config.tree import DataConfig, ModelConfig, MoEConfig, ParallelConfig, RunConfig, TrainConfig

MIN_DISTRIBUTED_TIMEOUT_MINUTES = 1.0

# Keys of the generated DeepSpeed config: set through the megamoe key instead.
GENERATED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size",
    "gradient_clipping": "train.clip_grad",
    "bf16": "train.bf16",
    "fp16": "train.fp16",
    "optimizer": "train.lr / train.adam_*",
    "scheduler": "train.lr_* keys",
    "seed": "train.seed",
}


@dataclass(frozen=True)
class Environment:
    """What validation needs to know about the machine and the files."""

    world_size: int
    cuda_available: bool
    tokenizer_vocab_size: int | None
    """Read from data.tokenizer_model by the caller; None when the file is missing."""
    tokenizer_has_mask: bool = True
    """Whether the tokenizer has a <mask> piece (masked_lm needs one)."""
    check_files: bool = True
    """False for a run planned elsewhere (tools/plan.py): data and tokenizer files are not looked for."""


@dataclass(frozen=True)
class Layout:
    """Sizes derived from the config and the world size."""

    data_parallel_size: int
    grad_accum_steps: int
    global_batch_size: int


def validate(cfg: RunConfig, env: Environment) -> Layout:
    """Raise ConfigError on the first inconsistency; return the derived sizes."""
    _check_paths(cfg)
    _check_model(cfg.model, cfg.data, cfg.parallel)
    layout = _check_parallel(cfg.parallel, cfg.train, cfg.model, env.world_size, cfg.data.seq_length)
    _check_train(cfg.train, env.cuda_available)
    _check_data(cfg.data, cfg.model, cfg.train.eval_iters, env.tokenizer_vocab_size, env.check_files)
    _check_objective(cfg, env)
    _check_moe(cfg.moe, cfg, env.world_size)
    _check_deepspeed(cfg)
    _check_pipeline(cfg)
    _check_checkpoint(cfg, env.check_files)
    return layout


def _check_paths(cfg: RunConfig) -> None:
    """An empty path means the current directory to the file system: never what was meant."""
    paths = {"checkpoint.save": cfg.checkpoint.save, "checkpoint.load": cfg.checkpoint.load,
             "logging.log_dir": cfg.logging.log_dir, "data.tokenizer_model": cfg.data.tokenizer_model,
             "data.data_cache_path": cfg.data.data_cache_path}
    for key, value in paths.items():
        if value is not None and not value.strip():
            _fail(f"{key}={value!r} is empty; give a path" + ("" if key in REQUIRED_PATHS else " (or null)"))
    if cfg.logging.peak_tflops is not None and not cfg.logging.peak_tflops > 0:
        _fail(f"logging.peak_tflops={cfg.logging.peak_tflops} must be > 0 (one device's peak), or null")
    _check_profile(cfg)


def _check_profile(cfg: RunConfig) -> None:
    steps = cfg.logging.profile_steps
    if steps is not None and not (len(steps) == 2 and 1 <= steps[0] <= steps[1] <= cfg.train.train_iters):
        _fail(f"logging.profile_steps={steps} must be [first, last] with 1 <= first <= last <= train.train_iters "
              f"({cfg.train.train_iters}), or null")


REQUIRED_PATHS = ("logging.log_dir", "data.tokenizer_model")


def _check_checkpoint(cfg: RunConfig, check_files: bool) -> None:
    ckpt = cfg.checkpoint
    if ckpt.save_interval < 1:
        _fail(f"checkpoint.save_interval={ckpt.save_interval} must be >= 1")
    if ckpt.keep_last is not None and ckpt.keep_last < 1:
        _fail(f"checkpoint.keep_last={ckpt.keep_last} must be >= 1 (or null to keep every checkpoint)")
    if not check_files:
        return
    if ckpt.load is not None and Path(ckpt.load).exists() and not Path(ckpt.load).is_dir():
        _fail(f"checkpoint.load={ckpt.load!r} is a file; give the checkpoint directory (the one holding 'latest')")
    if ckpt.save is not None and Path(ckpt.save).exists() and not Path(ckpt.save).is_dir():
        _fail(f"checkpoint.save={ckpt.save!r} is a file; give a directory to write checkpoints into")


def _check_pipeline(cfg: RunConfig) -> None:
    """What megamoe's pipeline schedule (train/pipeline.py: one DeepSpeed engine per stage) supports."""
    pp = cfg.parallel.pipeline_model_parallel_size
    if pp == 1:
        return
    if cfg.deepspeed.zero_stage not in (1, 2):
        _fail(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} with parallel.pipeline_model_parallel_size={pp}: "
              "use ZeRO 1 or 2 (stage 0 clips with a norm over one stage only; stage 3 partitions the parameters "
              "the stages keep to themselves)")
    if not cfg.model.untie_embeddings_and_output_weights:
        _fail("model.untie_embeddings_and_output_weights=false with pipeline parallelism: the embedding and the "
              "output layer live on different stages; untie them (the Llama setting) or use "
              "parallel.pipeline_model_parallel_size=1")
    if cfg.train.fp16:
        _fail("train.fp16=true with pipeline parallelism: each stage would scale its loss separately; use "
              "train.bf16=true")


def _fail(message: str) -> None:
    raise ConfigError(message)


# Optional sizes of the model: None means "derived" (the docstring says from what); 0 is not a way to say it.
OPTIONAL_MODEL_SIZES = ("ffn_hidden_size", "num_query_groups", "kv_channels", "max_position_embeddings", "vocab_size")


def _check_model(model: ModelConfig, data: DataConfig, par: ParallelConfig) -> None:
    for key in ("num_layers", "hidden_size", "num_attention_heads", "make_vocab_size_divisible_by"):
        if getattr(model, key) <= 0:
            _fail(f"model.{key}={getattr(model, key)} must be positive")
    for key in OPTIONAL_MODEL_SIZES:
        if (value := getattr(model, key)) is not None and value < 1:
            _fail(f"model.{key}={value} must be >= 1, or null for the default")
    for key in ("init_method_std", "norm_epsilon", "rotary_base"):
        if getattr(model, key) <= 0:
            _fail(f"model.{key}={getattr(model, key)} must be > 0")
    heads, groups = model.num_attention_heads, model.num_query_groups or model.num_attention_heads
    if model.kv_channels is None and model.hidden_size % heads:
        _fail(f"model.hidden_size={model.hidden_size} is not divisible by model.num_attention_heads={heads}; "
              "change one of them or set model.kv_channels")
    if heads % groups:
        _fail(f"model.num_attention_heads={heads} is not divisible by model.num_query_groups={groups}; "
              "use a divisor of the head count")
    head_dim = model.kv_channels or model.hidden_size // heads
    if model.position_embedding_type == "rope" and head_dim % 2:
        _fail(f"head dimension {head_dim} is odd; rotary embeddings need an even head dimension "
              "(change model.hidden_size, model.num_attention_heads or model.kv_channels)")
    max_pos = model.max_position_embeddings
    if max_pos is not None and data.seq_length > max_pos:
        _fail(f"data.seq_length={data.seq_length} exceeds model.max_position_embeddings={max_pos}; "
              "raise max_position_embeddings or shorten the sequences")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(model, key) < 1.0:
            _fail(f"model.{key}={getattr(model, key)} must be in [0, 1)")


def _check_parallel(par: ParallelConfig, train: TrainConfig, model: ModelConfig, world_size: int,
                    seq_length: int) -> Layout:
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        _fail(f"parallel sizes must be >= 1, got tensor_model_parallel_size={tp}, "
              f"pipeline_model_parallel_size={pp}")
    if world_size % (tp * pp):
        _fail(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}; launch a multiple of "
              f"{tp * pp} processes or change parallel.tensor_model_parallel_size / pipeline_model_parallel_size")
    heads, groups = model.num_attention_heads, model.num_query_groups or model.num_attention_heads
    for key, value in (("num_attention_heads", heads), ("num_query_groups", groups),
                       ("ffn_hidden_size", model.ffn_hidden_size or 4 * model.hidden_size)):
        if value % tp:
            _fail(f"model.{key}={value} is not divisible by parallel.tensor_model_parallel_size={tp}; "
                  "choose a TP size that divides it")
    if model.num_layers % pp:
        _fail(f"model.num_layers={model.num_layers} is not divisible by "
              f"parallel.pipeline_model_parallel_size={pp}")
    if par.distributed_timeout_minutes <= 0:
        _fail(f"parallel.distributed_timeout_minutes={par.distributed_timeout_minutes} must be > 0")
    if par.distributed_timeout_minutes < MIN_DISTRIBUTED_TIMEOUT_MINUTES:
        _fail(f"parallel.distributed_timeout_minutes={par.distributed_timeout_minutes} is too short for the ranks "
              f"to start and meet (and for a checkpoint save's barrier); use at least "
              f"{MIN_DISTRIBUTED_TIMEOUT_MINUTES:g} (megatron's default is 10)")
    if par.step_timeout_minutes is not None and par.step_timeout_minutes <= 0:
        _fail(f"parallel.step_timeout_minutes={par.step_timeout_minutes} must be > 0 (null: no limit)")
    if par.sequence_parallel and tp == 1:
        warnings.warn("parallel.sequence_parallel=true is ignored with tensor_model_parallel_size=1",
                      stacklevel=2)
    if par.sequence_parallel and tp > 1 and seq_length % tp:
        _fail(f"data.seq_length={seq_length} is not divisible by parallel.tensor_model_parallel_size={tp}: sequence "
              f"parallelism gives each tensor-parallel rank seq_length / {tp} positions; use a multiple of {tp}")
    dp = world_size // (tp * pp)
    return batch_layout(train, dp)


def batch_layout(train: TrainConfig, dp: int) -> Layout:
    """Batch sizes for `dp` data-parallel ranks (ConfigError if the global batch does not divide)."""
    if train.micro_batch_size < 1:
        _fail(f"train.micro_batch_size={train.micro_batch_size} must be >= 1")
    per_step = train.micro_batch_size * dp
    gbs = train.global_batch_size if train.global_batch_size is not None else per_step
    if gbs < 1 or gbs % per_step:
        _fail(f"train.global_batch_size={gbs} is not a multiple of micro_batch_size x data-parallel size = "
              f"{train.micro_batch_size} x {dp} = {per_step}; use a multiple of {per_step}")
    return Layout(data_parallel_size=dp, grad_accum_steps=gbs // per_step, global_batch_size=gbs)


def _check_train(train: TrainConfig, cuda_available: bool) -> None:
    if train.train_iters < 1:
        _fail(f"train.train_iters={train.train_iters} must be >= 1")
    if train.lr <= 0 or train.min_lr < 0 or train.min_lr > train.lr:
        _fail(f"learning rates must satisfy 0 <= train.min_lr <= train.lr and lr > 0; got lr={train.lr}, "
              f"min_lr={train.min_lr}")
    decay_iters = train.lr_decay_iters or train.train_iters
    if not 0 <= train.lr_warmup_iters < decay_iters:  # megatron's scheduler asserts warm-up < decay
        _fail(f"train.lr_warmup_iters={train.lr_warmup_iters} must be at least 0 and less than the decay length "
              f"{decay_iters} (train.lr_decay_iters, default train.train_iters); lower the warm-up or train longer")
    if train.bf16 and train.fp16:
        _fail("train.bf16 and train.fp16 are both true; choose one precision")
    if train.fp16 and not cuda_available:
        _fail("train.fp16=true needs CUDA (DeepSpeed's CPU accelerator has no fp16 support); "
              "use train.bf16=true or fp32 on CPU")
    if train.clip_grad < 0:
        _fail(f"train.clip_grad={train.clip_grad} must be >= 0 (0 disables clipping)")
    for key in ("eval_interval", "log_interval", "max_skipped_steps"):
        if getattr(train, key) < 1:
            _fail(f"train.{key}={getattr(train, key)} must be >= 1")
    if train.eval_iters < 0:
        _fail(f"train.eval_iters={train.eval_iters} must be >= 0 (0 disables validation)")
    if not 0 <= train.seed < 2**32:
        _fail(f"train.seed={train.seed} must be in [0, 2**32) (numpy's seed range)")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(train, key) < 1.0:
            _fail(f"train.{key}={getattr(train, key)} must be in [0, 1)")
    if train.adam_eps <= 0 or train.weight_decay < 0:
        _fail(f"train.adam_eps={train.adam_eps} must be > 0 and train.weight_decay={train.weight_decay} >= 0")


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """Megatron's data_path: [prefix] or [w1, p1, w2, p2, ...] -> (prefixes, weights or None)."""
    if len(data_path) == 1:
        return list(data_path), None
    if len(data_path) % 2:
        _fail(f"data.data_path={data_path} must be [prefix] or [weight, prefix, weight, prefix, ...]")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        _fail(f"data.data_path={data_path}: every other entry must be a weight, as in "
              "[0.7, data/a_text_document, 0.3, data/b_text_document]")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        _fail(f"data.data_path weights {weights} must be positive numbers")
    return list(data_path[1::2]), weights


def data_split(data: DataConfig) -> str:
    """The split of data.data_path training uses: all of it when held-out sets are given apart."""
    return "1,0,0" if data.valid_data_path is not None else data.split


def valid_sets(valid_data_path: list[str]) -> dict[str, str]:
    """data.valid_data_path as {name: prefix}; the name is the prefix's file name without Megatron's
    '_text_document' (or '_document') ending."""
    if not valid_data_path:
        _fail("data.valid_data_path is empty; give held-out prefixes written by tools/preprocess_data.py, or leave "
              "it unset to validate on data.split's share of data.data_path")
    sets: dict[str, str] = {}
    for prefix in map(str, valid_data_path):
        if _is_number(prefix):
            _fail(f"data.valid_data_path={valid_data_path}: '{prefix}' is a number; held-out sets take no weights "
                  "(each is read whole and reported on its own)")
        name = Path(prefix).name.removesuffix("_text_document").removesuffix("_document")
        if name in sets:
            _fail(f"data.valid_data_path: '{sets[name]}' and '{prefix}' would both be reported as '{name}'; "
                  "give the held-out sets different file names")
        sets[name] = prefix
    return sets


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_data(data: DataConfig, model: ModelConfig, eval_iters: int, tokenizer_vocab_size: int | None,
                check_files: bool) -> None:
    """The data section; with `check_files`, also that its files exist and the tokenizer's size agrees."""
    if data.seq_length < 2:
        _fail(f"data.seq_length={data.seq_length} must be >= 2")
    if not data.data_path:
        _fail("data.data_path is empty; give the prefix written by tools/preprocess_data.py")
    if data.num_workers < 0:
        _fail(f"data.num_workers={data.num_workers} must be >= 0")
    prefixes, _ = parse_data_path(data.data_path)
    held_out = list(valid_sets(data.valid_data_path).values()) if data.valid_data_path is not None else []
    for key, prefix in [*(("data_path", p) for p in prefixes), *(("valid_data_path", p) for p in held_out)]:
        for suffix in (".bin", ".idx") if check_files else ():
            if not Path(prefix + suffix).is_file():
                _fail(f"data.{key}: '{prefix}{suffix}' does not exist; run tools/preprocess_data.py "
                      "or fix the prefix (give it without .bin/.idx)")
    parts = data.split.split(",")
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if len(shares) != 3 or any(s < 0 for s in shares) or shares[0] <= 0:
        _fail(f"data.split='{data.split}' must be three non-negative numbers 'train,valid,test' with "
              "train > 0, e.g. '90,5,5'")
    if shares[1] == 0 and eval_iters > 0 and data.valid_data_path is None:
        _fail(f"data.split='{data.split}' leaves no validation data but train.eval_iters={eval_iters}; "
              "give the validation split a share or set train.eval_iters=0")
    if not check_files:
        return
    hugging_face = data.tokenizer_type == "HuggingFaceTokenizer"
    path = Path(data.tokenizer_model)
    if not (path.exists() if hugging_face else path.is_file()) or tokenizer_vocab_size is None:
        what = "is a directory" if path.is_dir() else "does not exist"
        want = "a tokenizer.json or a directory holding one" if hugging_face else "the .model file"
        _fail(f"data.tokenizer_model: '{data.tokenizer_model}' {what}; point it at {want} written by "
              f"tools/preprocess_data.py (data.tokenizer_type={data.tokenizer_type})")
    if model.vocab_size is not None and model.vocab_size < tokenizer_vocab_size:
        _fail(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer '{data.tokenizer_model}' "
              f"({tokenizer_vocab_size} tokens): its last ids would have no embedding row; remove model.vocab_size "
              "or use the tokenizer the data was made with")


def moe_layer_numbers(moe: MoEConfig, num_layers: int) -> list[int]:
    """1-based numbers of the layers whose MLP slot holds an MoE layer (empty for a dense model)."""
    if moe.num_experts is None:
        return []
    if moe.layer_freq == "middle":
        return [(num_layers + 1) // 2]
    if isinstance(moe.layer_freq, int):
        return [n for n in range(1, num_layers + 1) if (n - 1) % moe.layer_freq == 0]
    return [n for n, flag in enumerate(moe.layer_freq, 1) if flag]


def _check_moe(moe: MoEConfig, cfg: RunConfig, world_size: int) -> None:
    ep = cfg.parallel.expert_model_parallel_size
    if moe.num_experts is None:
        if ep != 1:
            _fail(f"parallel.expert_model_parallel_size={ep} needs MoE layers; set moe.num_experts or use 1")
        return
    experts = moe.num_experts
    if experts < 1:
        _fail(f"moe.num_experts={experts} must be >= 1 (or null for a dense model)")
    if ep < 1 or experts % ep:
        _fail(f"moe.num_experts={experts} is not divisible by parallel.expert_model_parallel_size={ep}; "
              "choose a divisor of the expert count")
    stage_ranks = world_size // cfg.parallel.pipeline_model_parallel_size
    if stage_ranks % ep:
        _fail(f"parallel.expert_model_parallel_size={ep} does not divide the {stage_ranks} ranks of a pipeline "
              "stage; use a divisor")
    tp = cfg.parallel.tensor_model_parallel_size
    if tp > 1 and not cfg.parallel.sequence_parallel:
        _fail("MoE layers with parallel.tensor_model_parallel_size > 1 need parallel.sequence_parallel=true "
              "(each TP rank routes its own slice of the sequence)")
    if tp > 1 and ep > 1 and ep % tp:
        _fail(f"parallel.expert_model_parallel_size={ep} with tensor_model_parallel_size={tp}: use EP=1 or a "
              f"multiple of {tp} (the expert-parallel group then spans whole tensor-parallel groups)")
    if moe.layer_freq == "middle":
        pass
    elif isinstance(moe.layer_freq, int):
        if moe.layer_freq < 1:
            _fail(f"moe.layer_freq={moe.layer_freq} must be >= 1 (1 = every layer)")
    elif len(moe.layer_freq) != cfg.model.num_layers or set(moe.layer_freq) - {0, 1} or not any(moe.layer_freq):
        _fail(f"moe.layer_freq={moe.layer_freq} must be a list of {cfg.model.num_layers} zeros and ones "
              "(one per layer) with at least one 1")
    for key in ("ffn_hidden_size", "shared_expert_intermediate_size"):
        value = getattr(moe, key)
        if value is not None and value < 1:
            _fail(f"moe.{key}={value} must be >= 1")
    if moe.expert_capacity_factor is not None and moe.expert_capacity_factor <= 0:
        _fail(f"moe.expert_capacity_factor={moe.expert_capacity_factor} must be > 0 (null = dropless)")
    if moe.pad_expert_input_to_capacity and moe.expert_capacity_factor is None:
        _fail("moe.pad_expert_input_to_capacity=true needs moe.expert_capacity_factor (capacity to pad to)")
    if moe.drop_top_ranks < 0:
        _fail(f"moe.drop_top_ranks={moe.drop_top_ranks} must be >= 0 (0: route normally)")
    if moe.aux_loss_coeff < 0 or moe.z_loss_coeff < 0:
        _fail(f"moe.aux_loss_coeff={moe.aux_loss_coeff} and moe.z_loss_coeff={moe.z_loss_coeff} must be >= 0")
    if ep > 1 and cfg.deepspeed.zero_stage == 0 and cfg.train.clip_grad > 0:
        _fail("deepspeed.zero_stage=0 with expert parallelism and train.clip_grad > 0: DeepSpeed's stage-0 clipping "
              "averages per-rank norms, which is wrong when ranks hold different experts; use deepspeed.zero_stage=1 "
              "or 2 (or train.clip_grad=0)")
    if cfg.deepspeed.zero_stage == 3:
        _fail("deepspeed.zero_stage=3 with MoE layers is not supported: ZeRO-3 gathers a module's parameters only "
              "around its own forward, and the MoE layers use their router and expert weights directly (and "
              "DeepSpeed's MoE has no ZeRO-3 expert parallelism); use deepspeed.zero_stage=1 or 2")
    variants.of(moe).check(moe, cfg)


def _check_objective(cfg: RunConfig, env: Environment) -> None:
    if cfg.model.objective != "masked_lm":
        return
    if not 0 < cfg.data.mlm_probability < 1:
        _fail(f"data.mlm_probability={cfg.data.mlm_probability} must be in (0, 1)")
    if not env.tokenizer_has_mask:
        _fail(f"model.objective=masked_lm needs a <mask> piece, which the tokenizer '{cfg.data.tokenizer_model}' "
              "lacks; train one with tools/preprocess_data.py --train-tokenizer (it adds <mask>)")


def _check_deepspeed(cfg: RunConfig) -> None:
    for key, ours in GENERATED_DEEPSPEED_KEYS.items():
        if key in cfg.deepspeed.extra:
            _fail(f"deepspeed.extra.{key} is generated by megamoe; set {ours} instead")
    zero = cfg.deepspeed.extra.get("zero_optimization", {})
    if not isinstance(zero, dict) or "stage" in zero:
        _fail("deepspeed.extra.zero_optimization.stage is generated by megamoe; set deepspeed.zero_stage instead")
