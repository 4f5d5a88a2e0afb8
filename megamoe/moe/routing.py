"""The Routing record (a flat list of routed copies) and the token-choice top-k router.

Shapes: T tokens on this rank, D hidden, E experts (global), k experts per token, N routed copies.
Nothing assumes a fixed k: top-k is the case N = T*k; a token may have 0 copies (pads, dropped copies,
DA-MoE), and an expert or rank may receive none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from megamoe.moe.host import count_per_bin, where_true


@dataclass(frozen=True)
class Routing:
    """Routed copies, ordered by token, then by expert."""

    token_N: Tensor
    """int64 in [0, T): the token copy n carries."""
    expert_N: Tensor
    """int64 in [0, E): global expert id."""
    weight_N: Tensor
    """fp32 combine weight; the router's gradient flows through it."""
    probs_TE: Tensor | None
    """fp32 router probabilities over all experts (for balancing losses); None where no T x E matrix exists."""
    logits_TE: Tensor | None
    """fp32 router logits (for the z-loss)."""
    valid_T: Tensor | None
    """bool, False for padding tokens (they carry no copies and no statistics); None: all valid."""
    num_tokens: int
    num_experts: int

    def copies_per_token(self) -> Tensor:
        """K_t for every token (0 for pads)."""
        return count_per_bin(self.token_N, self.num_tokens)

    def tokens_per_expert(self) -> Tensor:
        return count_per_bin(self.expert_N, self.num_experts)

    def routing_map(self) -> Tensor:
        """bool [T, E]: True where a copy exists."""
        out = torch.zeros(self.num_tokens, self.num_experts, dtype=torch.bool, device=self.token_N.device)
        out[self.token_N, self.expert_N] = True
        return out

    def combine_weights(self) -> Tensor:
        """fp32 [T, E]: the weights scatter-added (duplicates sum), exactly 0 off the map."""
        out = torch.zeros(self.num_tokens, self.num_experts, dtype=self.weight_N.dtype, device=self.weight_N.device)
        return out.index_put((self.token_N, self.expert_N), self.weight_N, accumulate=True)

    def select(self, keep_N: Tensor, why: str) -> Routing:
        """The routing with only the copies where keep_N is True (order kept); `why` names the host read of their
        number (megamoe/moe/host.py)."""
        index_N = where_true(keep_N, why)
        return Routing(token_N=self.token_N[index_N], expert_N=self.expert_N[index_N],
                       weight_N=self.weight_N.index_select(0, index_N), probs_TE=self.probs_TE,
                       logits_TE=self.logits_TE, valid_T=self.valid_T, num_tokens=self.num_tokens,
                       num_experts=self.num_experts)


def routing_from_topk(expert_TK: Tensor, weight_TK: Tensor, num_experts: int, probs_TE: Tensor | None = None,
                      logits_TE: Tensor | None = None, valid_T: Tensor | None = None) -> Routing:
    """Flatten a fixed-k choice into copies (experts ascending within each token); pads get no copies."""
    num_tokens, k = expert_TK.shape
    expert_TK, sort_TK = expert_TK.sort(dim=1)
    weight_TK = weight_TK.gather(1, sort_TK)
    token_N = torch.arange(num_tokens, device=expert_TK.device).repeat_interleave(k)
    routing = Routing(token_N=token_N, expert_N=expert_TK.reshape(-1), weight_N=weight_TK.reshape(-1),
                      probs_TE=probs_TE, logits_TE=logits_TE, valid_T=valid_T, num_tokens=num_tokens,
                      num_experts=num_experts)
    if valid_T is None:
        return routing
    return routing.select(valid_T[token_N], "copies of the tokens that are not padding")


def topk_route(logits_TE: Tensor, k: int, pre_softmax: bool, valid_T: Tensor | None = None,
               expert_bias_E: Tensor | None = None, skip: int = 0) -> Routing:
    """Token-choice top-k in fp32.

    pre_softmax=True: weights are the chosen experts' probabilities under the softmax over all experts
    (Switch; no renormalisation). False: softmax over the chosen k logits (Mixtral; equals GShard's
    renormalised top-2). `expert_bias_E` shifts the selection only, never the weights (DeepSeek-V3).
    `skip` > 0 passes over each token's `skip` best experts and takes ranks skip+1 ... skip+k (robustness tests).
    """
    logits_TE = logits_TE.float()
    probs_TE = logits_TE.softmax(dim=-1)
    scores_TE = probs_TE if pre_softmax else logits_TE
    choice_TE = scores_TE if expert_bias_E is None else scores_TE + expert_bias_E
    expert_TK = choice_TE.topk(k + skip, dim=-1).indices[:, skip:]
    chosen_TK = scores_TE.gather(1, expert_TK)
    weight_TK = chosen_TK if pre_softmax else chosen_TK.softmax(dim=-1)
    return routing_from_topk(expert_TK, weight_TK, probs_TE.shape[1], probs_TE, logits_TE, valid_T)


def expert_capacity(num_copies: int, num_experts: int, capacity_factor: float) -> int:
    """Copies one expert accepts from this rank: ceil(factor x copies / experts) (at least 1)."""
    return max(1, math.ceil(capacity_factor * num_copies / num_experts))


def apply_capacity(routing: Routing, capacity: int, policy: str) -> tuple[Routing, Tensor]:
    """Keep at most `capacity` copies per expert: by router probability ('probs') or token order
    ('position'). Returns the reduced routing and the number of dropped copies (a tensor: no host sync)."""
    num_copies = routing.expert_N.numel()
    if policy == "probs":
        score_N = (routing.probs_TE[routing.token_N, routing.expert_N] if routing.probs_TE is not None
                   else routing.weight_N).detach()
        order_N = score_N.argsort(descending=True, stable=True)
    else:
        order_N = torch.arange(num_copies, device=routing.expert_N.device)
    # Group by expert, keeping the policy's order inside each group; a copy's rank in its group decides.
    order_N = order_N[routing.expert_N[order_N].argsort(stable=True)]
    counts_E = routing.tokens_per_expert()
    group_start_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_group = torch.arange(num_copies, device=order_N.device) - group_start_E[routing.expert_N[order_N]]
    keep_N = torch.zeros(num_copies, dtype=torch.bool, device=order_N.device)
    keep_N[order_N] = rank_in_group < capacity
    return routing.select(keep_N, "copies within the expert capacity"), num_copies - keep_N.sum()


def variable_topk_route(logits_TE: Tensor, k_T: Tensor, k_max: int, renormalize: str,
                        valid_T: Tensor | None = None) -> Routing:
    """Token t takes its k_T[t] most probable experts (0 <= k_T <= k_max), in fp32.

    Weights: the chosen probabilities, renormalised over the token's choice when renormalize is 'always'
    or ('k>1' and k_T > 1): constant K then reproduces Switch (K = 1) and Mixtral (K = k) exactly.
    """
    logits_TE = logits_TE.float()
    probs_TE = logits_TE.softmax(dim=-1)
    top_TK = logits_TE.topk(k_max, dim=-1)
    keep_TK = torch.arange(k_max, device=k_T.device)[None, :] < k_T[:, None]
    if valid_T is not None:
        keep_TK &= valid_T[:, None]
    raw_TK = probs_TE.gather(1, top_TK.indices) * keep_TK
    # Renormalised weights as Mixtral computes them, a softmax over the chosen logits (bit-identical to it for
    # constant K); tokens with no expert get none (their row would be 0/0).
    chosen_logits_TK = top_TK.values.masked_fill(~keep_TK, float("-inf"))
    renormalised_TK = chosen_logits_TK.softmax(dim=-1).nan_to_num(0.0)
    renorm_T = (k_T > 1) if renormalize == "k>1" else torch.full_like(k_T, renormalize == "always", dtype=torch.bool)
    weight_TK = torch.where(renorm_T[:, None], renormalised_TK, raw_TK)
    # Unchosen slots sort last (expert id E) and are then dropped: copies stay ordered by token, then expert.
    expert_TK = top_TK.indices.masked_fill(~keep_TK, logits_TE.shape[1])
    expert_TK, sort_TK = expert_TK.sort(dim=1)
    weight_TK, keep_TK = weight_TK.gather(1, sort_TK), keep_TK.gather(1, sort_TK)
    token_N = torch.arange(logits_TE.shape[0], device=logits_TE.device).repeat_interleave(k_max)
    kept_N = where_true(keep_TK.reshape(-1), "copies of a variable number of experts per token")
    return Routing(token_N=token_N[kept_N], expert_N=expert_TK.reshape(-1)[kept_N],
                   weight_N=weight_TK.reshape(-1).index_select(0, kept_N), probs_TE=probs_TE, logits_TE=logits_TE,
                   valid_T=valid_T, num_tokens=logits_TE.shape[0], num_experts=logits_TE.shape[1])
