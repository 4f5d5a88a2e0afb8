"""Model FLOPs per token and the peak they are measured against (MFU).

Counted as Megatron-LM counts them: 2 FLOPs per multiply-add, a training step 3x the forward (backward = 2x),
recomputation not counted. Per token and layer: the q/k/v and output projections; attention scores and the weighted
sum over the average context (S/2 tokens under a causal mask, S bidirectional); the MLP slot's multiply-adds (a dense
FFN, or the variant's own count: router, the experts a token is routed to, shared experts; PEER's query projection
and sub-key scores and its h*k single-neuron experts; DA-MoE at its budget's mean K) with the routed experts at the
copies per token each logged step actually made (dropped copies and DA-MoE's realised K move the count); a
variant's once-per-step work (MPOE's rebuild of its expert matrices) spread over the step's tokens; once per token
the output layer. The peak: `logging.peak_tflops` when set; on CUDA the bf16 dense peak of
the device from a table; on a CPU a float32 GEMM timed once on this machine (cached under ~/.cache/megamoe) for this
rank's threads, times the world size.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megamoe import variants
from megamoe.config import RunConfig
from megamoe.config.validate import moe_layer_numbers

GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                   "A800": 312.0, "L40S": 362.0, "L40": 181.0, "A10": 125.0, "L4": 121.0, "V100": 125.0}
"""Dense bf16 (V100: fp16) tensor-core peaks in TFLOP/s, by a name that appears in torch.cuda.get_device_name()
(SXM parts; a PCIe card is slower: set logging.peak_tflops)."""
GEMM_SIZE = 1024
CACHE = Path.home() / ".cache" / "megamoe"


def forward_madds_per_token(cfg: RunConfig, vocab_size: int, tokens_per_step: int | None = None) -> float:
    """Multiply-adds of one token's forward pass through the model, at the nominal experts per token; with
    `tokens_per_step`, a variant's once-per-step work (MPOE's rebuild) spread over the step's tokens."""
    model, moe = cfg.model, cfg.moe
    d, heads = model.hidden_size, model.num_attention_heads
    head_dim = model.kv_channels or d // heads
    groups = model.num_query_groups or heads
    projections = d * (heads + 2 * groups) * head_dim + heads * head_dim * d
    context = cfg.data.seq_length / 2 if model.objective == "causal_lm" else cfg.data.seq_length
    attention = 2 * context * heads * head_dim  # q.k over the context, then the weighted sum of values
    dense_ffn = (3 if model.swiglu else 2) * d * (model.ffn_hidden_size or 4 * d)
    moe_layers = moe_layer_numbers(moe, model.num_layers)
    moe_ffn = 0.0
    if moe_layers:
        variant = variants.of(moe)
        moe_ffn = variant.ffn_madds(moe, model)
        if tokens_per_step and variant.step_madds is not None:
            moe_ffn += variant.step_madds(moe, model) / tokens_per_step
    layers = model.num_layers * (projections + attention)
    ffn = len(moe_layers) * moe_ffn + (model.num_layers - len(moe_layers)) * dense_ffn
    return layers + ffn + d * vocab_size


def copy_madds_per_token(cfg: RunConfig) -> tuple[float, float]:
    """(nominal routed copies per token of one MoE (sub-)layer, multiply-adds the model's forward gains per extra
    copy per token in every MoE (sub-)layer); (0, 0) without MoE layers or a per-copy count."""
    moe, model = cfg.moe, cfg.model
    moe_layers = moe_layer_numbers(moe, model.num_layers)
    variant = variants.of(moe) if moe_layers else None
    if variant is None or variant.copy_madds is None:
        return 0.0, 0.0
    return variant.experts_per_token(moe), len(moe_layers) * variant.sublayers * variant.copy_madds(moe, model)


def train_flops_per_token(cfg: RunConfig, vocab_size: int, tokens_per_step: int | None = None) -> float:
    """FLOPs of one trained token: forward and backward."""
    return 6.0 * forward_madds_per_token(cfg, vocab_size, tokens_per_step)


@dataclass(frozen=True)
class Ledger:
    """What a logged step's throughput is worth in FLOPs."""

    flops_per_token: float
    """At the nominal experts per token."""
    peak_tflops: float
    """The whole job's; 0 when unknown."""
    nominal_experts_per_token: float = 0.0
    flops_per_copy: float = 0.0
    """FLOPs per token gained by one more routed copy per token in every MoE (sub-)layer (0: fixed count)."""

    @classmethod
    def of(cls, cfg: RunConfig, vocab_size: int, world_size: int, tokens_per_step: int | None = None) -> Ledger:
        nominal, copy_madds = copy_madds_per_token(cfg)
        return cls(train_flops_per_token(cfg, vocab_size, tokens_per_step), peak_tflops(cfg, world_size),
                   nominal, 6.0 * copy_madds)

    def values(self, tokens_per_s: float, experts_per_token: float | None = None) -> dict[str, float]:
        """train/tflops achieved by the whole job, and train/mfu against the peak (when one is known). With the
        routed copies per token the step actually made (`experts_per_token`: dropped copies, DA-MoE's realised
        K), the routed experts count at that rate instead of the nominal one."""
        flops = self.flops_per_token
        if experts_per_token is not None and self.flops_per_copy:
            flops += (experts_per_token - self.nominal_experts_per_token) * self.flops_per_copy
        tflops = flops * tokens_per_s / 1e12
        return {"train/tflops": tflops, **({"train/mfu": tflops / self.peak_tflops} if self.peak_tflops else {})}


def peak_tflops(cfg: RunConfig, world_size: int) -> float:
    """The whole job's peak in TFLOP/s (see the module docstring); 0 when unknown (MFU is then not shown)."""
    if cfg.logging.peak_tflops is not None:
        return cfg.logging.peak_tflops * world_size
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        per_device = next((peak for key, peak in GPU_PEAK_TFLOPS.items() if key in name), 0.0)
        return per_device * world_size
    return cpu_gemm_tflops() * world_size


def cpu_gemm_tflops() -> float:
    """float32 GEMM TFLOP/s of this process's threads, timed once per machine and thread count (cached)."""
    return _measured_once("cpu_gemm_peak", _time_gemm)


def memory_bandwidth_gbs() -> float:
    """GB/s of a large float32 copy (read + write) with this process's threads, timed once per machine and
    thread count (cached): the bandwidth memory-bound work (gathers, scatter-adds) is held against."""
    return _measured_once("memory_bandwidth", _time_copy)


def _measured_once(name: str, measure) -> float:
    """measure() once per machine, thread count and torch version; cached in CACHE/<name>.json."""
    threads = torch.get_num_threads()
    key = f"{platform.node()}-{platform.processor() or platform.machine()}-{threads}threads-torch{torch.__version__}"
    path = CACHE / f"{name}.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = measure()
        try:
            CACHE.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(cached, indent=1))
            os.replace(temporary, path)
        except OSError:  # a read-only home: measure again next time
            pass
    return cached[key]


def _time_copy(seconds: float = 0.5, megabytes: int = 256) -> float:
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best / 1e9


def _time_gemm(seconds: float = 0.5) -> float:
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    torch.mm(a, b)  # warm-up
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * GEMM_SIZE ** 3 / best / 1e12
