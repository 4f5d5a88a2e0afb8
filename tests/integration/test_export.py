"""megamoe <-> Hugging Face. Checkpoints trained with TP=2 (dense: Llama) and EP=2 (top-k MoE: Mixtral; with a
gated shared expert and a dense first layer: Qwen2-MoE) are merged from their files alone into exactly the trained
weights; transformers' logits equal megamoe's (fp32, one process, the merged weights) within 1e-4; generate()
runs offline; HF -> megamoe -> HF gives identical tensors, and the imported checkpoint loads under TP=2 x EP=2;
unsupported variants are refused."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import spawn, train_steps

MODELS = {
    "llama_tp2": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "mixtral_ep2": ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64",
                    "parallel.expert_model_parallel_size=2", "deepspeed.zero_stage=2"],
    "qwen2_moe_ep2": ["moe.num_experts=4", "moe.router_topk=2", "moe.ffn_hidden_size=64", "moe.layer_freq=[0,1]",
                      "moe.router_pre_softmax=true", "moe.shared_expert_intermediate_size=96",
                      "moe.shared_expert_combine=gate", "parallel.expert_model_parallel_size=2",
                      "deepspeed.zero_stage=2"],
}
CLASSES = {"llama_tp2": "LlamaForCausalLM", "mixtral_ep2": "MixtralForCausalLM",
           "qwen2_moe_ep2": "Qwen2MoeForCausalLM"}


def _train(data: dict, save: str, overrides: list[str]) -> dict:
    from megamoe.train import checkpoint

    run = train_steps(data, ["train.train_iters=2", f"checkpoint.save={save}", *overrides], 2)
    trainer = run.pop("trainer")
    checkpoint.save(trainer.engine, trainer.cfg, trainer.progress, trainer.groups)
    return run


def _export_and_compare(load: str, out: str) -> dict:
    from transformers import AutoModelForCausalLM

    from megamoe import config
    from megamoe.data.tokenizer import spm_vocab_size
    from megamoe.train import checkpoint, export
    from megamoe.train.loop import causal_mask

    export.export_hf(load, out)
    tag = checkpoint.latest_tag_dir(load)
    cfg = config.load(tag / "config.yaml")
    vocab = spm_vocab_size(cfg.data.tokenizer_model)
    model = export.one_process_model(cfg, vocab)
    merged = export.merged_state_dict(tag, model)
    own = model.state_dict()
    # The checkpoint's vocabulary padding follows its TP size: give this model its own rows beyond the vocab.
    model.load_state_dict({k: torch.cat([v[:vocab], own[k][vocab:]]) if v.shape != own[k].shape else v
                           for k, v in merged.items()}, strict=False)
    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.eval()(tokens, torch.arange(24).expand(2, 24), causal_mask(24, tokens.device))[..., :vocab]
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        got = hf(tokens).logits
        generated = hf.generate(tokens[:1, :5], max_new_tokens=4, do_sample=False)
    return {"merged": merged, "class": type(hf).__name__, "logits_diff": (ref - got).abs().max().item(),
            "generated": generated.shape[1]}


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


def test_unsupported_variant_is_refused_in_one_line(tiny_data, tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    save = str(tmp_path / "checkpoints")
    spawn(_train, 1, tiny_data, save, ["moe.variant=mpo", "moe.num_experts=4"])
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "--load", save, "--save",
                           str(tmp_path / "hf")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "megamoe: convert_checkpoint: moe.variant=mpo has no native transformers class (HF custom code export is "
        "not available yet)"]


def _loaded_weights(data: dict, load: str, overrides: list[str]) -> dict:
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer
    from tests.helpers import full_params, tiny_config

    cfg = tiny_config(data, "train.train_iters=2", f"checkpoint.load={load}", *overrides)
    return full_params(build_trainer(cfg, startup.check(cfg)))


def test_a_tp2_checkpoint_loads_under_tp1_with_the_same_weights(tiny_data, tmp_path):
    """Another TP size loads the weights (merged and re-cut; vocabulary padding rows refitted)."""
    save = str(tmp_path / "checkpoints")
    trained = spawn(_train, 2, tiny_data, save, MODELS["llama_tp2"])[0]["full"]
    loaded = spawn(_loaded_weights, 1, tiny_data, save, [])[0]
    assert sorted(loaded) == sorted(trained)
    for key, want in trained.items():
        rows = min(want.shape[0], loaded[key].shape[0])
        assert torch.equal(loaded[key][:rows], want[:rows]), key


def _import(hf_dir: str, save: str, data_prefix: str) -> dict:
    from safetensors.torch import load_file

    from megamoe.train import export
    from tests.helpers import ROOT

    export.import_hf(hf_dir, save, str(ROOT / "configs" / "tiny-dense.yaml"), [f"data.data_path=[{data_prefix}]"])
    return load_file(f"{hf_dir}/model.safetensors")


def _export_again(save: str, hf_again: str) -> dict:
    from safetensors.torch import load_file

    from megamoe.train import export

    export.export_hf(save, hf_again)
    return load_file(f"{hf_again}/model.safetensors")


@pytest.mark.parametrize("name", ["mixtral_ep2", "qwen2_moe_ep2"])
def test_hf_to_megamoe_to_hf_round_trip_is_identical_and_loads_under_tp2_ep2(tiny_data, tmp_path, name):
    save = str(tmp_path / "checkpoints")
    trained = spawn(_train, 2, tiny_data, save, MODELS[name])[0]["full"]
    spawn(_export_and_compare, 1, save, str(tmp_path / "hf"))
    first = spawn(_import, 1, str(tmp_path / "hf"), str(tmp_path / "imported"), tiny_data["prefix"])[0]
    again = spawn(_export_again, 1, str(tmp_path / "imported"), str(tmp_path / "hf_again"))[0]
    assert sorted(first) == sorted(again)
    for key, tensor in first.items():
        assert torch.equal(again[key], tensor), key
    # The imported TP=1 EP=1 checkpoint under TP=2 x EP=2: the trained weights (vocabulary rows: the real ones).
    layout = ["parallel.tensor_model_parallel_size=2", "parallel.expert_model_parallel_size=2",
              "parallel.sequence_parallel=true", "train.micro_batch_size=4", "deepspeed.zero_stage=2"]
    moe = [o for o in MODELS[name] if o.startswith("moe.")]
    loaded = spawn(_loaded_weights, 4, tiny_data, str(tmp_path / "imported"), [*moe, *layout])[0]
    vocab = first["model.embed_tokens.weight"].shape[0]
    for key, want in trained.items():
        assert torch.equal(loaded[key][:vocab], want[:vocab]), key
