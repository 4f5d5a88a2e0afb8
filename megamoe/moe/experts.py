"""Routed experts computed on contiguous row slices (grouped GEMM), and the always-on shared expert.

Shapes: R rows (grouped by expert), D hidden, F expert width, e local experts.
Weights use torch.nn.Linear's [out, in] layout stacked over experts (transformers 5's fused layout):
linear_fc1 [e, 2F, D] (SwiGLU: gate rows then up rows) or [e, F, D], linear_fc2 [e, D, F].
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megamoe.moe import host
from megamoe.parallel.comm import reduce_grad

Counts = Tensor | list[int]
"""Rows per local expert: an int64 tensor, or a list where the host knows them already (the all-to-all dispatcher
read them for its split sizes), so that the per-expert GEMMs need no second host read."""


def expert_generator(seed: int, layer_number: int, expert: int) -> torch.Generator:
    """Each expert's own random stream: initial weights do not depend on how experts are sharded."""
    return torch.Generator().manual_seed(seed + 7919 * layer_number + 104729 * (expert + 1))


def ffn_activation(h_RF: Tensor, swiglu: bool) -> Tensor:
    if swiglu:
        gate, up = h_RF.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_RF)


class Experts(torch.nn.Module):
    """Base of the modules holding routed-expert parameters, sharded over the expert-parallel group.

    Each parameter's first axis holds this rank's experts [first_expert, first_expert + num_local) of the layer
    (in the variant's storage order): DeepSpeed reduces them over expert-data-parallel ranks only, and
    checkpoints keep them per global index, so they reload under any expert-parallel size.
    """

    first_expert: int
    num_local: int


class GroupedExperts(Experts):
    """The experts [first_expert, first_expert + num_local) of one layer: SwiGLU or GELU FFNs, no biases."""

    def __init__(self, *, num_local: int, first_expert: int, hidden_size: int, ffn_hidden_size: int,
                 swiglu: bool, init_std: float, output_init_std: float, seed: int, layer_number: int,
                 grouped_gemm: str = "auto", replica_group=None) -> None:
        super().__init__()
        self.num_local, self.first_expert, self.swiglu = num_local, first_expert, swiglu
        self.grouped_gemm = grouped_gemm
        # Ranks holding these same experts while routing different tokens (sequence parallelism without
        # expert parallelism): each sees part of the gradient, summed in autograd like the router's.
        self.replica_group = replica_group
        fc1_rows = 2 * ffn_hidden_size if swiglu else ffn_hidden_size
        self.linear_fc1 = torch.nn.Parameter(torch.empty(num_local, fc1_rows, hidden_size))
        self.linear_fc2 = torch.nn.Parameter(torch.empty(num_local, hidden_size, ffn_hidden_size))
        with torch.no_grad():
            for j in range(num_local):
                gen = expert_generator(seed, layer_number, first_expert + j)
                self.linear_fc1[j].normal_(0.0, init_std, generator=gen)
                self.linear_fc2[j].normal_(0.0, output_init_std, generator=gen)

    def forward(self, x_RD: Tensor, counts_e: Counts) -> Tensor:
        """Expert j transforms rows [sum(counts_e[:j]), sum(counts_e[:j+1])); experts with 0 rows are fine."""
        fc1, fc2 = reduce_grad(self.linear_fc1, self.replica_group), reduce_grad(self.linear_fc2, self.replica_group)
        return expert_ffn(x_RD, counts_e, fc1, fc2, self.swiglu, self.grouped_gemm)

    @torch.no_grad()
    def load_dense_ffn(self, dense: dict[str, Tensor]) -> None:
        """Every local expert becomes a copy of a dense FFN given in megatron's MLP layout (upcycling)."""
        for name, param in (("linear_fc1.weight", self.linear_fc1), ("linear_fc2.weight", self.linear_fc2)):
            if tuple(dense[name].shape) != tuple(param.shape[1:]):
                raise ValueError(f"dense {name} {tuple(dense[name].shape)} does not fit experts of shape "
                                 f"{tuple(param.shape[1:])}: upcycled experts keep the dense FFN's width "
                                 "(leave moe.ffn_hidden_size unset)")
        self.linear_fc1.copy_(dense["linear_fc1.weight"].expand_as(self.linear_fc1))
        self.linear_fc2.copy_(dense["linear_fc2.weight"].expand_as(self.linear_fc2))

    def dense_state_dict(self, local_expert: int) -> dict[str, Tensor]:
        """Expert `local_expert` in megatron's dense MLP layout (linear_fc1.weight, linear_fc2.weight)."""
        return {"linear_fc1.weight": self.linear_fc1[local_expert], "linear_fc2.weight": self.linear_fc2[local_expert]}


def expert_ffn(x_RD: Tensor, counts_e: Counts, fc1_eXD: Tensor, fc2_eDF: Tensor, swiglu: bool,
               grouped_gemm: str = "auto") -> Tensor:
    """Expert j's FFN on rows [sum(counts_e[:j]), sum(counts_e[:j+1])); fc1 [e, F or 2F, D], fc2 [e, D, F].

    torch._grouped_mm: 'on' always, 'auto' for bf16 on CUDA (its fast kernel), 'off' never. Otherwise one GEMM
    pair per expert in a single autograd node (ExpertLoop).
    """
    grouped = (x_RD.is_cuda and x_RD.dtype == torch.bfloat16) if grouped_gemm == "auto" else grouped_gemm == "on"
    if grouped:
        offsets = torch.cumsum(torch.as_tensor(counts_e, device=x_RD.device), 0).to(torch.int32)
        h_RF = torch._grouped_mm(x_RD, fc1_eXD.transpose(1, 2), offs=offsets)
        return torch._grouped_mm(ffn_activation(h_RF, swiglu), fc2_eDF.transpose(1, 2), offs=offsets)
    return ExpertLoop.apply(x_RD, fc1_eXD, fc2_eDF, counts_e, swiglu)


class ExpertLoop(torch.autograd.Function):
    """One GEMM pair per expert, written into preallocated outputs, with a hand-written backward.

    Autograd through a Python loop over experts would make a graph node per expert and operation, concatenate
    the experts' outputs and input gradients, and stack their weight-gradient slices (a copy of every weight
    gradient): at 64 experts those copies cost about a third of the GEMM time on a CPU. Here each GEMM writes
    its slice in place (torch.mm out=), weight gradients land in their [e, ...] slots directly, and the saved
    state is x and the fc1 output h (the activation is recomputed in backward). Experts with no rows get zero
    weight gradients.
    """

    @staticmethod
    def forward(ctx, x_RD: Tensor, fc1_eXD: Tensor, fc2_eDF: Tensor, counts_e: Tensor, swiglu: bool) -> Tensor:
        bounds = _row_bounds(counts_e)
        # Outputs are preallocated uninitialised: rows no expert covers would come back as garbage.
        assert bounds[-1][1] == x_RD.shape[0], f"expert counts cover {bounds[-1][1]} of {x_RD.shape[0]} rows"
        h_RX = x_RD.new_empty(x_RD.shape[0], fc1_eXD.shape[1])
        y_RD = x_RD.new_empty(x_RD.shape[0], fc2_eDF.shape[1])
        for j, (lo, hi) in enumerate(bounds):
            if hi > lo:
                torch.mm(x_RD[lo:hi], fc1_eXD[j].t(), out=h_RX[lo:hi])
                torch.mm(ffn_activation(h_RX[lo:hi], swiglu), fc2_eDF[j].t(), out=y_RD[lo:hi])
        ctx.save_for_backward(x_RD, fc1_eXD, fc2_eDF, h_RX)
        ctx.bounds, ctx.swiglu = bounds, swiglu
        return y_RD

    @staticmethod
    def backward(ctx, dy_RD: Tensor):
        x_RD, fc1_eXD, fc2_eDF, h_RX = ctx.saved_tensors
        dy_RD = dy_RD.contiguous()
        dx_RD = torch.empty_like(x_RD)
        dfc1, dfc2 = torch.empty_like(fc1_eXD), torch.empty_like(fc2_eDF)
        for j, (lo, hi) in enumerate(ctx.bounds):
            if hi == lo:
                dfc1[j].zero_()
                dfc2[j].zero_()
                continue
            dy_nD, h_nX = dy_RD[lo:hi], h_RX[lo:hi]
            act_nF, dh_nX = _activation_and_grad(h_nX, dy_nD @ fc2_eDF[j], ctx.swiglu)
            torch.mm(dy_nD.t(), act_nF, out=dfc2[j])
            torch.mm(dh_nX.t(), x_RD[lo:hi], out=dfc1[j])
            torch.mm(dh_nX, fc1_eXD[j], out=dx_RD[lo:hi])
        return dx_RD, dfc1, dfc2, None, None


def _row_bounds(counts_e: Counts) -> list[tuple[int, int]]:
    ends = (list(itertools.accumulate(counts_e)) if isinstance(counts_e, list)
            else host.read_on_host(torch.cumsum(counts_e, 0), "row range of each expert's GEMMs"))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def _activation_and_grad(h_nX: Tensor, dact_nF: Tensor, swiglu: bool) -> tuple[Tensor, Tensor]:
    """(activation, d loss / d h) from the fc1 output h and the activation's gradient."""
    if not swiglu:
        return F.gelu(h_nX), torch.ops.aten.gelu_backward(dact_nF, h_nX)
    gate, up = h_nX.chunk(2, dim=-1)
    silu = F.silu(gate)  # the very values the forward used
    dh_nX = torch.empty_like(h_nX)
    width = gate.shape[-1]
    # Written into the halves of one buffer (no concatenation); silu_backward is autograd's own formula.
    torch.ops.aten.silu_backward.grad_input(dact_nF * up, gate, grad_input=dh_nX[:, :width])
    torch.mul(dact_nF, silu, out=dh_nX[:, width:])
    return silu * up, dh_nX


class SharedExperts(torch.nn.Module):
    """Always-on expert(s) of width F_s, joined to the routed output by `combine`:
    'add' (DeepSeekMoE), 'gate' (sigmoid(x w_g) scaling, Qwen2-MoE), 'residual'
    (c = softmax(Linear(d, 2)(x)); y = c0 routed + c1 shared, DeepSpeed Residual-MoE, arXiv:2201.05596).

    Replicated on every rank; under sequence parallelism its gradients are summed over `sp_group`.
    """

    def __init__(self, *, hidden_size: int, ffn_hidden_size: int, swiglu: bool, combine: str, init_std: float,
                 output_init_std: float, sp_group=None) -> None:
        super().__init__()
        self.swiglu, self.combine, self.sp_group = swiglu, combine, sp_group
        fc1_rows = 2 * ffn_hidden_size if swiglu else ffn_hidden_size
        self.linear_fc1 = torch.nn.Parameter(torch.empty(fc1_rows, hidden_size).normal_(0.0, init_std))
        self.linear_fc2 = torch.nn.Parameter(torch.empty(hidden_size, ffn_hidden_size).normal_(0.0, output_init_std))
        if combine == "gate":
            self.gate_weight = torch.nn.Parameter(torch.empty(1, hidden_size).normal_(0.0, init_std))
        elif combine == "residual":
            self.coefficient = torch.nn.Linear(hidden_size, 2)
            torch.nn.init.normal_(self.coefficient.weight, 0.0, init_std)
            torch.nn.init.zeros_(self.coefficient.bias)

    def _w(self, param: Tensor) -> Tensor:
        return reduce_grad(param, self.sp_group)

    def forward(self, x_TD: Tensor, routed_TD: Tensor) -> Tensor:
        h_TF = ffn_activation(x_TD @ self._w(self.linear_fc1).t(), self.swiglu)
        shared_TD = h_TF @ self._w(self.linear_fc2).t()
        if self.combine == "add":
            return routed_TD + shared_TD
        if self.combine == "gate":
            return routed_TD + torch.sigmoid(x_TD @ self._w(self.gate_weight).t()) * shared_TD
        coef_T2 = F.linear(x_TD, self._w(self.coefficient.weight), self._w(self.coefficient.bias)).softmax(dim=-1)
        return coef_T2[:, :1] * routed_TD + coef_T2[:, 1:] * shared_TD


def output_init_std(init_std: float, num_layers: int) -> float:
    """Megatron's scaled initialisation of output projections: std / sqrt(2 * layers)."""
    return init_std / math.sqrt(2.0 * num_layers)
