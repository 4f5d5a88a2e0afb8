"""DA-MoE in the variant comparison: a causal GPT with predicted importance and a running budget, and the
paper's encoder setting (attention-received importance, batch budget); the K histogram and each token's
importance and K on sample sentences; the claim: at or below top-k at equal mean K."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from megamoe.studies.compare_report import mean_ppl
from megamoe.train.loop import causal_mask, is_causal
from megamoe.variants.base import Study
from megamoe.variants.dynamic.layer import DynamicMoE

DYNAMIC = ["moe.variant=dynamic", "moe.num_experts=8", "moe.ffn_hidden_size=176", "moe.k_min=1", "moe.k_max=4",
           "moe.budget_k_mean=2"]
SAMPLE_SENTENCES = ("To be, or not to be, that is the question.",
                    "Now is the winter of our discontent made glorious summer by this sun of York.",
                    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.")
BASELINES = {"dynamic": "top2", "dynamic_encoder": "top2_encoder"}
"""Each DA-MoE run's top-k baseline at the same mean K (the top-k study's runs)."""


def evaluate(name: str, trainer, final: dict, log_dir: Path) -> dict:
    return {"k_histogram": _k_histogram(log_dir / "metrics.jsonl"),
            "importance": token_importance(trainer, list(SAMPLE_SENTENCES))}


def _k_histogram(path: Path) -> list[float]:
    """Share of tokens with K = 0, 1, ... experts, averaged over the MoE layers, at the last logged step."""
    last = [json.loads(line) for line in path.read_text().splitlines() if '"train/loss"' in line][-1]
    by_layer: dict[str, dict[int, float]] = {}
    for key, value in last.items():
        if key.startswith("moe/layer") and "/k" in key and key.endswith("_frac") and key.split("/k")[-1][0].isdigit():
            layer, k = key.split("/")[1], int(key.split("/k")[-1].removesuffix("_frac"))
            by_layer.setdefault(layer, {})[k] = value
    if not by_layer:
        return []
    width = max(max(h) for h in by_layer.values()) + 1
    return [statistics.mean(h.get(k, 0.0) for h in by_layer.values()) for k in range(width)]


@torch.no_grad()
def token_importance(trainer, sentences: list[str]) -> list[list[tuple[str, float, int]]]:
    """(token text, importance, experts) of every token of each sentence, at the first DA-MoE layer (evaluation)."""
    from megamoe.data.tokenizer import load_tokenizer

    engine = trainer.engine
    tokenizer = load_tokenizer(trainer.cfg.data.tokenizer_model, trainer.cfg.data.tokenizer_type)
    layer = next(m for m in engine.module.modules() if isinstance(m, DynamicMoE))
    seen = {}

    def record(module, args, kwargs) -> None:
        x_TD, tokens = args[0], args[1] if len(args) > 1 else kwargs.get("tokens")
        s_T, _ = module._importance(x_TD, tokens)
        seen["s"], seen["k"] = s_T.float(), module._experts_per_token(s_T, tokens)

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    engine.eval()
    out = []
    try:
        for sentence in sentences:
            ids = tokenizer.tokenize(sentence)
            tokens = torch.tensor([ids], device=engine.device)
            mask = causal_mask(len(ids), engine.device) if is_causal(trainer.cfg) else None
            engine(tokens, torch.arange(len(ids), device=engine.device)[None], mask)
            pieces = [tokenizer.detokenize([i]) for i in ids]
            out.append([(p, round(float(s), 3), int(k)) for p, s, k in zip(pieces, seen["s"], seen["k"], strict=True)])
    finally:
        handle.remove()
        engine.train()
    return out


def claims(v: dict) -> list[tuple[str, bool, str]]:
    out = []
    for dynamic, topk in BASELINES.items():
        if dynamic in v and topk in v:
            d, t = mean_ppl(v[dynamic]), mean_ppl(v[topk])
            out.append((f"DA-MoE ({dynamic}) at or below top-k at equal mean K", d <= t,
                        f"DA-MoE {d:.1f} vs top-2 {t:.1f}"))
    return out


def report(v: dict) -> list[str]:
    lines = []
    for name in BASELINES:
        if name in v:
            run = v[name][0]
            hist = ", ".join(f"K={k}: {100 * share:.0f} %" for k, share in enumerate(run.extra["k_histogram"]))
            lines += ["", f"DA-MoE {name}: K histogram (last training step, seed {run.seed}): {hist}", ""]
            for sentence in run.extra["importance"]:
                lines.append("    " + " ".join(f"{piece}({s:.2f},K={k})" for piece, s, k in sentence))
    return lines


STUDY = Study(runs={"dynamic": [*DYNAMIC, "moe.importance_mode=predicted", "moe.budget=running"],
                    "dynamic_encoder": [*DYNAMIC, "moe.importance_mode=attention_received", "moe.budget=batch",
                                        "model.objective=masked_lm"]},
              evaluate=evaluate, claims=claims, report=report,
              gaps=tuple((run, baseline, 0.0) for run, baseline in BASELINES.items()))
