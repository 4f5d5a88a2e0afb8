"""Hugging Face families both ways, built offline from transformers' own config and model classes with a
`tokenizer.json` trained here (no tokenizer.model, as Qwen and OLMoE checkpoints ship): import -> logits equal to
transformers' (fp32, ≤ 1e-4) in one process, under TP=2 and, for MoE families, EP=2 -> 10 training steps at TP=2
-> export to the family's own class, whose logits equal the trained model's and whose tokenizer is the imported one;
a dense import upcycles into a top-2 MoE with the same logits.
A family megatron-core cannot express is refused in one line naming the feature."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, spawn

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
FAMILIES = {  # model_type: (transformers config class, its settings beyond TINY, layouts beyond one process)
    "llama": ("LlamaConfig", {}, ("tp2",)),
    "qwen2": ("Qwen2Config", {}, ("tp2",)),  # biases on q, k and v
    "qwen3": ("Qwen3Config", {}, ("tp2",)),  # per-head q/k norms
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, ("tp2", "ep2")),
    "qwen2_moe": ("Qwen2MoeConfig", {**MOE, "num_experts": 4, "shared_expert_intermediate_size": 48,
                                     "mlp_only_layers": [0], "qkv_bias": True, "norm_topk_prob": False},
                  ("tp2", "ep2")),
    "qwen3_moe": ("Qwen3MoeConfig", {**MOE, "num_experts": 4, "norm_topk_prob": True}, ("tp2", "ep2")),  # q/k norm
}
PADDED_VOCAB = {"qwen2_moe": 40, "qwen3_moe": 40}
"""Embedding rows beyond the tokenizer's, as Qwen checkpoints have (151,936 rows for 151,665 tokens)."""
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "mixtral": "MixtralForCausalLM",
           "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
LAYOUTS = {"tp2": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
           "ep2": ["parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"]}
TOKENS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_data(tiny_data, tmp_path_factory) -> dict[str, str]:
    """tiny_data's corpus through a byte-level BPE `tokenizer.json` trained here, as an indexed dataset."""
    from megamoe.data import preprocess

    root = tmp_path_factory.mktemp("hf_data")
    kind = "HuggingFaceTokenizer"
    tokenizer = preprocess.train_tokenizer([tiny_data["corpus"]], str(root / "bpe"), vocab_size=600,
                                           tokenizer_type=kind)
    prefix = preprocess.encode_corpus([tiny_data["corpus"]], tokenizer, str(root / "slice"),
                                      tokenizer_type=kind).prefix
    data = {"root": str(root), "corpus": tiny_data["corpus"], "tokenizer": tokenizer, "prefix": prefix}
    return {"bpe": data, "qwen": _qwen_style(data, root / "qwen")}


def _qwen_style(data: dict, root: Path) -> dict:
    """The same vocabulary and merges as Qwen ships them (Qwen's pre-tokenizer regex, NFC): transformers always
    loads a model_type qwen2 directory's tokenizer this way, so a Qwen2 checkpoint carries one."""
    from transformers import Qwen2Tokenizer

    from megamoe.data import preprocess

    model = json.loads(Path(data["tokenizer"]).read_text())["model"]
    Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], unk_token="<unk>",
                   eos_token="</s>", pad_token="<pad>").save_pretrained(root)
    tokenizer = str(root / "tokenizer.json")
    prefix = preprocess.encode_corpus([data["corpus"]], tokenizer, str(root / "slice"),
                                      tokenizer_type="HuggingFaceTokenizer").prefix
    return {**data, "root": str(root), "tokenizer": tokenizer, "prefix": prefix}


def hf_directory(family: str, data: dict, out: Path) -> Path:
    """A tiny random model of `family` saved as transformers saves it, with the test tokenizer as tokenizer.json."""
    import transformers

    from megamoe.data.tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(data["tokenizer"])
    config_class, settings, _ = FAMILIES[family]
    cfg = getattr(transformers, config_class)(vocab_size=tokenizer.vocab_size + PADDED_VOCAB.get(family, 0),
                                              pad_token_id=tokenizer.pad,
                                              eos_token_id=tokenizer.eod, **TINY, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms and biases away from their initial ones and zeros: a mix-up must show
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out)
    shutil.copy(data["tokenizer"], out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def hf_logits(hf_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(TOKENS).logits


def _import(hf_dir: str, save: str, data: dict) -> None:
    from megamoe.convert import export

    export.import_hf(hf_dir, save, str(ROOT / "configs" / "tiny-dense.yaml"), _data_overrides(data))


def _data_overrides(data: dict) -> list[str]:
    return [f"data.data_path=[{data['prefix']}]", "data.seq_length=32", "data.split=90,10,0", "data.num_workers=0",
            "train.micro_batch_size=4", "train.global_batch_size=8", "train.lr=1e-3", "train.lr_warmup_iters=1",
            "train.eval_iters=0", "train.log_interval=1", "logging.wandb=false", "logging.tensorboard=false"]


def _logits_then_train(load: str, layout: list[str], data: dict, steps: int, save: str | None) -> dict:
    """The imported model's logits under `layout` (gathered over TP, vocabulary padding dropped); then `steps`
    training steps and a checkpoint in `save`."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megamoe import config
    from megamoe.data.loader import build_loader
    from megamoe.data.tokenizer import vocab_size
    from megamoe.train import saving, startup
    from megamoe.train.loop import build_trainer, causal_mask, train_step

    finetune = Path(load) / "finetune.yaml"
    cfg = config.load(finetune, [*layout, f"train.train_iters={max(steps, 2)}",
                                 f"checkpoint.save={save or Path(load).parent / 'unused'}"])
    trainer = build_trainer(cfg, startup.check(cfg))
    model = trainer.engine.module.eval()
    with torch.no_grad():
        logits = model(TOKENS, torch.arange(24).expand(2, 24), causal_mask(24, TOKENS.device))
        vocab = cfg.model.vocab_size or vocab_size(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
        logits = gather_from_tensor_model_parallel_region(logits)[..., :vocab]
    model.train()
    batches = iter(build_loader(trainer.datasets.train, 0, cfg, trainer.groups))
    losses = [train_step(trainer, batches)["train/loss"] for _ in range(steps)]
    if save:
        saving.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
    return {"logits": logits if dist.get_rank() == 0 else None, "losses": losses}


def _upcycle(load: str, save: str) -> None:
    from megamoe.convert import upcycle

    upcycle.upcycle(load, save, ["moe.num_experts=4", "moe.router_topk=2", "train.train_iters=2"])


def _export_and_score(load: str, out: str) -> dict:
    """Export; the exported model's logits against megamoe's trained model (one process, merged weights)."""
    from megamoe import config
    from megamoe.convert import export
    from megamoe.data.tokenizer import vocab_size
    from megamoe.train import checkpoint
    from megamoe.train.loop import causal_mask

    export.export_hf(load, out)
    tag = checkpoint.latest_tag_dir(load)
    cfg = config.load(tag / "config.yaml")
    vocab = cfg.model.vocab_size or vocab_size(cfg.data.tokenizer_model, cfg.data.tokenizer_type)
    model = export.one_process_model(cfg, vocab)
    merged = export.merged_state_dict(tag, model)
    own = model.state_dict()
    model.load_state_dict({k: torch.cat([v[:vocab], own[k][vocab:]]) if v.shape != own[k].shape else v
                           for k, v in merged.items()}, strict=False)
    with torch.no_grad():
        ref = model.eval()(TOKENS, torch.arange(24).expand(2, 24), causal_mask(24, TOKENS.device))[..., :vocab]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    return {"class": type(hf).__name__, "logits_diff": (ref - hf_logits(Path(out))).abs().max().item()}


def tokenizer_mismatches(out: Path, tokenizer_model: str, texts: list[str]) -> int:
    """Texts the exported AutoTokenizer encodes otherwise than the training tokenizer."""
    from transformers import AutoTokenizer

    from megamoe.data.tokenizer import load_tokenizer

    exported, trained = AutoTokenizer.from_pretrained(out), load_tokenizer(tokenizer_model, "HuggingFaceTokenizer")
    return sum(exported(text)["input_ids"] != trained.tokenize(text) for text in texts)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_imports_trains_and_exports(hf_data, tmp_path, family):
    from megamoe.data.corpus import read_documents
    from tests.unit.test_tokenizers import HOSTILE

    hf_data = hf_data["qwen" if family == "qwen2" else "bpe"]
    source = hf_directory(family, hf_data, tmp_path / "hf")
    want = hf_logits(source)
    imported, trained = tmp_path / "imported", tmp_path / "trained"
    spawn(_import, 1, str(source), str(imported), hf_data)
    row = {"one process": (spawn(_logits_then_train, 1, str(imported), [], hf_data, 0, None)[0]["logits"] - want)}
    layouts = FAMILIES[family][2]
    for layout in layouts:
        steps, save = (10, str(trained)) if layout == "tp2" else (0, None)
        got = spawn(_logits_then_train, 2, str(imported), LAYOUTS[layout], hf_data, steps, save)[0]
        row[layout] = got["logits"] - want
        if steps:
            losses = got["losses"]
    if "num_experts" not in str(FAMILIES[family][1]):  # a dense import upcycles into a top-2 MoE of FFN copies,
        spawn(_upcycle, 1, str(imported), str(tmp_path / "upcycled"))  # whose output is the dense model's
        row["upcycled"] = spawn(_logits_then_train, 1, str(tmp_path / "upcycled"), [], hf_data, 0, None)[0][
            "logits"] - want
    exported = spawn(_export_and_score, 1, str(trained), str(tmp_path / "exported"))[0]
    texts = [*read_documents(hf_data["corpus"]), HOSTILE]
    mismatches = tokenizer_mismatches(tmp_path / "exported", hf_data["tokenizer"], texts)
    diffs = {name: diff.abs().max().item() for name, diff in row.items()}
    print(f"{family}: import logits max|diff| {diffs}; 10 steps at TP=2 loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"export {exported['class']} logits max|diff| {exported['logits_diff']:.1e}; tokenizer "
          f"{mismatches}/{len(texts)} texts differ")
    assert all(diff <= 1e-4 for diff in diffs.values()), diffs
    assert want.std() > 0.1
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert exported["class"] == CLASSES[family] and exported["logits_diff"] <= 1e-4
    assert mismatches == 0


@pytest.mark.parametrize("case", ["no tokenizer", "corrupt tokenizer.json", "tokenizer larger than the model"])
def test_an_unusable_hugging_face_directory_is_one_line_and_writes_nothing(hf_data, tmp_path, capsys, case):
    from tests.helpers import load_tool

    source = hf_directory("llama", hf_data["bpe"], tmp_path / "hf")
    if case == "no tokenizer":
        (source / "tokenizer.json").unlink()
        expected = f"{source} has neither tokenizer.model (sentencepiece) nor tokenizer.json"
    elif case == "corrupt tokenizer.json":
        (source / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
        expected = f"'{source / 'tokenizer.json'}' is not a Hugging Face tokenizer.json"
    else:
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] - 10}))
        expected = (f"{source}: the tokenizer has {config['vocab_size']} tokens, more than the model's vocab_size "
                    f"{config['vocab_size'] - 10}: its last ids would have no embedding row")
    capsys.readouterr()  # transformers' progress bars while the directory was written
    code = load_tool("convert_checkpoint").main(["--load-hf", str(source), "--save", str(tmp_path / "imported"),
                                                 "--config", str(ROOT / "configs" / "tiny-dense.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"megamoe: convert_checkpoint: {expected}"), err
    assert not (tmp_path / "imported").exists()


def test_olmoe_is_refused_naming_its_whole_width_query_key_norm(hf_data, tmp_path):
    import subprocess
    import sys

    import transformers

    from megamoe.data.tokenizer import HuggingFaceTokenizer

    hf_data = hf_data["bpe"]
    source = tmp_path / "olmoe"
    tokenizer = HuggingFaceTokenizer(hf_data["tokenizer"])
    cfg = transformers.OlmoeConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad,
                                   eos_token_id=tokenizer.eod, num_experts=4, **{**TINY, **MOE})
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(source)
    shutil.copy(hf_data["tokenizer"], source / "tokenizer.json")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--load-hf", str(source),
                           "--save", str(tmp_path / "imported"), "--config", str(ROOT / "configs" / "tiny-dense.yaml"),
                           f"data.data_path=[{hf_data['prefix']}]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "megamoe: convert_checkpoint: model_type olmoe normalises queries and keys over all heads together "
        "(q_norm of width 64); megatron-core's qk_layernorm normalises each head: megamoe cannot express it"]
    assert not (tmp_path / "imported").exists()
