"""The papers' comparison at tiny scale: every MoE variant against the dense model and each other at equal active
FFN compute, on one corpus, for one token budget, over several seeds (tools/compare_variants.py).

GPT models (4 layers, d = 128, dense FFN width F = 352; every variant spends ~3 d F multiply-adds per token in its
FFN/MoE, routers aside): dense; top-2 over 8 experts of F/2; fine-grained top-4 over 16 experts of 64 plus a
shared expert of 96; DA-MoE (predicted importance, causal-safe, K in [1, 4] with a running mean-K budget of 2,
experts of F/2); PEER in the middle block (16,384 experts, 8 heads x 8, d_k = 56: 131k multiply-adds) with query
BatchNorm and without it; CartesianMoE (two sub-layers, each top-2 over 8 experts of 64 plus a shared 48);
Switch (top-1 over 8 experts of F, router bias, value-1 gate) and MPOE (the same router and experts as MPOs).
Encoders (masked LM): top-2 and DA-MoE with the paper's attention-received importance (batch budget, mean K 2).
The papers' own evaluations: PEER's expert usage and unevenness with BatchNorm on and off; each token's top-1
expert disabled (moe.drop_top_ranks=1) for top-2, fine-grained and CartesianMoE; DA-MoE's K histogram and the
importance and K of each token of sample sentences; MPOE's MoE-layer parameters against Switch's.

Each variant declares its runs, its paper's evaluations and the claims judged on them in its study
(megamoe/variants/<name>/study.py); this module trains and evaluates them. Everything runs in this process (world
size 1) through megamoe's own trainer; each run logs to
`<out>/runs/<variant>-seed<s>/metrics.jsonl`, and the report goes to `<out>/report.md`, `results.json`,
`loss_curves.png` and `final_ppl.png`, with the seeds, every run's overrides and the git commit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamoe import config, variants

DENSE = "dense"
"""The baseline run: no MoE layers."""


def study_runs() -> dict[str, tuple[str | None, list[str]]]:
    """Every run of the comparison: name -> (its variant, or None for the dense baseline; its overrides). Each
    registered variant brings its own runs (megamoe.variants: Variant.study)."""
    runs: dict[str, tuple[str | None, list[str]]] = {DENSE: (None, [])}
    for name, study in studies().items():
        runs |= {run: (name, overrides) for run, overrides in study.runs.items()}
    return runs


def studies() -> dict[str, variants.Study]:
    """The study of every registered variant that has one."""
    return {name: variants.resolve(v.study) for name, v in variants.VARIANTS.items() if v.study is not None}


@dataclass(frozen=True)
class Budget:
    """Model size and the token budget of every run."""

    steps: int
    micro_batch: int
    global_batch: int
    seq_length: int
    hidden_size: int
    num_layers: int
    eval_interval: int
    eval_iters: int

    def overrides(self) -> list[str]:
        return [f"train.train_iters={self.steps}", f"train.micro_batch_size={self.micro_batch}",
                f"train.global_batch_size={self.global_batch}", f"data.seq_length={self.seq_length}",
                f"model.hidden_size={self.hidden_size}", f"model.num_layers={self.num_layers}",
                f"train.eval_interval={self.eval_interval}", f"train.eval_iters={self.eval_iters}",
                f"train.lr_warmup_iters={max(1, self.steps // 10)}", f"train.log_interval={max(1, self.steps // 30)}"]

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq_length


DEFAULT = Budget(steps=300, micro_batch=8, global_batch=16, seq_length=128, hidden_size=128, num_layers=4,
                 eval_interval=50, eval_iters=32)
QUICK = Budget(steps=6, micro_batch=2, global_batch=2, seq_length=32, hidden_size=64, num_layers=2,
               eval_interval=3, eval_iters=1)
LARGE = Budget(steps=1280, micro_batch=8, global_batch=16, seq_length=256, hidden_size=128, num_layers=4,
               eval_interval=160, eval_iters=32)
"""8.5x DEFAULT's tokens (5.2 M per run) at its model size, longer samples (code files are long); evaluated every
1/8 of the run. 32 micro-batches of held-out data per evaluation: 65k tokens, within the code + prose corpus's
smallest held-out set (prose, 76k tokens)."""
BUDGETS = {"default": DEFAULT, "quick": QUICK, "large": LARGE}


@dataclass(frozen=True)
class StudyData:
    """What every run trains and validates on."""

    data_path: list[str]
    """data.data_path: [prefix] or a weighted blend."""
    tokenizer_model: str
    tokenizer_type: str = "SentencePieceTokenizer"
    valid_data_path: list[str] | None = None
    """Held-out sets (one per domain), or None: 5 % of data_path."""
    corpus: dict = field(default_factory=dict)
    """What the data is (the corpus manifest: documents and tokens per domain and split), for the report."""

    def fingerprint(self) -> dict:
        """What the data holds, apart from where it lies: documents, bytes and tokens per domain and split (a
        corpus rebuilt from other installed packages differs), or the corpus file."""
        if "domains" in self.corpus:
            return {name: {split: [s["documents"], s["bytes"], s["tokens"]] for split, s in domain["splits"].items()}
                    for name, domain in self.corpus["domains"].items()}
        return {"file": self.corpus.get("file", "")}

    def overrides(self) -> list[str]:
        held_out = ([] if self.valid_data_path is None
                    else [f"data.valid_data_path=[{', '.join(self.valid_data_path)}]"])
        return [f"data.data_path=[{', '.join(map(str, self.data_path))}]",
                f"data.tokenizer_model={self.tokenizer_model}", f"data.tokenizer_type={self.tokenizer_type}",
                "data.split=95,5,0", *held_out]


@dataclass
class RunResult:
    variant: str
    seed: int
    overrides: list[str]
    valid_ppl: float
    valid_loss: float
    params_total: int
    moe_layer_params: int
    active_ffn_madds: int
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation loss)."""
    extra: dict = field(default_factory=dict)
    tokens: int = 0
    """Training tokens."""
    tokens_per_s: float = 0.0
    """Median training throughput over the logged steps."""
    commit: str = ""
    set_ppl: dict[str, float] = field(default_factory=dict)
    """Final perplexity on each held-out set (one per domain), when there are several."""
    set_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Held-out set -> (step, validation loss) along the run."""
    expert_load: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Held-out set -> MoE layer -> share of the layer's copies per expert, on the final model."""


def prepare_data(corpus: str, data_dir: Path, vocab_size: int) -> StudyData:
    """A sentencepiece model trained on the corpus and its indexed dataset (5 % held out by megatron's split).
    Reused when `data_dir` holds them for this same corpus file and vocabulary size."""
    from megamoe.data import preprocess

    corpus_path = Path(corpus).resolve()
    stamp = {"corpus": str(corpus_path), "bytes": corpus_path.stat().st_size, "vocab_size": vocab_size}
    stamp_file, tokenizer = data_dir / "stamp.json", data_dir / "corpus.model"
    prefix = f"{data_dir / 'corpus'}_text_document"
    if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and Path(prefix + ".idx").is_file()):
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
        tokenizer = Path(preprocess.train_tokenizer([corpus], str(data_dir / "corpus"), vocab_size=vocab_size))
        prefix = preprocess.encode_corpus([corpus], str(tokenizer), str(data_dir / "corpus")).prefix
        stamp_file.write_text(json.dumps(stamp))
    return StudyData(data_path=[prefix], tokenizer_model=str(tokenizer), corpus={"file": str(corpus_path)})


def prepare_recipe(recipe: str, data_dir: Path, vocab_size: int, workers: int = 2) -> StudyData:
    """A corpus of several domains (megamoe/studies/corpus_recipes.py), built into `data_dir` unless it holds it
    already: training blends the domains' training splits equally, validation reads each domain's held-out set."""
    from megamoe.data import domains
    from megamoe.studies.corpus_recipes import RECIPES

    if (data_dir / domains.MANIFEST).is_file():
        manifest = domains.read_manifest(data_dir)
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
        manifest = domains.build(RECIPES[recipe](), data_dir, held_out=0.05, vocab_size=vocab_size, workers=workers)
    names = list(manifest["domains"])
    splits = {name: manifest["domains"][name]["splits"] for name in names}
    blend = [part for name in names for part in (1.0 / len(names), splits[name]["train"]["prefix"])]
    return StudyData(data_path=blend, tokenizer_model=manifest["tokenizer_model"],
                     tokenizer_type=manifest["tokenizer_type"],
                     valid_data_path=[splits[name]["held_out"]["prefix"] for name in names],
                     corpus={"recipe": recipe, **manifest})


def git_commit(checkout: Path, outputs: tuple[Path, ...] = ()) -> str:
    """HEAD of the checkout ('+uncommitted' if a tracked file differs from it), or 'unknown' outside git. Files the
    comparison writes itself (`outputs`: its report and work directories, when inside the checkout) and untracked
    files do not count: a study whose report is committed rewrites it after every run."""
    root = Path(checkout).resolve()
    excluded = [f":(exclude){path.resolve().relative_to(root)}" for path in outputs
                if path.resolve().is_relative_to(root) and path.resolve() != root]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True,
                                timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
                               cwd=checkout, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def run_comparison(data: StudyData, out_dir: Path, seeds: list[int], budget: Budget, runs_wanted: list[str],
                   quick: bool = False, commit: str = "", keep_dir: Path | None = None,
                   on_result: Callable[[list[RunResult]], None] | None = None) -> list[RunResult]:
    """Train and evaluate every (seed, variant); one process, sequentially, under `out_dir`. A run whose result was
    saved by an earlier call with the same settings (in its log directory, or in `keep_dir`: results kept with a
    report, e.g. in the repository) is read back, not trained again. `on_result(results so far)` after each run."""
    runs, by_variant = study_runs(), studies()
    results = []
    for seed in seeds:
        for name in runs_wanted:
            variant, overrides = runs[name]
            extra = by_variant[variant].quick.get(name, []) if quick and variant is not None else []
            results.append(_run_one(name, seed, [*overrides, *extra], data, out_dir, budget, commit, keep_dir))
            if on_result is not None:
                on_result(results)
    return results


def base_overrides(data: StudyData, budget: Budget, log_dir: Path, seed: int) -> list[str]:
    return [*data.overrides(), "data.num_workers=0", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=352", "train.lr=3e-3", "train.min_lr=3e-4", f"train.seed={seed}",
            "logging.wandb=false", "logging.tensorboard=false", f"logging.log_dir={log_dir}", *budget.overrides()]


RESULT_FILE = "result.json"
"""A finished run's RunResult and the overrides it was trained with, in its log directory."""


def _run_one(name: str, seed: int, overrides: list[str], data: StudyData, out_dir: Path, budget: Budget,
             commit: str, keep_dir: Path | None) -> RunResult:
    from megamoe.train import startup
    from megamoe.train.loop import build_trainer, evaluate, evaluate_sets, train
    from megamoe.train.metrics import ExpertLoadLog, MetricsWriter
    from megamoe.utils import get_logger

    log_dir = out_dir / "runs" / f"{name}-seed{seed}"
    settings = [*base_overrides(data, budget, log_dir, seed), *overrides]
    saved_at = [log_dir / RESULT_FILE, *([keep_dir / "runs" / f"{name}-seed{seed}.json"] if keep_dir else [])]
    key = {"settings": _portable(settings, out_dir), "data": data.fingerprint()}
    if (saved := next((r for path in saved_at if (r := _saved_result(path, key)) is not None), None)) is not None:
        get_logger().info(f"compare: {name} seed {seed}: trained before, not again")
        return saved
    shutil.rmtree(log_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    cfg = config.load(None, settings)
    start = time.perf_counter()
    trainer = build_trainer(cfg, startup.check(cfg))
    metrics = MetricsWriter(cfg)
    try:
        train(trainer, metrics, ExpertLoadLog(str(log_dir)))
    finally:
        metrics.close()
    final, sets = evaluate(trainer), evaluate_sets(trainer)
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    result = RunResult(variant=name, seed=seed, overrides=overrides, valid_ppl=final["valid/ppl"],
                       valid_loss=final["valid/loss"], params_total=_count(trainer.engine.module),
                       moe_layer_params=_moe_params(trainer.engine.module), active_ffn_madds=active_ffn_madds(cfg),
                       seconds=time.perf_counter() - start, curve=_curve(records, "valid/loss"),
                       tokens=budget.tokens, tokens_per_s=statistics.median(
                           r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r),
                       commit=commit)
    if len(sets) > 1:
        result.set_ppl = {n: r.ppl for n, r in sets.items()}
        result.set_curves = {n: _curve(records, f"valid/{n}/loss") for n in sets}
        result.expert_load = {n: r.expert_load for n, r in sets.items() if r.expert_load}
    result.extra = _paper_evaluations(name, trainer, final, log_dir)
    for path in saved_at:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**key, "result": dataclasses.asdict(result)}))
    get_logger().info(f"compare: {name} seed {seed}: valid ppl {result.valid_ppl:.1f} ({result.seconds:.0f} s)")
    return result


def _portable(settings: list[str], out_dir: Path) -> list[str]:
    """The settings with the run directory written as <out>: the same run in another checkout matches."""
    where = sorted({str(out_dir), str(out_dir.resolve())}, key=len, reverse=True)
    out = []
    for setting in settings:
        for prefix in where:
            setting = setting.replace(prefix, "<out>")
        out.append(setting)
    return out


def _saved_result(path: Path, key: dict) -> RunResult | None:
    """The result saved at `path` if its run was trained with exactly these settings on the same data."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return result_from_dict(saved["result"]) if all(saved.get(k) == v for k, v in key.items()) else None


def result_from_dict(values: dict) -> RunResult:
    """A RunResult from its JSON form (curves as tuples again; fields added since it was written take defaults)."""
    values = {**values, "curve": [tuple(p) for p in values["curve"]],
              "set_curves": {n: [tuple(p) for p in c] for n, c in values.get("set_curves", {}).items()}}
    return RunResult(**values)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _moe_params(model: torch.nn.Module) -> int:
    from megamoe.models.moe_mlp import MoEMLP

    return sum(_count(m) for m in model.modules() if isinstance(m, MoEMLP))


def _curve(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def active_ffn_madds(cfg: config.RunConfig) -> int:
    """Multiply-adds per token of one block's FFN or MoE layer (a MoE block's, where there is one)."""
    model, moe = cfg.model, cfg.moe
    if moe.num_experts is None:
        return 3 * model.hidden_size * (model.ffn_hidden_size or 4 * model.hidden_size)
    return variants.of(moe).ffn_madds(moe, model)


def _paper_evaluations(name: str, trainer, final: dict, log_dir: Path) -> dict:
    """The evaluations the run's variant's paper makes (its study's `evaluate` hook)."""
    variant = study_runs()[name][0]
    study = studies().get(variant) if variant is not None else None
    if study is None or study.evaluate is None:
        return {}
    return variants.resolve(study.evaluate)(name, trainer, final, log_dir)


def evaluate_without_top1(trainer) -> float:
    """Validation perplexity with each token's best expert skipped (every routed MoE layer and sub-layer, through
    moe.drop_top_ranks), then restored: the robustness test of CartesianMoE's paper."""
    from megamoe.moe.layer import MoELayer
    from megamoe.train.loop import evaluate

    layers = [m for m in trainer.engine.module.modules() if isinstance(m, MoELayer)]
    saved = [layer.cfg for layer in layers]
    for layer in layers:
        layer.cfg = dataclasses.replace(layer.cfg, drop_top_ranks=1)
    try:
        return evaluate(trainer)["valid/ppl"]
    finally:
        for layer, cfg in zip(layers, saved, strict=True):
            layer.cfg = cfg
