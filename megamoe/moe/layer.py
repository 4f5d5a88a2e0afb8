"""MoELayer: route -> dispatch -> experts -> combine -> shared experts, in plain PyTorch.

A variant (megamoe/variants/<name>/layer.py) supplies `route` and the nominal experts per token; it overrides
`forward` only when its algorithm differs. The layer keeps per-layer statistics as fp32 tensors outside its buffers
(a bf16 cast of the module must not round counts; tensor ops only, no host sync in forward); the trainer
reads and resets them at log time.

Shapes: T tokens on this rank, D hidden, E experts, e local experts, N routed copies, R expert rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megamoe.config import MoEConfig
from megamoe.moe.dispatch import AllToAllDispatcher, LocalDispatcher
from megamoe.moe.experts import Experts, GroupedExperts, SharedExperts, output_init_std
from megamoe.moe.losses import (
    attach_aux_loss,
    global_balance_loss,
    sequence_balance_loss,
    switch_balance_loss,
    z_loss,
)
from megamoe.moe.routing import Routing, apply_capacity, expert_capacity
from megamoe.parallel.comm import all_reduce_sum
from megamoe.parallel.experts import ExpertPlacement
from megamoe.parallel.groups import ParallelGroups
from megamoe.profiling import region


@dataclass(frozen=True)
class LayerShape:
    """What an MoE layer needs to know about the model around it."""

    hidden_size: int
    ffn_hidden_size: int
    """The dense FFN width: routed experts default to it."""
    swiglu: bool
    init_std: float
    num_layers: int
    layer_number: int
    """1-based and global; seeds the experts' initialisation."""
    seed: int
    norm_epsilon: float = 1e-5
    """Epsilon of norms inside the layer (CartesianMoE's sub-layer norms)."""
    sublayer: str = ""
    """Names a sub-layer of a layer with several MoE sub-layers (CartesianMoE's 'a' and 'b') in metrics."""

    @property
    def label(self) -> str:
        """How metrics name this MoE layer: layer<n>, or layer<n><sublayer>."""
        return f"layer{self.layer_number}{self.sublayer}"


@dataclass(frozen=True)
class Importance:
    """What a block's attention hands to its MoE (DA-MoE's token importance): the normalised importance of every
    token of the micro-batch (the whole sequence, even under sequence parallelism) and which tokens are real."""

    score_T: Tensor
    """fp32 in [0, 1], token order t = s*B + b; 0 for padding."""
    valid_T: Tensor
    """bool, False for padding."""


@dataclass(frozen=True)
class TokenInfo:
    """What the model knows about the tokens of a forward besides their hidden states."""

    valid_T: Tensor | None = None
    """bool, False for padding; None: all valid."""
    sequence_T: Tensor | None = None
    """Sequence of each token (t = s*B + b gives b); for per-sequence losses."""
    num_sequences: int = 1
    importance: Importance | None = None
    """DA-MoE: the importance of every token of the micro-batch, from this layer's attention."""
    local: tuple[int, int] | None = None
    """This rank's tokens [start, end) within `importance` (sequence parallelism gives each TP rank a slice);
    None: all of them."""

    def local_slice(self) -> slice:
        return slice(None) if self.local is None else slice(*self.local)


SCALAR_STATS = ("copies", "valid_tokens", "dropped", "balance_loss", "z_loss", "router_loss", "forwards")


class MoELayer(torch.nn.Module):
    """The shared pipeline of every variant."""

    K_HISTOGRAM = False
    """Record how many tokens got 0, 1, ..., nominal_k experts (variants with a variable K)."""

    def __init__(self, cfg: MoEConfig, shape: LayerShape, groups: ParallelGroups, nominal_k: int) -> None:
        super().__init__()
        self.cfg, self.shape, self.groups, self.nominal_k = cfg, shape, groups, nominal_k
        self.num_experts = cfg.num_experts
        self.expert_placement = ExpertPlacement(cfg.num_experts, groups)
        self.experts = self.build_experts()
        self.shared_experts = None
        if cfg.shared_expert_intermediate_size:
            self.shared_experts = SharedExperts(
                hidden_size=shape.hidden_size, ffn_hidden_size=cfg.shared_expert_intermediate_size,
                swiglu=shape.swiglu, combine=cfg.shared_expert_combine, init_std=shape.init_std,
                output_init_std=output_init_std(shape.init_std, shape.num_layers), sp_group=groups.sp_group)
        self.dispatcher = self.build_dispatcher()
        self._stats: dict[str, Tensor] = {}
        # Assignments of the current optimizer step over all ranks (global balancing loss).
        self._step_tokens_per_expert: Tensor | None = None

    FP32_BUFFERS: tuple[str, ...] = ()
    """Persistent buffers that stay fp32 when the module is cast (e.g. to bf16 by the engine)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self.FP32_BUFFERS:
            buffer = getattr(self, name, None)
            if buffer is not None and buffer.dtype != torch.float32:
                setattr(self, name, buffer.float())
        return self

    def build_experts(self) -> Experts:
        """This rank's routed experts (a variant may hold its experts differently)."""
        cfg, shape, placement = self.cfg, self.shape, self.expert_placement
        return GroupedExperts(
            num_local=placement.num_local, first_expert=placement.first_expert, hidden_size=shape.hidden_size,
            ffn_hidden_size=cfg.ffn_hidden_size or shape.ffn_hidden_size, swiglu=shape.swiglu,
            init_std=shape.init_std, output_init_std=output_init_std(shape.init_std, shape.num_layers),
            seed=shape.seed, layer_number=shape.layer_number, grouped_gemm=cfg.grouped_gemm,
            replica_group=placement.replica_group)

    def build_dispatcher(self) -> LocalDispatcher | AllToAllDispatcher | None:
        """The dispatcher the placement calls for: all-to-all over the expert-parallel group, or local."""
        if self.expert_placement.all_to_all:
            return AllToAllDispatcher(self.expert_placement)
        return LocalDispatcher(self.cfg.num_experts)

    def route(self, x_TD: Tensor, tokens: TokenInfo) -> tuple[Routing, Tensor | None]:
        """The variant's routing, and a router-side loss already weighted by its coefficient (or None)."""
        raise NotImplementedError

    def forward(self, x_TD: Tensor, tokens: TokenInfo | None = None) -> Tensor:
        """1. route 2. drop over capacity 3. send copies to expert owners 4. experts 5. combine 6. shared."""
        tokens = tokens or TokenInfo()
        with region("moe/route"):
            routing, router_loss = self.route(x_TD, tokens)
            routing, dropped, pad_to = self._apply_capacity(routing)
        with region("moe/dispatch"):
            x_RD, counts_e, meta = self.dispatcher.dispatch(x_TD, routing, pad_to)
        with region("moe/experts"):
            y_RD = self.experts(x_RD, counts_e)
        with region("moe/combine"):
            out_TD = self.dispatcher.combine(y_RD, routing, meta)
        if self.shared_experts is not None:
            with region("moe/shared experts"):
                out_TD = self.shared_experts(x_TD, out_TD)
        with region("moe/losses and statistics"):
            aux = self.aux_loss(routing, tokens)
            if router_loss is not None:
                self._add_stat("router_loss", router_loss.detach())
                aux = aux + router_loss
            self._record(routing, dropped)
        return attach_aux_loss(out_TD, aux)

    def _apply_capacity(self, routing: Routing) -> tuple[Routing, Tensor, int | None]:
        if self.cfg.expert_capacity_factor is None:
            return routing, torch.zeros((), device=routing.token_N.device), None
        # From shapes, not from the copies: equal on every rank, which padding without a count exchange needs.
        capacity = expert_capacity(routing.num_tokens * self.nominal_k, self.num_experts,
                                   self.cfg.expert_capacity_factor)
        routing, dropped = apply_capacity(routing, capacity, self.cfg.token_drop_policy)
        return routing, dropped, capacity if self.cfg.pad_expert_input_to_capacity else None

    def aux_loss(self, routing: Routing, tokens: TokenInfo) -> Tensor:
        """coeff x balancing loss + coeff x z-loss (each also recorded, without its coefficient)."""
        cfg, device, split = self.cfg, routing.token_N.device, self.groups.sp_group
        total = torch.zeros((), device=device)
        kind = cfg.router_load_balancing_type
        if kind != "none" and routing.probs_TE is not None:
            if kind == "seq_aux_loss" and tokens.sequence_T is not None:
                balance = sequence_balance_loss(routing, tokens.sequence_T, tokens.num_sequences, split)
            elif kind == "global_aux_loss":
                balance = global_balance_loss(routing, self._step_share(routing), split)
            else:
                balance = switch_balance_loss(routing, split)
            self._add_stat("balance_loss", balance.detach())
            total = total + cfg.aux_loss_coeff * balance
        if cfg.z_loss_coeff > 0 and routing.logits_TE is not None:
            z = z_loss(routing, split)
            self._add_stat("z_loss", z.detach())
            total = total + cfg.z_loss_coeff * z
        return total

    def _step_share(self, routing: Routing) -> Tensor:
        counts_E = all_reduce_sum(routing.tokens_per_expert().float(), self.groups.tp_dp_group)
        if self.training:
            if self._step_tokens_per_expert is None:
                self._step_tokens_per_expert = torch.zeros_like(counts_E)
            self._step_tokens_per_expert += counts_E
            counts_E = self._step_tokens_per_expert
        return counts_E / counts_E.sum().clamp(min=1.0)

    def _add_stat(self, name: str, value: Tensor) -> None:
        value = value.float()
        self._stats[name] = self._stats[name] + value if name in self._stats else value.clone()

    @torch.no_grad()
    def _record(self, routing: Routing, dropped: Tensor) -> None:
        device = routing.token_N.device
        self._add_stat("tokens_per_expert", routing.tokens_per_expert())
        self._add_stat("copies", torch.tensor(routing.token_N.numel(), device=device))
        valid = (routing.valid_T.sum() if routing.valid_T is not None
                 else torch.tensor(routing.num_tokens, device=device))
        self._add_stat("valid_tokens", valid)
        self._add_stat("dropped", dropped)
        copies_T = routing.copies_per_token()
        k_max = (copies_T.max() if routing.num_tokens else torch.zeros((), device=device)).float()
        self._stats["k_max"] = torch.maximum(self._stats.get("k_max", torch.zeros_like(k_max)), k_max)
        if self.K_HISTOGRAM:
            # Pads are counted with weight 0: no selection (and no host read) needed.
            weight_T = torch.ones_like(copies_T) if routing.valid_T is None else routing.valid_T.long()
            counts = torch.zeros(self.nominal_k + 1, dtype=torch.int64, device=device).index_add_(
                0, copies_T.clamp(max=self.nominal_k), weight_T)
            self._add_stat("k_hist", counts)
        # Under sequence parallelism each rank's loss values are shares of the micro-batch's: count the
        # forward once per group, so summed losses / summed forwards is the mean per micro-batch.
        forwards = 1.0 / self.groups.tp_size if self.groups.sp_group else 1.0
        self._add_stat("forwards", torch.tensor(forwards, device=device))

    def load_dense_ffn(self, dense: dict[str, Tensor]) -> None:
        """Upcycling: every routed expert starts as the dense FFN `dense` (megatron's MLP layout:
        linear_fc1.weight, linear_fc2.weight)."""
        if not isinstance(self.experts, GroupedExperts):
            raise ValueError(f"{type(self).__name__} cannot be upcycled from a dense FFN")
        self.experts.load_dense_ffn(dense)

    def begin_micro_batch(self, last: bool) -> None:
        """Called before each training micro-batch's forward; `last`: the optimizer step's last one."""

    def finish_step(self) -> None:
        """Called once per optimizer step, after the last backward and before the update."""
        self._step_tokens_per_expert = None

    def sync_buffers(self) -> None:
        """Make statistics kept per rank identical everywhere (called before evaluation and checkpoints)."""

    def validation_metrics(self) -> dict[str, float]:
        """Metrics of the validation pass since the last call (collective: every rank calls it)."""
        return {}

    def pop_stats(self) -> dict[str, Tensor]:
        """This rank's statistics since the last call (the caller reduces them over ranks), then reset."""
        stats, self._stats = self._stats, {}
        return stats

    def stat_layout(self) -> list[tuple[str, int]]:
        """(name, length) of every summed statistic, in a fixed order (k_max is reduced by max)."""
        layout = [("tokens_per_expert", self.num_experts), *((name, 1) for name in SCALAR_STATS)]
        return layout + ([("k_hist", self.nominal_k + 1)] if self.K_HISTOGRAM else [])
