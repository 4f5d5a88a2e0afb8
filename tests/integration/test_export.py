"""megamoe <-> Hugging Face. Checkpoints trained with TP=2 (dense: Llama), EP=2 and PP=2 (top-k MoE: Mixtral; with a
gated shared expert and a dense first layer: Qwen2-MoE) are merged from their files alone into exactly the trained
weights; transformers' logits equal megamoe's (fp32, one process, the merged weights) within 1e-4; generate()
runs offline; HF -> megamoe -> HF gives identical tensors, and the imported checkpoint loads under TP=2 x EP=2.
Every variant without a native class (DA-MoE encoder and GPT, PEER, CartesianMoE, MPOE, top-k with options
Mixtral lacks), trained with TP=2 x EP=2, exports as custom code whose logits equal megamoe's and which round-trips
exactly; what neither form expresses is refused in one line."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import spawn, train_steps

MODELS = {
    "llama_tp2": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "mixtral_ep2": ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
                    "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"],
    "mixtral_pp2": ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
                    "parallel.pipeline_model_parallel_size=2", "train.micro_batch_size=4", "train.global_batch_size=8",
                    "deepspeed.zero_stage=1"],
    "qwen2_moe_ep2": ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64", "moe.layer_freq=[0,1]",
                      "moe.router_pre_softmax=true", "moe.shared_expert_intermediate_size=96",
                      "moe.shared_expert_combine=gate", "parallel.expert_model_parallel_size=2",
                      "deepspeed.zero_stage=2"],
}
CLASSES = {"llama_tp2": "LlamaForCausalLM", "mixtral_ep2": "MixtralForCausalLM", "mixtral_pp2": "MixtralForCausalLM",
           "qwen2_moe_ep2": "Qwen2MoeForCausalLM"}
TP2_EP2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
           "parallel.expert_model_parallel_size=2", "train.micro_batch_size=4", "deepspeed.zero_stage=2"]
CUSTOM = {  # each trained with TP=2 x EP=2 (4 processes)
    "dynamic_encoder": ["moe.variant=dynamic", "moe.num_experts=4", "moe.k_max=3", "moe.ffn_hidden_size=64",
                        "model.objective=masked_lm", "moe.budget=batch", "moe.budget_k_mean=2"],
    "dynamic_gpt": ["moe.variant=dynamic", "moe.num_experts=4", "moe.k_max=3", "moe.ffn_hidden_size=64",
                    "moe.importance_mode=predicted", "moe.budget=running", "moe.budget_k_mean=2"],
    "peer": ["moe.variant=peer", "moe.num_experts=256", "moe.num_heads=2", "moe.topk_per_head=4", "moe.key_dim=16"],
    "cartesian": ["moe.variant=cartesian", "moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
                  "moe.shared_expert_intermediate_size=64"],
    "mpo": ["moe.variant=mpo", "moe.num_experts=4", "moe.ffn_hidden_size=48", "moe.aux_init_noise_std=0.02"],
    "topk_residual_bias": ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
                           "moe.shared_expert_intermediate_size=64", "moe.shared_expert_combine=residual",
                           "moe.router_enable_expert_bias=true", "moe.router_bias=true"],
}


def _train(data: dict, save: str, overrides: list[str]) -> dict:
    from megamoe.train import saving

    run = train_steps(data, ["train.train_iters=2", f"checkpoint.save={save}", *overrides], 2)
    trainer = run.pop("trainer")
    saving.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
    return run


def _export_and_compare(load: str, out: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from megamoe import config
    from megamoe.convert import export
    from megamoe.data.tokenizer import spm_vocab_size
    from megamoe.train import checkpoint
    from megamoe.train.loop import causal_mask

    export.export_hf(load, out)
    tag = checkpoint.latest_tag_dir(load)
    cfg = config.load(tag / "config.yaml")
    causal = cfg.model.objective == "causal_lm"
    vocab = spm_vocab_size(cfg.data.tokenizer_model)
    model = export.one_process_model(cfg, vocab)
    merged = export.merged_state_dict(tag, model)
    own = model.state_dict()
    # The checkpoint's vocabulary padding follows its TP size: give this model its own rows beyond the vocab.
    model.load_state_dict({k: torch.cat([v[:vocab], own[k][vocab:]]) if v.shape != own[k].shape else v
                           for k, v in merged.items()}, strict=False)
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mask = causal_mask(24, tokens.device) if causal else None  # the encoder attends both ways, unmasked
        ref = model.eval()(tokens, torch.arange(24).expand(2, 24), mask)[..., :vocab]
        auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
        # trust_remote_code: megamoe's custom code (copied into `out` by the export); native classes ignore it.
        hf = auto.from_pretrained(out, trust_remote_code=True).eval()
        got = hf(tokens).logits
        generated = hf.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False).shape[1] if causal else None
    params = {n for n, _ in model.named_parameters()}
    import json
    from pathlib import Path

    modes = {path.name: path.stat().st_mode & 0o777 for path in Path(out).iterdir() if path.is_file()}
    generation = json.loads((Path(out) / "generation_config.json").read_text()) if causal else {}
    return {"merged": {k: v for k, v in merged.items() if k in params}, "class": type(hf).__name__,
            "modes": modes, "generation": generation,
            "logits_diff": (ref - got).abs().max().item(), "logits_std": ref.std().item(), "generated": generated,
            "tokenizer": _tokenizer_agrees(out, cfg.data.tokenizer_model)}


def _tokenizer_agrees(out: str, tokenizer_model: str) -> bool:
    """The exported tokenizer encodes as the run's sentencepiece model (multi-line text, indentation, scripts,
    literal special pieces) and names its <mask> piece."""
    import sentencepiece
    from transformers import AutoTokenizer

    from megamoe.data.tokenizer import spm_mask_id
    from tests.unit.test_tokenizers import HOSTILE

    hf_tok, spm = AutoTokenizer.from_pretrained(out), sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    texts = ["To be, or not to be: that is the question.", "Line one\n  indented two\n\tTabbed", HOSTILE]
    return (all(hf_tok(text)["input_ids"] == spm.encode(text) for text in texts)
            and hf_tok.mask_token_id == spm_mask_id(tokenizer_model))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_equals_the_trained_model(tiny_data, tmp_path, name):
    save = str(tmp_path / "checkpoints")
    trained = spawn(_train, 2, tiny_data, save, MODELS[name])[0]
    got = spawn(_export_and_compare, 1, save, str(tmp_path / "hf"))[0]
    print(f"{name}: {got['class']}, max |logits diff| {got['logits_diff']:.1e}")
    assert got["class"] == CLASSES[name]
    assert sorted(got["merged"]) == sorted(trained["full"])
    for key, full in trained["full"].items():
        assert torch.equal(got["merged"][key], full), key  # shards merged into exactly the trained tensors
    assert got["logits_diff"] <= 1e-4
    assert got["generated"] == 9
    assert got["tokenizer"]
    assert len(set(got["modes"].values())) == 1, got["modes"]  # the weights as readable as the other files
    assert "max_length" not in got["generation"]  # would make transformers warn on every generate()


@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_custom_code_export_equals_the_trained_model_and_round_trips(tiny_data, tmp_path, monkeypatch, name):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # where transformers copies the code
    save = str(tmp_path / "checkpoints")
    trained = spawn(_train, 4, tiny_data, save, [*CUSTOM[name], *TP2_EP2])[0]
    got = spawn(_export_and_compare, 1, save, str(tmp_path / "hf"))[0]
    print(f"{name}: {got['class']}, max |logits diff| {got['logits_diff']:.1e} (logits std {got['logits_std']:.2f})")
    causal = "model.objective=masked_lm" not in CUSTOM[name]
    assert got["class"] == ("MegamoeForCausalLM" if causal else "MegamoeForMaskedLM")
    assert sorted(got["merged"]) == sorted(trained["full"])
    for key, full in trained["full"].items():
        assert torch.equal(got["merged"][key], full), key
    assert got["logits_diff"] <= 1e-4 and got["logits_std"] > 0.1
    assert got["generated"] == (9 if causal else None)
    assert got["tokenizer"]
    first, again = spawn(_round_trip, 1, str(tmp_path / "hf"), str(tmp_path / "imported"),
                         str(tmp_path / "hf_again"), tiny_data["prefix"])[0]
    assert sorted(first) == sorted(again)
    for key, tensor in first.items():
        assert torch.equal(again[key], tensor), key
    if name == "mpo":  # one variant suffices: the check does not depend on the layer
        error = spawn(_import_with_a_stray_tensor, 1, str(tmp_path / "hf"), str(tmp_path / "stray_import"),
                      tiny_data["prefix"])[0]
        assert "tensors the model its config.json describes does not use" in error and "undeclared" in error, error


def _round_trip(hf_dir: str, save: str, hf_again: str, data_prefix: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    from megamoe.convert import export
    from tests.helpers import ROOT

    export.import_hf(hf_dir, save, str(ROOT / "configs" / "tiny-dense.yaml"), [f"data.data_path=[{data_prefix}]"])
    export.export_hf(save, hf_again)
    return load_file(f"{hf_dir}/model.safetensors"), load_file(f"{hf_again}/model.safetensors")


def _import_with_a_stray_tensor(hf_dir: str, save: str, data_prefix: str) -> str:
    """import_hf of a copy of `hf_dir` whose weights hold one tensor more than its config describes: the error."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from megamoe.convert import export
    from tests.helpers import ROOT

    stray = Path(save).parent / "hf_stray"
    shutil.copytree(hf_dir, stray)
    weights = load_file(f"{stray}/model.safetensors")
    weights["model.layers.1.mlp.undeclared.weight"] = torch.zeros(2, 2)
    save_file(weights, f"{stray}/model.safetensors", metadata={"format": "pt"})
    try:
        export.import_hf(stray, save, str(ROOT / "configs" / "tiny-dense.yaml"), [f"data.data_path=[{data_prefix}]"])
    except ValueError as err:
        return str(err)
    return "imported"


def test_what_no_export_expresses_is_refused_in_one_line(tiny_data, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    save = str(tmp_path / "checkpoints")
    spawn(_train, 1, tiny_data, save, ["moe.num_experts=4", "moe.expert_capacity_factor=1.0"])
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--load", save, "--save",
                           str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "megamoe: convert_checkpoint: moe.expert_capacity_factor=1.0: exported models route dropless (which copies "
        "a capacity drops depends on the whole batch)"]


def _loaded_weights(data: dict, load: str, overrides: list[str]) -> dict:
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer
    from tests.helpers import full_params, tiny_config

    cfg = tiny_config(data, "train.train_iters=2", f"checkpoint.load={load}", *overrides)
    return full_params(build_trainer(cfg, startup.check(cfg)))


@pytest.mark.parametrize("name", ["llama_tp2", "mixtral_pp2"])
def test_a_tp2_or_pp2_checkpoint_loads_in_one_process_with_the_same_weights(tiny_data, tmp_path, name):
    """Another TP or PP size loads the weights (TP shards merged and re-cut, vocabulary padding rows refitted;
    each layer from the stage that held it)."""
    save = str(tmp_path / "checkpoints")
    trained = spawn(_train, 2, tiny_data, save, MODELS[name])[0]["full"]
    moe = [o for o in MODELS[name] if o.startswith("moe.")]
    loaded = spawn(_loaded_weights, 1, tiny_data, save, moe)[0]
    assert sorted(loaded) == sorted(trained)
    for key, want in trained.items():
        rows = min(want.shape[0], loaded[key].shape[0])
        assert torch.equal(loaded[key][:rows], want[:rows]), key


@pytest.mark.parametrize("name", ["mixtral_ep2", "qwen2_moe_ep2"])
def test_hf_to_megamoe_to_hf_round_trip_is_identical_and_loads_under_tp2_ep2(tiny_data, tmp_path, name):
    save = str(tmp_path / "checkpoints")
    trained = spawn(_train, 2, tiny_data, save, MODELS[name])[0]["full"]
    spawn(_export_and_compare, 1, save, str(tmp_path / "hf"))
    first, again = spawn(_round_trip, 1, str(tmp_path / "hf"), str(tmp_path / "imported"),
                         str(tmp_path / "hf_again"), tiny_data["prefix"])[0]
    assert sorted(first) == sorted(again)
    for key, tensor in first.items():
        assert torch.equal(again[key], tensor), key
    # The imported TP=1 EP=1 checkpoint under TP=2 x EP=2: the trained weights (vocabulary rows: the real ones).
    moe = [o for o in MODELS[name] if o.startswith("moe.")]
    loaded = spawn(_loaded_weights, 4, tiny_data, str(tmp_path / "imported"), [*moe, *TP2_EP2])[0]
    vocab = first["model.embed_tokens.weight"].shape[0]
    for key, want in trained.items():
        assert torch.equal(loaded[key][:vocab], want[:vocab]), key
