"""Shape registry of the MoE layer benchmarks: each entry builds the transformers block from its config and
hands our op the same weights in the op's canonical layout (w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I]).

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int  # H
    inter: int  # I
    experts: int  # E
    top_k: int  # K
    op_kwargs: dict = field(default_factory=dict)  # routing / epilogue arguments of fused_moe
    builder: str = "qwen3"  # which transformers block is the anchor (see BUILDERS)
    anchor_note: str = ""  # what the HF anchor computes differently, if anything

    def expert_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of one expert's weights (w13 + w2, + biases when the op has them)."""
        b = 3 * self.hidden * self.inter * dtype_bytes
        if self.op_kwargs.get("expert_bias"):
            b += (2 * self.inter + self.hidden) * dtype_bytes
        return b


SHAPES = {
    "qwen3-30b-a3b": MoEShape("qwen3-30b-a3b", 2048, 768, 128, 8, dict(scoring="softmax", renormalize=True)),
    "mixtral-8x7b": MoEShape("mixtral-8x7b", 4096, 14336, 8, 2, dict(scoring="softmax", renormalize=True),
                             builder="mixtral"),
    "gpt-oss-20b": MoEShape("gpt-oss-20b", 2880, 2880, 32, 4, dict(scoring="softmax", renormalize=True,
                            activation="swiglu_oai", expert_bias=True, router_bias=True), builder="gpt_oss"),
    "deepseek-v3": MoEShape("deepseek-v3", 7168, 2048, 256, 8, dict(
        scoring="sigmoid", renormalize=True, n_group=8, topk_group=4, correction_bias=True, routed_scaling=2.5),
        builder="qwen3", anchor_note="HF anchor: Qwen3 block at these dims (softmax routing, no shared expert)"),
}


def _init_(module: torch.nn.Module, std: float) -> None:
    """transformers leaves 3-D expert parameters uninitialised (torch.empty): fill every parameter with noise."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def build_qwen3(shape: MoEShape):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.inter, num_experts=shape.experts,
                         num_experts_per_tok=shape.top_k, norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(cfg)
    _init_(block, shape.hidden**-0.5)
    w = dict(router_weight=block.gate.weight, router_bias=None, w13=block.experts.gate_up_proj,
             w2=block.experts.down_proj, b13=None, b2=None)
    return block, cfg, w


def build_mixtral(shape: MoEShape):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_local_experts=shape.experts,
                        num_experts_per_tok=shape.top_k)
    block = MixtralSparseMoeBlock(cfg)
    _init_(block, shape.hidden**-0.5)
    w = dict(router_weight=block.gate.weight, router_bias=None, w13=block.experts.gate_up_proj,
             w2=block.experts.down_proj, b13=None, b2=None)
    return block, cfg, w


def build_gpt_oss(shape: MoEShape):
    """GPT-OSS stores gate_up [E, H, 2I] with gate and up columns interleaved and down [E, I, H]: copy them into
    the canonical layout (the benchmark checks our output against the block's, which catches a wrong mapping)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(hidden_size=shape.hidden, intermediate_size=shape.inter, num_local_experts=shape.experts,
                       num_experts_per_tok=shape.top_k)
    block = GptOssMLP(cfg)
    _init_(block, shape.hidden**-0.5)
    ex = block.experts
    gate_up = ex.gate_up_proj  # [E, H, 2I] interleaved
    w13 = torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=2).transpose(1, 2).contiguous()  # [E, 2I, H]
    b13 = torch.cat([ex.gate_up_proj_bias[:, 0::2], ex.gate_up_proj_bias[:, 1::2]], dim=1).contiguous()  # [E, 2I]
    w2 = ex.down_proj.transpose(1, 2).contiguous()  # [E, H, I]
    w = dict(router_weight=block.router.weight, router_bias=block.router.bias, w13=w13, w2=w2, b13=b13,
             b2=ex.down_proj_bias)
    return block, cfg, w


BUILDERS: dict[str, Callable] = {"qwen3": build_qwen3, "mixtral": build_mixtral, "gpt_oss": build_gpt_oss}


def build(shape: MoEShape, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """-> (HF block, its config, op tensors dict incl. correction_bias). Built directly in dtype on device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            block, cfg, w = BUILDERS[shape.builder](shape)
    finally:
        torch.set_default_dtype(previous)
    w["correction_bias"] = (torch.rand(shape.experts, device=device) * 0.1
                            if shape.op_kwargs.get("correction_bias") else None)
    return block.eval(), cfg, {k: (v.detach() if v is not None else None) for k, v in w.items()}


def op_scalars(shape: MoEShape, cfg) -> dict:
    """The scalar arguments of fused_moe for this shape."""
    o = shape.op_kwargs
    return dict(top_k=shape.top_k, scoring=o.get("scoring", "softmax"), renormalize=o.get("renormalize", True),
                n_group=o.get("n_group", 1), topk_group=o.get("topk_group", 1),
                routed_scaling=o.get("routed_scaling", 1.0), weight_on_input=False,
                activation=o.get("activation", "silu"), alpha=float(getattr(cfg, "swiglu_alpha", 1.702)),
                limit=float(getattr(cfg, "swiglu_limit", 7.0)))
