"""DA-MoE (arXiv:2409.06669): a variable number of experts per token, from token importance (docs/variants.md §3).

importance_mode 'attention_received' (the paper, bidirectional models): importance comes from this block's
attention (variants/dynamic/megatron.py hands it over as TokenInfo.importance). 'predicted' (a named deviation for
causal models): a sigmoid head on the token's own router input predicts it; an MSE loss trains the head toward
the attention-received target, which only ever enters that loss, so output j depends on tokens <= j only.

K = clamp(ceil(s K_max), K_min, K_max), or matched to a mean-K budget ('batch': exact per micro-batch;
'running': a scale calibrated over past micro-batches). Routing: each token's K most probable experts of a
fp32 softmax router, through the shared dispatcher (no padding to K_max).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megamoe.moe.layer import LayerShape, MoELayer, TokenInfo
from megamoe.moe.routing import Routing, variable_topk_route
from megamoe.parallel.comm import all_reduce_sum, reduce_grad
from megamoe.parallel.groups import ParallelGroups
from megamoe.variants.dynamic import DynamicMoEConfig
from megamoe.variants.dynamic.importance import budget_experts, budget_scale, experts_per_token, running_experts


class DynamicMoE(MoELayer):
    """DA-MoE routing over the shared MoE pipeline."""

    K_HISTOGRAM = True
    FP32_BUFFERS = ("budget_scale",)

    def __init__(self, cfg: DynamicMoEConfig, shape: LayerShape, groups: ParallelGroups) -> None:
        super().__init__(cfg, shape, groups, nominal_k=cfg.k_max)
        self.router = torch.nn.Linear(shape.hidden_size, cfg.num_experts, bias=False)
        torch.nn.init.normal_(self.router.weight, 0.0, shape.init_std)
        if cfg.importance_mode == "predicted":
            self.importance_head = torch.nn.Linear(shape.hidden_size, 1)  # zero init: s_hat = 0.5 everywhere
            torch.nn.init.zeros_(self.importance_head.weight)
            torch.nn.init.zeros_(self.importance_head.bias)
        if cfg.budget == "running":
            # The calibrated scale c, identical on every rank and saved with the model. It starts at 2 k_mean:
            # the zero-initialised head predicts 0.5 for every token, so the first batches get K = k_mean.
            self.register_buffer("budget_scale", torch.tensor(2.0 * cfg.budget_k_mean))

    def route(self, x_TD: Tensor, tokens: TokenInfo) -> tuple[Routing, Tensor | None]:
        s_T, router_loss = self._importance(x_TD, tokens)
        k_T = self._experts_per_token(s_T, tokens)
        logits_TE = F.linear(x_TD.float(), reduce_grad(self.router.weight, self.groups.sp_group).float())
        routing = variable_topk_route(logits_TE, k_T, self.cfg.k_max, self.cfg.renormalize, tokens.valid_T)
        return routing, router_loss

    def _importance(self, x_TD: Tensor, tokens: TokenInfo) -> tuple[Tensor, Tensor | None]:
        """This rank's tokens' importance in [0, 1] (no gradient), and the predictor's weighted MSE loss."""
        target = None if tokens.importance is None else tokens.importance.score_T[tokens.local_slice()]
        if self.cfg.importance_mode == "attention_received":
            if target is None:
                raise RuntimeError("importance_mode=attention_received needs the layer's attention statistics "
                                   "(build the model with megamoe.models: ImportanceAttention feeds them)")
            return target, None
        head = self.importance_head
        weight, bias = (reduce_grad(p, self.groups.sp_group) for p in (head.weight, head.bias))
        # Input detached: the MSE trains the head only, never the backbone (docs/variants.md §3.2 (b)).
        predicted_T = torch.sigmoid(F.linear(x_TD.detach().float(), weight.float(), bias.float())).squeeze(-1)
        loss = None
        if self.training and target is not None:
            valid_T = _valid(tokens, x_TD)
            squared = (predicted_T - target.float()).square() * valid_T
            total = all_reduce_sum(valid_T.sum(), self.groups.sp_group).clamp(min=1.0)
            loss = self.cfg.predictor_loss_coeff * squared.sum() / total
        return predicted_T.detach(), loss

    def _experts_per_token(self, s_T: Tensor, tokens: TokenInfo) -> Tensor:
        cfg, valid_T = self.cfg, tokens.valid_T
        if cfg.budget == "batch":  # over the whole micro-batch (all TP slices), then this rank's slice
            full = tokens.importance
            k_full = budget_experts(full.score_T, full.valid_T, tokens.num_sequences, cfg.k_min, cfg.k_max,
                                    cfg.budget_k_mean)
            return k_full[tokens.local_slice()]
        if cfg.budget == "running":
            return running_experts(s_T, valid_T, self._running_scale(s_T, valid_T), cfg.k_min, cfg.k_max)
        return experts_per_token(s_T, valid_T, cfg.k_min, cfg.k_max)

    @torch.no_grad()
    def _running_scale(self, s_T: Tensor, valid_T: Tensor | None) -> Tensor:
        """The c calibrated on earlier micro-batches; then, in training, c <- m c + (1 - m) c_batch. Using this
        batch's own solution would make a token's K depend on later tokens (it is a batch-wide quantity)."""
        scale = self.budget_scale.clone()  # a tensor: reading it on the host would be a sync per micro-batch
        if self.training:
            valid = valid_T if valid_T is not None else torch.ones_like(s_T, dtype=torch.bool)
            batch = budget_scale(s_T, valid, self.cfg.k_min, self.cfg.k_max, self.cfg.budget_k_mean)
            # The update rounded to the buffer's fp32 before it is added, as a Python number would be.
            self.budget_scale.mul_(self.cfg.budget_momentum).add_(((1.0 - self.cfg.budget_momentum) * batch).float())
        return scale

    @torch.no_grad()
    def finish_step(self) -> None:
        """Keep the running budget scale identical on every rank (averaged once per optimizer step)."""
        super().finish_step()
        if self.cfg.budget == "running" and self.groups.tp_dp_group is not None:
            total = all_reduce_sum(self.budget_scale.clone(), self.groups.tp_dp_group)
            self.budget_scale.copy_(total / torch.distributed.get_world_size(self.groups.tp_dp_group))


def _valid(tokens: TokenInfo, x_TD: Tensor) -> Tensor:
    if tokens.valid_T is None:
        return torch.ones(x_TD.shape[0], device=x_TD.device)
    return tokens.valid_T.float()
