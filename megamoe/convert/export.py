"""A megamoe checkpoint of any TP/EP layout -> one full state dict -> a Hugging Face directory.

The tensor-parallel shards of DeepSpeed's `mp_rank_XX_model_states.pt` files (one set per pipeline stage, layers
renumbered globally) are merged with megatron's own partition attributes (read from the same model built in this
process with TP = PP = 1); the routed experts come from megamoe's `experts_ep*.pt` shards, placed by global expert
id. Nothing but the checkpoint and its config is read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import torch

from megamoe import config
from megamoe.config import RunConfig
from megamoe.hf import custom, native
from megamoe.models.sharding import merge_tp
from megamoe.parallel import experts as expert_shards
from megamoe.train import checkpoint, integrity
from megamoe.utils import get_logger, make_directory


def one_process_model(cfg: RunConfig, vocab_size: int) -> torch.nn.Module:
    """The run's model with TP = EP = 1 in this process (its parameters carry megatron's partition attributes)."""
    from megamoe.models.gpt import build_model
    from megamoe.parallel.initialize import initialize

    single = dataclasses.replace(cfg, parallel=config.ParallelConfig())
    return build_model(single, vocab_size, initialize(single.parallel, cfg.train.seed))


def merged_state_dict(tag_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint as a full fp32 tensor, and every persistent buffer (expert bias, PEER's
    placement and BatchNorm statistics, ...: identical on every rank), named as in `model` (TP = PP = 1, all
    experts local)."""
    saved = checkpoint.global_module_states(tag_dir)
    experts = expert_shards.merge_shards(tag_dir)
    merged = {}
    for name, param in model.named_parameters():
        if name in experts:
            merged[name] = experts[name].float()
        elif name in saved:
            merged[name] = merge_tp(saved[name], param).float()
        else:
            raise ValueError(f"{tag_dir} lacks {name}: the checkpoint does not fit its own config.yaml")
    for name, buffer in model.state_dict().items():
        if name not in merged and isinstance(buffer, torch.Tensor):
            if not isinstance(saved.get(name, [None])[0], torch.Tensor):
                raise ValueError(f"{tag_dir} lacks {name}: the checkpoint does not fit its own config.yaml")
            merged[name] = saved[name][0]
    return merged


def export_hf(load_dir: str, out_dir: str, dtype: str = "float32") -> Path:
    """Write the HF directory of the latest checkpoint under `load_dir`; returns it."""
    from megamoe.data.tokenizer import embedding_rows, special_token_ids
    from megamoe.data.tokenizer import vocab_size as tokenizer_size

    tag_dir = checkpoint.latest_tag_dir(load_dir)
    out = Path(out_dir)
    prepare_output_directory(out)  # before the merge: a bad --save must not cost it
    cfg = config.load(tag_dir / "config.yaml")
    checkpoint.verify_for_use(tag_dir, cfg)
    kind = custom.export_format(cfg)
    tokenizer_model = Path(cfg.data.tokenizer_model)
    if tokenizer_size(tokenizer_model, cfg.data.tokenizer_type) is None:
        raise FileNotFoundError(f"the run's tokenizer {tokenizer_model} is missing; the export ships it")
    vocab_size = embedding_rows(cfg)
    merged = merged_state_dict(tag_dir, one_process_model(cfg, vocab_size))
    special_ids = special_token_ids(tokenizer_model, cfg.data.tokenizer_type)
    if kind == "megamoe":
        hf_cfg, build = custom.hf_config(cfg, vocab_size, merged, special_ids), custom.model_class(cfg)
        state = custom.to_hf(merged, custom.arch(cfg, vocab_size))
    else:
        from transformers import AutoModelForCausalLM

        hf_cfg = native.hf_config(cfg, vocab_size, special_ids)
        build = functools.partial(AutoModelForCausalLM.from_config, dtype=torch.float32)
        state = native.to_hf(merged, native.arch(cfg, vocab_size))
    hf_model = hf_model_from(hf_cfg, build, state)
    hf_model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    for weights in out.glob("*.safetensors"):  # written through a private temporary file (mode 0600)
        weights.chmod((out / "config.json").stat().st_mode & 0o777)
    save_tokenizer(tokenizer_model, cfg.data.tokenizer_type, out)
    warn_if_auto_tokenizer_differs(out, tokenizer_model, cfg.data.tokenizer_type)
    get_logger().info(f"exported {tag_dir} as {type(hf_model).__name__} to {out}"
                      + (" (custom code: load with trust_remote_code=True)" if kind == "megamoe" else ""))
    return out


def prepare_output_directory(out: Path) -> None:
    """Create the export directory; refuse a file, or a run's checkpoint directory (an export is not a checkpoint:
    its files would sit among the run's)."""
    if integrity.holds_checkpoints(out):
        raise ValueError(f"--save {out} is a run's checkpoint directory (latest {integrity.latest_name(out)}); export "
                         "to a directory of its own")
    try:
        make_directory(out)
    except OSError as err:
        raise ValueError(f"--save: {err.strerror}") from None


def hf_model_from(hf_cfg, build, state: dict[str, torch.Tensor]):
    """The transformers model `build(hf_cfg)` holding `state` (every tensor must be used, every weight given)."""
    from transformers import GenerationConfig

    with torch.device("meta"):
        hf_model = build(hf_cfg)
    hf_model.load_state_dict(state, strict=True, assign=True)
    if hf_cfg.tie_word_embeddings:
        hf_model.tie_weights()
    if hasattr(hf_model, "generate"):
        # No max_length: transformers warns on every generate() whose max_new_tokens a saved max_length overrides.
        hf_model.generation_config = GenerationConfig(
            bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id, pad_token_id=hf_cfg.pad_token_id)
    return hf_model.eval()


def save_tokenizer(tokenizer_model: Path, tokenizer_type: str, out: Path) -> None:
    """The run's tokenizer as a `tokenizer.json` that encodes exactly as training did (same ids for any text), loaded
    by AutoTokenizer as a PreTrainedTokenizerFast; a sentencepiece model also ships as `tokenizer.model` (what
    megamoe's import reads). No BOS is added, as in pre-training; the end-of-document token is the EOS; the `<mask>`
    piece of megamoe's tokenizers is the mask token, for encoders."""
    from megamoe.data.tokenizer import MASK_PIECE, HuggingFaceTokenizer, sentencepiece_special_pieces, tokenizer_file

    if tokenizer_type == "HuggingFaceTokenizer":
        shutil.copy(tokenizer_file(tokenizer_model), out / "tokenizer.json")
        tokenizer = HuggingFaceTokenizer(out / "tokenizer.json")
        pieces = {"eos_token": tokenizer.eod, "pad_token": tokenizer.pad, "mask_token": tokenizer.mask}
        # Only tokens the file already matches whole: transformers adds any other token named here as a special
        # token, and a literal "<mask>" in a text would then encode otherwise than in training.
        special = {name: tokenizer.id_to_piece(i) for name, i in pieces.items()
                   if i is not None and tokenizer.is_added_token(i)}
    else:
        shutil.copy(tokenizer_model, out / "tokenizer.model")
        (out / "tokenizer.json").write_text(sentencepiece_as_tokenizer_json(tokenizer_model))
        special = sentencepiece_special_pieces(tokenizer_model)
        if HuggingFaceTokenizer(out / "tokenizer.json").mask is not None:
            special["mask_token"] = MASK_PIECE
    # split_special_tokens: a special token's text inside a document is text, as in training (sentencepiece never
    # matches its control pieces in text; megamoe's HuggingFaceTokenizer encodes special tokens' text as text).
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "split_special_tokens": True, **special}, indent=2))


TOKENIZER_PROBES = ("To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer",
                    "def f(x):\n\tif x:\n        return  x  # two spaces\n\n\n    pass\r\n",
                    "Ελληνικά, русский, 日本語, العربية, हिन्दी — emoji 😀👍🏽, NBSP\u00a0and\u2003em space",
                    "Cafe\u0301 (a combining accent: NFC would merge it), ﬁ ligature, ① circled, ｆｕｌｌ width")
"""Texts the exported AutoTokenizer must encode as the run's tokenizer does (whitespace, code, scripts, and
characters a Unicode normaliser would change)."""


def warn_if_auto_tokenizer_differs(out: Path, tokenizer_model: Path, tokenizer_type: str) -> None:
    """Warn when transformers' AutoTokenizer, which picks its class from config.json's model_type and may rebuild
    the tokenizer its own way (model_type qwen2 always gets Qwen's pre-tokenizer and NFC normaliser), encodes
    TOKENIZER_PROBES otherwise than the run's tokenizer; PreTrainedTokenizerFast reads tokenizer.json as written."""
    from transformers import AutoTokenizer

    from megamoe.data.tokenizer import load_tokenizer

    try:
        # trust_remote_code: a custom-code export's config.json names megamoe's own code, written here a moment
        # ago (without it transformers would stop and ask on the terminal).
        auto = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
        trained = load_tokenizer(tokenizer_model, tokenizer_type)
        differ = sum(auto(text, add_special_tokens=False)["input_ids"] != trained.tokenize(text)
                     for text in TOKENIZER_PROBES)
    except Exception as err:  # noqa: BLE001 - a check of a finished export: say it, never fail the export
        get_logger().warning(f"{out}: AutoTokenizer could not be checked against the run's tokenizer ({err})")
        return
    if differ:
        get_logger().warning(
            f"{out}: AutoTokenizer loads this tokenizer as {type(auto).__name__}, which encodes {differ} of "
            f"{len(TOKENIZER_PROBES)} probe texts otherwise than training did; load it with "
            f"PreTrainedTokenizerFast.from_pretrained('{out}') for the ids the model was trained on")


def sentencepiece_as_tokenizer_json(model: Path) -> str:
    """A sentencepiece model as a `tokenizers` JSON that follows the model's own settings (normaliser, dummy
    prefix, byte fallback, user-defined pieces), built by transformers' converter."""
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model.read_bytes())
    if proto.trainer_spec.model_type == 2:  # BPE: merges are derived from the pieces and their scores
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    else:
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    if tokenizer is None:
        raise ValueError(f"{model}: a sentencepiece model of type {proto.trainer_spec.model_type} has no Hugging "
                         "Face equivalent; train a bpe or unigram model")
    return tokenizer.to_str()


def import_hf(hf_dir: str, save_dir: str, base_config: str | None, overrides: list[str]) -> Path:
    """A weights-only megamoe checkpoint (iteration 0) and `finetune.yaml` from a directory of one of
    native.FAMILIES or megamoe's custom code, with its tokenizer: a sentencepiece `tokenizer.model`, else a
    `tokenizer.json`. The run's other settings (data, train, parallel) come from `base_config` and `overrides`; its
    model section from config.json. Any TP/EP layout then loads the checkpoint (weights are re-cut at load time).
    No code from the directory is run."""
    source = Path(hf_dir)
    integrity.require_new_directory(save_dir, "--save")
    if integrity.holds_checkpoints(source) or (source / integrity.MANIFEST).is_file():
        raise ValueError(f"--load-hf {source} is a megamoe checkpoint, not a Hugging Face directory; train from it "
                         "with checkpoint.load, or export it with --load")
    tokenizer_model, tokenizer_type, tokens = _hf_tokenizer(source)
    hf_cfg = _read_hf_config(source)
    if tokens > hf_cfg.vocab_size:
        raise ValueError(f"{source}: the tokenizer has {tokens} tokens, more than the model's vocab_size "
                         f"{hf_cfg.vocab_size}: its last ids would have no embedding row")
    vocab_size = hf_cfg.vocab_size  # may exceed the tokenizer's (Qwen pads its vocabulary): every row is kept
    mapping = custom if hf_cfg.model_type == "megamoe" else native
    save = Path(save_dir)
    paths = [f"data.tokenizer_model={tokenizer_model}", f"data.tokenizer_type={tokenizer_type}",
             *([f"model.vocab_size={vocab_size}"] if vocab_size != tokens else []),
             f"checkpoint.load={save}", f"checkpoint.save={save}", f"logging.log_dir={save / 'logs'}"]
    cfg = config.load(base_config, [*paths, *mapping.run_overrides(hf_cfg), *overrides])
    mapping.check_exportable(cfg)  # what imports must export back
    model = one_process_model(cfg, vocab_size)
    hf_weights, arch = _read_hf_weights(source, hf_cfg), mapping.arch(cfg, vocab_size)
    state = mapping.from_hf(hf_weights, arch)
    own = model.state_dict()
    # transformers reports unexpected tensors of native models; megamoe's files are read here, so check here:
    # names no mapping consumed, and names mapped (MoE blocks are copied by prefix) that the model lacks.
    if mapping is custom and (unused := sorted((hf_weights.keys() - mapping.to_hf(state, arch).keys())
                                               | (state.keys() - own.keys()))):
        raise ValueError(f"{source} holds {len(unused)} tensors the model its config.json describes does not use, "
                         f"e.g. {unused[:3]}: the config and the weights disagree")
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state:  # megatron's padded vocabulary: zero rows beyond the tokenizer's
            state[name] = torch.cat([state[name], own[name].new_zeros(own[name].shape[0] - vocab_size,
                                                                      own[name].shape[1])])
    needed = {n for n, t in own.items() if isinstance(t, torch.Tensor) and n.rsplit(".", 1)[-1]
              not in custom.TRAINING_ONLY}
    if missing := sorted(needed - state.keys()):
        raise ValueError(f"{source} lacks {len(missing)} of the model's weights, e.g. {missing[:3]}")
    model.load_state_dict(state, strict=False)
    single = dataclasses.replace(cfg, parallel=config.ParallelConfig())
    from megamoe.parallel.groups import ParallelGroups

    tag_dir = checkpoint.save_weights_only(model, single, save, ParallelGroups.single_process())
    (save / "finetune.yaml").write_text(config.dump(cfg))
    get_logger().info(f"imported {source} ({hf_cfg.model_type}) into {tag_dir}; train with --config "
                      f"{save / 'finetune.yaml'}")
    return tag_dir


def _hf_tokenizer(source: Path) -> tuple[Path, str, int]:
    """The directory's tokenizer file, its type and vocabulary size (ValueError in one line if it has none, or a
    broken one)."""
    from megamoe.data.tokenizer import tokenizer_problem, vocab_size

    for name, kind in (("tokenizer.model", "SentencePieceTokenizer"), ("tokenizer.json", "HuggingFaceTokenizer")):
        if (source / name).exists():
            if problem := tokenizer_problem(source / name, kind):
                raise ValueError(problem)
            return source / name, kind, vocab_size(source / name, kind)
    raise FileNotFoundError(f"{source} has neither tokenizer.model (sentencepiece) nor tokenizer.json: megamoe "
                            "trains with the checkpoint's own tokenizer")


def _read_hf_config(source: Path):
    """The directory's transformers config; megamoe's own class for its custom code (never the copy there)."""
    config_file = source / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{source} has no config.json: pass a Hugging Face model directory")
    if json.loads(config_file.read_text()).get("model_type") == "megamoe":
        from megamoe.hf.remote.configuration_megamoe import MegamoeConfig

        return MegamoeConfig.from_pretrained(source)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source)


def _read_hf_weights(source: Path, hf_cfg) -> dict[str, torch.Tensor]:
    """fp32 tensors in transformers' in-memory names: native models through transformers (which converts its
    on-disk expert layouts), megamoe's straight from the safetensors files."""
    if hf_cfg.model_type != "megamoe":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    from safetensors.torch import load_file

    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source} holds no .safetensors weights")
    return {name: t.float() if t.is_floating_point() else t for f in files for name, t in load_file(f).items()}
