"""Per-family ONNX export adapters: exact, real-valued stand-ins for computations torch's ONNX exporter cannot lower,
in place only for the duration of an export (`onnx_adapters(model)`, used by `onnx_export.export_onnx`).

Llama 4 (`transformers.models.llama4.modeling_llama4`): the text rotary embedding returns complex `freqs_cis =
polar(1, angle) * attention_scaling` and `apply_rotary_emb` multiplies the pairs `(x[..., 0::2], x[..., 1::2])`, viewed
as complex numbers, by it; torch 2.13's exporter has no lowering for complex tensors. During the export every
`Llama4TextRotaryEmbedding` of the model returns the same numbers as real `[..., D/2, 2]` = `(cos, sin) * scaling`
of the same angles, and the module's `apply_rotary_emb` rotates the pairs with real arithmetic, exactly as complex
multiplication does: `(a + ib)(c + is) = (ac - bs) + i(as + bc)`. The replacement `apply_rotary_emb` still takes
complex `freqs_cis` (it then runs the original), so other Llama 4 models in the process are unaffected. Everything
is restored on exit, also on error. The vision tower's rotary (`vision_apply_rotary_emb`) is not patched: only the
text model is exported.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

LLAMA4_MODULE = "transformers.models.llama4.modeling_llama4"


def llama4_rotary_forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
    """`Llama4TextRotaryEmbedding.forward` returning `view_as_real(freqs_cis)`: [B, S, D/2, 2] = (cos, sin) * scale."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # [B, S, D/2]
    return torch.stack([torch.cos(freqs), torch.sin(freqs)], dim=-1) * self.attention_scaling


def _real_apply_rotary_emb(original: Callable) -> Callable:
    def apply_rotary_emb(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
        """`apply_rotary_emb` with real `freqs_cis` [B, S, D/2, 2]; complex `freqs_cis` runs the original."""
        if freqs_cis.is_complex():
            return original(xq, xk, freqs_cis)
        cos, sin = freqs_cis[:, :, None, :, 0], freqs_cis[:, :, None, :, 1]  # [B, S, 1, D/2]

        def rotate(x: Tensor) -> Tensor:  # x [B, S, heads, D]: pairs (x[..., 0::2], x[..., 1::2])
            pairs = x.float().reshape(*x.shape[:-1], -1, 2)
            real, imag = pairs[..., 0], pairs[..., 1]
            out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
            return out.flatten(3).type_as(x)

        return rotate(xq), rotate(xk)

    apply_rotary_emb.__wrapped__ = original  # type: ignore[attr-defined]
    return apply_rotary_emb


@contextlib.contextmanager
def llama4_real_rotary(model: nn.Module) -> Iterator[bool]:
    """Real-valued Llama 4 text RoPE for the duration; yields whether the model has any (nothing patched if not)."""
    modeling = sys.modules.get(LLAMA4_MODULE)
    rotary_cls = getattr(modeling, "Llama4TextRotaryEmbedding", None)
    rotaries = [m for m in model.modules() if rotary_cls is not None and isinstance(m, rotary_cls)]
    if not rotaries:
        yield False
        return
    original_apply = modeling.apply_rotary_emb
    wrap = getattr(modeling, "dynamic_rope_update", lambda f: f)  # keep the original's dynamic-RoPE hook
    saved = [(m, m.__dict__.get("forward")) for m in rotaries]  # instance-level forwards, if any were set
    try:
        modeling.apply_rotary_emb = _real_apply_rotary_emb(original_apply)
        for m in rotaries:
            m.forward = types.MethodType(wrap(llama4_rotary_forward), m)
        yield True
    finally:
        modeling.apply_rotary_emb = original_apply
        for m, forward in saved:
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward


# family adapters, each `model -> context manager yielding whether it applied`
ADAPTERS: dict[str, Callable[[nn.Module], contextlib.AbstractContextManager[bool]]] = {
    "llama4_real_rotary": llama4_real_rotary,
}


@contextlib.contextmanager
def onnx_adapters(model: nn.Module) -> Iterator[list[str]]:
    """Apply every adapter that fits `model` for the duration; yield the names of those applied."""
    with contextlib.ExitStack() as stack:
        applied = [name for name, adapter in ADAPTERS.items() if stack.enter_context(adapter(model))]
        yield applied
