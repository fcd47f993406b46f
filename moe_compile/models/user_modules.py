"""User-written MoE language models (no transformers): what the detector must handle beyond the HF families.

Three tiny causal LMs share one skeleton (embedding, a few pre-norm layers of causal attention + feed-forward,
a head) and differ in the feed-forward:
  * `gpt_fast`: gpt-fast's MoE: a `gate` Linear, 3-D `w1/w2/w3` gathered per token and combined with einsum, the
    experts under any attribute name, top-k in `num_activated_experts`; returns flat [T, H];
  * `modulelist`: a router Linear and a ModuleList of gated MLPs with Linears named as the user likes
    (`inp`, `gatey`, `outp`); top-k then softmax over the selected logits; returns [B, S, H];
  * `dense`: an ordinary MLP (no MoE block: nothing to fuse).
Knobs for negative tests: `activation` (one outside the fused op's family leaves the block unproven) and
`extra_norm` (a LayerNorm inside the MoE block: an unknown stateful child, fail closed).

Dimension legend: B = batch, S = sequence, T = B*S tokens, E = experts, K = top_k, H = hidden, I = intermediate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "elu": F.elu, "softplus": F.softplus}  # elu, softplus: unsupported


@dataclass
class UserLMConfig:
    vocab_size: int = 128
    hidden_size: int = 32  # H; with I, 2I and E pairwise distinct so no layout is ambiguous by shape
    num_layers: int = 2
    num_heads: int = 4
    feed_forward: str = "gpt_fast"  # gpt_fast | modulelist | dense
    num_experts: int = 6  # E
    top_k: int = 2  # K
    intermediate_size: int = 24  # I per expert (and the dense MLP's)
    activation: str = "silu"
    extra_norm: bool = False
    experts_attr: str = "expert_bank"  # where gpt_fast keeps its experts: any name works


class ConditionalFeedForward(nn.Module):
    """gpt-fast's experts: w1 (gate) and w3 (up) [E, I, H], w2 (down) [E, H, I], gathered per token."""

    def __init__(self, num_experts: int, hidden: int, inter: int, activation: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_experts, inter, hidden) / math.sqrt(hidden))
        self.w2 = nn.Parameter(torch.randn(num_experts, hidden, inter) / math.sqrt(inter))
        self.w3 = nn.Parameter(torch.randn(num_experts, inter, hidden) / math.sqrt(hidden))
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        w1, w3, w2 = self.w1[expert_indices], self.w3[expert_indices], self.w2[expert_indices]  # [T, K, ., .]
        x1 = self.act(torch.einsum("ti,taoi -> tao", x, w1))  # [T, K, I]
        x3 = torch.einsum("ti,taoi -> tao", x, w3)  # [T, K, I]
        return torch.einsum("tao,taio -> tai", x1 * x3, w2)  # [T, K, H]


class GptFastMoE(nn.Module):
    def __init__(self, cfg: UserLMConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts_attr = cfg.experts_attr
        setattr(self, cfg.experts_attr, ConditionalFeedForward(cfg.num_experts, cfg.hidden_size,
                                                               cfg.intermediate_size, cfg.activation))
        self.dim = cfg.hidden_size
        self.num_activated_experts = cfg.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, self.dim)  # [T, H]
        scores = F.softmax(self.gate(x), dim=-1)  # [T, E]
        weights, indices = torch.topk(scores, self.num_activated_experts, dim=-1)  # [T, K]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        expert_outs = getattr(self, self.experts_attr)(x, indices)  # [T, K, H]
        return torch.einsum("tai,ta -> ti", expert_outs, weights)  # [T, H]


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, activation: str):
        super().__init__()
        self.inp = nn.Linear(hidden, inter, bias=False)  # up
        self.gatey = nn.Linear(hidden, inter, bias=False)  # gate
        self.outp = nn.Linear(inter, hidden, bias=False)  # down
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outp(self.act(self.gatey(x)) * self.inp(x))


class ModuleListMoE(nn.Module):
    def __init__(self, cfg: UserLMConfig):
        super().__init__()
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.mlps = nn.ModuleList(GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation)
                                  for _ in range(cfg.num_experts))
        self.norm = nn.LayerNorm(cfg.hidden_size) if cfg.extra_norm else None
        self.top_k = cfg.top_k

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
        if self.norm is not None:
            x = self.norm(x)
        logits, ids = torch.topk(self.router(x), self.top_k, dim=-1)  # [T, K]
        weights = logits.softmax(dim=-1)  # [T, K]
        out = torch.zeros_like(x)
        for e, mlp in enumerate(self.mlps):
            token, slot = torch.where(ids == e)
            if token.numel():
                out.index_add_(0, token, mlp(x[token]) * weights[token, slot, None])
        return out.view_as(hidden)


class DenseMLP(nn.Module):
    def __init__(self, cfg: UserLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.fc2 = nn.Linear(2 * cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


FEED_FORWARDS = {"gpt_fast": GptFastMoE, "modulelist": ModuleListMoE, "dense": DenseMLP}


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)  # [B, heads, S, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, S, d]
        return self.proj(out.transpose(1, 2).reshape(b, s, h))


class UserLayer(nn.Module):
    def __init__(self, cfg: UserLMConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size)
        self.attn = CausalSelfAttention(cfg.hidden_size, cfg.num_heads)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size)
        self.feed_forward = FEED_FORWARDS[cfg.feed_forward](cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.feed_forward(self.ffn_norm(x)).view_as(x)  # gpt-fast's MoE returns flat [T, H]


class UserLM(nn.Module):
    """ids [B, S] -> logits [B, S, V]."""

    def __init__(self, cfg: UserLMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(UserLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # [B, S, H]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def build_user_lm(**config) -> UserLM:
    return UserLM(UserLMConfig(**config))


@torch.no_grad()
def greedy_generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache: [B, S] -> [B, S + max_new_tokens]."""
    for _ in range(max_new_tokens):
        next_ids = model(ids)[:, -1].argmax(dim=-1, keepdim=True)  # [B, 1]
        ids = torch.cat([ids, next_ids], dim=1)
    return ids
