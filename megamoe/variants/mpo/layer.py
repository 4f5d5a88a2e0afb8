"""MPOE (arXiv:2203.01104): experts as matrix product operators that share one central tensor (docs/variants.md §6).

Expert e's matrix m (gate, up, down for SwiGLU experts; fc1, fc2 otherwise) is
    W_{m,e} = MPO(A1_{m,e}, A2_{m,e}, C_m, A4_{m,e}, A5_{m,e})        (operators.py, n = 5 tensors by default)
with ONE central Parameter C_m per matrix on the layer (`mpo.<m>.central`), shared by every expert: a dense
parameter, replicated on every expert-parallel rank, its gradient summed by autograd over the local experts and
then reduced by DeepSpeed over the whole data-parallel world. The auxiliary tensors are the experts' own, stacked
over this rank's experts in MPOExperts (`experts.<m>_aux<k>`): expert parameters, sharded and reduced over the
expert-data-parallel group. Routing is the top-k layer's; the defaults are Switch top-1 with a router bias and
the value-1 straight-through gate.

Forward: each local expert's matrices are rebuilt once per optimizer step, batched over experts, with their
autograd graph to the MPO tensors. Under gradient accumulation the earlier micro-batches use a detached copy
whose gradient accumulates, and the last micro-batch's backward sends the step's whole gradient through the
rebuild once (MPOExperts.step_matrices; the training loop says which micro-batch is last). tools/bench_mpo.py
measures rebuilding against contracting the activations through the chain (mpo.apply_chain), which is slower
at every shape measured: it multiplies every token by the central tensor several times.

Gradient mask (§6.4): at each optimizer step, C_m's gradient is zeroed with probability p_mask (or per element,
rescaled), drawn from a generator seeded by (seed, step, layer, m): identical on every rank without communication
and reproducible on resume. p_mask = 1 freezes the central tensors (requires_grad False, outside the optimizer).
"""

from __future__ import annotations

import functools
import hashlib

import torch
from torch import Tensor

from megamoe.moe import host
from megamoe.moe.experts import Counts, Experts, expert_ffn, expert_generator, output_init_std
from megamoe.moe.layer import LayerShape
from megamoe.parallel.comm import reduce_grad
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.mpo import MPOEMoEConfig, mpo_matrices
from megamoe.variants.mpo.operators import MPOShape, auto_shape, decompose, reconstruct
from megamoe.variants.topk.layer import TopKMoE


def aux_name(matrix: str, k: int) -> str:
    """Parameter name of tensor k (0-based) of `matrix`: numbered 1..n as in the paper (aux1, aux2, aux4, aux5)."""
    return f"{matrix}_aux{k + 1}"


def mask_seed(seed: int, step: int, layer_number: int, matrix: str) -> int:
    """A seed for one step's mask of one central tensor: a hash, so nearby steps and layers are unrelated."""
    digest = hashlib.blake2b(f"{seed}/{step}/{layer_number}/{matrix}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class CentralTensor(torch.nn.Module):
    """The central tensor C_m [d_c, i_c, j_c, d_c+1] of one matrix, shared by all experts of the layer."""

    def __init__(self, shape: MPOShape) -> None:
        super().__init__()
        self.central = torch.nn.Parameter(torch.empty(shape.tensor_shape(shape.center)))


class _WithEarlierGrads(torch.autograd.Function):
    """Identity on a step's rebuilt matrix; its backward adds the gradient the step's earlier micro-batches
    accumulated on the detached copy they used, so the rebuild's backward runs once per step."""

    @staticmethod
    def forward(ctx, w: Tensor, earlier: Tensor) -> Tensor:
        ctx.earlier = earlier
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        earlier = ctx.earlier.grad
        return (grad if earlier is None else grad + earlier), None


class MPOExperts(Experts):
    """The auxiliary tensors of this rank's experts, [num_local, d_k, i_k, j_k, d_k+1] each; the central tensors
    come from the layer (`central_tensors`, not a submodule: they are dense parameters)."""

    def __init__(self, *, num_local: int, first_expert: int, shapes: dict[str, MPOShape], swiglu: bool,
                 central_tensors, grouped_gemm: str = "auto", replica_group=None) -> None:
        super().__init__()
        self.num_local, self.first_expert, self.shapes, self.swiglu = num_local, first_expert, shapes, swiglu
        self.central_tensors, self.grouped_gemm, self.replica_group = central_tensors, grouped_gemm, replica_group
        for name, shape in shapes.items():
            for k in range(shape.n):
                if k != shape.center:
                    self.register_parameter(aux_name(name, k),
                                            torch.nn.Parameter(torch.empty(num_local, *shape.tensor_shape(k))))
        self.last_micro_batch = True
        """Whether the current forward is the optimizer step's last micro-batch (set by the layer)."""
        self.rebuilds = 0
        """Matrix rebuilds with a graph so far (training forwards): one per optimizer step."""
        self._step_matrices: dict[str, Tensor] | None = None  # the step's rebuilt matrices, with their graph
        self._detached: dict[str, Tensor] = {}  # their detached copies for the earlier micro-batches

    def matrices(self) -> dict[str, Tensor]:
        """Every local expert's matrices, [num_local, rows, cols] each (nn.Linear's [out, in] layout)."""
        centrals = self.central_tensors()
        out = {}
        for name, shape in self.shapes.items():
            tensors = [centrals[name] if k == shape.center else
                       reduce_grad(getattr(self, aux_name(name, k)), self.replica_group) for k in range(shape.n)]
            out[name] = reconstruct(tensors, shape)
        return out

    def step_matrices(self) -> dict[str, Tensor]:
        """The matrices for this forward: rebuilt at the step's first training micro-batch; earlier
        micro-batches get a detached copy (its gradient accumulates), the last one the rebuilt tensors with
        that gradient added in the backward. Evaluation (no grad) rebuilds without a graph. (Recomputing the
        MLP's activations in the backward, which megamoe does not offer, would need the step's tensors kept.)"""
        if not torch.is_grad_enabled():
            return self.matrices()
        if self._step_matrices is None:
            self._step_matrices = self.matrices()
            self.rebuilds += 1
        if not self.last_micro_batch:
            if not self._detached:
                self._detached = {n: w.detach().requires_grad_() for n, w in self._step_matrices.items()}
            return self._detached
        step = {n: _WithEarlierGrads.apply(w, self._detached[n]) if self._detached else w
                for n, w in self._step_matrices.items()}
        self._step_matrices, self._detached = None, {}
        return step

    def forward(self, x_RD: Tensor, counts_e: Counts) -> Tensor:
        w = self.step_matrices()
        fc1, fc2 = (torch.cat([w["gate"], w["up"]], dim=1), w["down"]) if self.swiglu else (w["fc1"], w["fc2"])
        return expert_ffn(x_RD, counts_e, fc1, fc2, self.swiglu, self.grouped_gemm)


MASK_STEP_READ = "MPOE: the optimizer step seeding the gradient mask"


class MPOEMoE(TopKMoE):
    """Top-k routing over MPO experts with shared central tensors and the central-gradient mask."""

    def __init__(self, cfg: MPOEMoEConfig, shape: LayerShape, groups: ParallelGroups) -> None:
        super().__init__(cfg, shape, groups)  # builds self.mpo and self.experts (build_experts)
        # Optimizer steps done: the mask's step index, saved with the model so a resumed run draws the same masks.
        self.register_buffer("mask_step", torch.zeros((), dtype=torch.int64))
        self._step_masks: dict[str, Tensor | None] = {}
        self._masked_step: int | None = None
        """The step this step's masks were drawn for (mask_step read on the host once per step)."""
        self.load_dense_ffn(self.fresh_dense_ffn())
        for param in self.mpo_parameters():
            if cfg.mpo_lr_mult != 1.0:
                param.lr_mult = cfg.mpo_lr_mult  # read by train.optim.param_groups
        for name, module in self.mpo.items():
            if cfg.p_mask == 1.0:
                module.central.requires_grad_(False)
            elif cfg.p_mask > 0.0:
                module.central.register_hook(functools.partial(self._mask_central_grad, name))

    def build_experts(self) -> MPOExperts:
        cfg, shape, placement = self.cfg, self.shape, self.expert_placement
        given = cfg.mpo_shapes or {}
        shapes = {name: MPOShape(i=tuple(given[name][0]), j=tuple(given[name][1]), max_bond=cfg.mpo_max_bond)
                  if name in given else auto_shape(rows, cols, cfg.mpo_num_tensors, cfg.mpo_max_bond)
                  for name, (rows, cols) in self.matrix_dims().items()}
        self.mpo = torch.nn.ModuleDict({name: CentralTensor(s) for name, s in shapes.items()})
        return MPOExperts(num_local=placement.num_local, first_expert=placement.first_expert, shapes=shapes,
                          swiglu=shape.swiglu, central_tensors=self.central_tensors, grouped_gemm=cfg.grouped_gemm,
                          replica_group=placement.replica_group)

    def matrix_dims(self) -> dict[str, tuple[int, int]]:
        return mpo_matrices(self.experts_width(), self.shape.hidden_size, self.shape.swiglu)

    def central_tensors(self) -> dict[str, Tensor]:
        """C_m for the forward: under sequence parallelism each TP rank routes its own tokens, so the gradient
        is summed over the tensor-parallel group (as the router's)."""
        return {name: reduce_grad(module.central, self.groups.sp_group) for name, module in self.mpo.items()}

    def mpo_parameters(self) -> list[torch.nn.Parameter]:
        return [m.central for m in self.mpo.values()] + list(self.experts.parameters())

    def fresh_dense_ffn(self) -> dict[str, Tensor]:
        """A freshly initialised dense FFN (megatron's MLP layout) from the layer's own stream: from-scratch
        experts start as its decomposition, the same on every rank whatever the expert-parallel size."""
        shape = self.shape
        gen = torch.Generator().manual_seed(shape.seed + 7919 * shape.layer_number + 15485863)
        fc1_rows = 2 * self.experts_width() if shape.swiglu else self.experts_width()
        fc1 = torch.empty(fc1_rows, shape.hidden_size).normal_(0.0, shape.init_std, generator=gen)
        fc2 = torch.empty(shape.hidden_size, self.experts_width()).normal_(
            0.0, output_init_std(shape.init_std, shape.num_layers), generator=gen)
        return {"linear_fc1.weight": fc1, "linear_fc2.weight": fc2}

    def experts_width(self) -> int:
        return self.cfg.ffn_hidden_size or self.shape.ffn_hidden_size

    @torch.no_grad()
    def load_dense_ffn(self, dense: dict[str, Tensor]) -> None:
        """Decompose a dense FFN (megatron's MLP layout; SwiGLU's fc1 is gate rows then up rows) exactly and
        clone it into every local expert: the central tensors get its centres, every expert the same auxiliary
        tensors (plus aux_init_noise_std noise from each expert's own stream)."""
        fc1, fc2 = dense["linear_fc1.weight"], dense["linear_fc2.weight"]
        gate, up = fc1.chunk(2, dim=0) if self.shape.swiglu else (fc1, None)
        matrices = {"gate": gate, "up": up, "down": fc2} if self.shape.swiglu else {"fc1": fc1, "fc2": fc2}
        experts = self.experts
        for name, w in matrices.items():
            shape = experts.shapes[name]
            tensors = decompose(w.to(torch.float64), shape)  # copy_ casts to the parameters' dtype
            self.mpo[name].central.copy_(tensors[shape.center])
            for k, t in enumerate(tensors):
                if k != shape.center:
                    getattr(experts, aux_name(name, k)).copy_(t.expand(experts.num_local, *t.shape))
        if self.cfg.aux_init_noise_std > 0:
            for j in range(experts.num_local):
                gen = expert_generator(self.shape.seed, self.shape.layer_number, experts.first_expert + j)
                for param in experts.parameters():
                    param[j].add_(torch.randn(param[j].shape, generator=gen) * self.cfg.aux_init_noise_std)

    def central_mask(self, name: str, step: int) -> Tensor | None:
        """The multiplier of C_name's gradient at optimizer step `step` (0-based): None keeps it; a 0-d zero
        masks it; per element, 0 or 1/(1 - p_mask)."""
        p = self.cfg.p_mask
        gen = torch.Generator().manual_seed(mask_seed(self.shape.seed, step, self.shape.layer_number, name))
        if self.cfg.mask_granularity == "tensor":
            return torch.zeros(()) if torch.rand((), generator=gen).item() < p else None
        keep = torch.rand(self.mpo[name].central.shape, generator=gen) >= p
        return keep.float() / (1.0 - p)

    def _mask_central_grad(self, name: str, grad: Tensor) -> Tensor:
        if name not in self._step_masks:  # once per step: every micro-batch of the step gets the same mask
            if self._masked_step is None:  # one read per step for all of the layer's matrices
                self._masked_step = host.read_on_host(self.mask_step, MASK_STEP_READ)
            self._step_masks[name] = self.central_mask(name, self._masked_step)
        mask = self._step_masks[name]
        return grad if mask is None else grad * mask.to(device=grad.device, dtype=grad.dtype)

    def begin_micro_batch(self, last: bool) -> None:
        super().begin_micro_batch(last)
        self.experts.last_micro_batch = last

    def finish_step(self) -> None:
        super().finish_step()
        self.mask_step += 1
        self._step_masks, self._masked_step = {}, None
