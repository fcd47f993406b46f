"""The `cuda` backend of `fused_moe`: csrc/moe_decode.cu, one persistent launch per MoE layer at decode sizes.

Router logits, routing, gate_up, activation, down and the combine all run in that one launch (no host
synchronisation, so CUDA graphs capture it and replay it correctly when the routing changes). Its workspace (grid
barrier counters, router-logit sums) is a zeroed temporary taken from the caching allocator on every call, like its
fp32 accumulator: nothing outlives a call but the output, as Inductor's cudagraph trees require. Decode sizes are
T <= 16 tokens, top_k <= 16, E <= 512, bf16 or fp16; any other case runs the `triton` backend (logged once at debug
level), and without triton raises `UnsupportedByCuda` naming the fallback. `fused_moe_packed` with FP8 weights
(e4m3, per-output-channel scales) and dynamic per-token FP8 activations runs the same launch with e4m3 tensor-core
MMAs (csrc/moe_decode_fp8.cuh); other packed formats (2:4) run the triton packed backend.

Experimental: importing it raises ImportError unless MOE_COMPILE_CUDA_BACKEND=1 (csrc/NOTES.md says why), so
`auto` keeps using triton. When enabled, the kernel is compiled with nvcc for sm_90a on first import on a Hopper
GPU and cached under $MOE_COMPILE_CACHE or ~/.cache/moe_compile (keyed by the sources, the flags and nvcc's
version), then called through a C ABI with ctypes: no torch headers, so no rebuild per torch version. Importing
this module raises ImportError, cheaply, without a CUDA device, on a GPU other than sm_90, or when nvcc is
missing or the build fails; backends.py records the reason and `auto` uses triton.

Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

ENABLE_ENV = "MOE_COMPILE_CUDA_BACKEND"
if not torch.cuda.is_available():
    raise ImportError("the cuda backend needs a CUDA device (none visible)")
if os.environ.get(ENABLE_ENV) != "1":  # cheap: nothing is built unless asked for
    raise ImportError(f"the cuda backend is experimental and off by default (H100 measurements so far: slower than "
                      f"triton, see csrc/NOTES.md); set {ENABLE_ENV}=1 to build and register it")

from moe_compile.kernels.op import BackendUnsupported, register_backend, register_packed_backend  # noqa: E402
from moe_compile.quant.fp8 import FP8_DTYPE  # noqa: E402

log = logging.getLogger("moe_compile")

SOURCES = ("moe_decode.cu", "moe_decode_common.cuh", "moe_decode_routing.cuh", "moe_decode_unit.cuh",
           "moe_decode_fp8.cuh")
NVCC_FLAGS = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a"]
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "swiglu_oai": 4}
_INT32_MAX = 2**31 - 1


class UnsupportedByCuda(BackendUnsupported):
    """A case outside the cuda kernel's limits when the triton backend is not there to take it."""


def _source_dir() -> Path:
    """csrc/ beside the package when installed (package data), else at the root of the source tree."""
    here = Path(__file__).resolve().parent.parent  # .../moe_compile
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise ImportError(f"the cuda backend's sources ({SOURCES[0]}) are missing from this install")


def _find_nvcc() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.path.join(CUDA_HOME, "bin", "nvcc")] if CUDA_HOME else []
    candidates.append(shutil.which("nvcc") or "")
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    raise ImportError("the cuda backend is built on first use with nvcc, which was not found: install the CUDA "
                      "toolkit (or set CUDA_HOME); the triton backend runs meanwhile")


def _cache_dir() -> Path:
    root = os.environ.get("MOE_COMPILE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe_compile")
    return Path(root) / "cuda_moe"


def build_library(defines: tuple[str, ...] = ()) -> Path:
    """Compile csrc/moe_decode.cu into a shared library once per (sources, flags, nvcc); returns its path.
    defines: tuning macros of moe_decode.cu ("MOE_UNROLL=2", ...); $MOE_COMPILE_CUDA_DEFINES (space-separated)
    adds to them."""
    flags = NVCC_FLAGS + [f"-D{d}" for d in (*defines, *os.environ.get("MOE_COMPILE_CUDA_DEFINES", "").split())]
    src = _source_dir()
    nvcc = _find_nvcc()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((src / name).read_bytes())
    digest.update(" ".join(flags).encode() + version.encode())
    target = _cache_dir() / f"moe_decode_{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the cuda fused_moe kernel (once, cached in %s)", target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([nvcc, *flags, "-o", str(out), str(src / SOURCES[0])],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise ImportError(f"building the cuda backend with {nvcc} failed (the triton backend runs "
                              f"instead):\n{tail}")
        os.replace(out, target)  # atomic: concurrent builders each publish a complete file
    return target


def _check_device() -> None:
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        raise ImportError(f"the cuda backend is written for Hopper (sm_90a); this GPU is sm_{major}{minor}")


class MoeArgs(ctypes.Structure):
    """Mirror of moe::MoeArgs (csrc/moe_decode_common.cuh): every field 8 bytes."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "x", "router_w", "router_b", "corr", "w13", "w2", "b13", "b2", "out", "acc", "logits", "sync",
        "route_ids", "route_weights", "timing", "w13_scale", "w2_scale", "xq", "x_scale")] + [
            (name, ctypes.c_int64) for name in (
            "T", "E", "K", "H", "I", "gated", "x_dtype", "router_dtype", "corr_dtype", "fp8", "scoring", "renormalize",
            "n_group", "topk_group", "weight_on_input", "activation")] + [
        (name, ctypes.c_double) for name in ("routed_scaling", "alpha", "limit")]


def load_library(defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build (cached) and load the kernel library; `defines` select tuning variants (benchmarks)."""
    _check_device()
    lib = ctypes.CDLL(str(build_library(defines)))
    lib.moe_decode_launch.restype = ctypes.c_char_p
    lib.moe_decode_launch.argtypes = [ctypes.POINTER(MoeArgs), ctypes.c_void_p, ctypes.c_int]
    lib.moe_decode_limit.restype = ctypes.c_int
    lib.moe_decode_limit.argtypes = [ctypes.c_int]
    if lib.moe_decode_limit(3) != ctypes.sizeof(MoeArgs):
        raise ImportError("csrc/moe_decode_common.cuh and cuda_moe.MoeArgs disagree on the argument layout")
    return lib


_LIB = load_library()
MAX_TOKENS, MAX_TOP_K, MAX_EXPERTS, _, TIME_POINTS = (_LIB.moe_decode_limit(i) for i in range(5))
FALLBACK = "use fused_moe(..., backend='triton') or backend='reference'"


_LOGGED: set[str] = set()
_SYNC_WORDS = 4  # moe::SyncSlot: barrier count, barrier generation, done count, timed-out flag


def new_workspace(tokens: int, experts: int, device: torch.device) -> Tensor:
    """A zeroed workspace for one launch: int32 [4 + T * E], the kernel's grid-barrier and done counters (SyncSlot)
    followed by the fp32 router-logit sums [T, E] (zero bits = 0.0). The op allocates one per call through the
    caching allocator, so nothing outlives the call and CUDA-graph capture (Inductor's cudagraph trees included)
    owns no hidden state. The kernel leaves it zeroed again but for the barrier's generation word (any value
    works), so a caller may also reuse one, on one stream, for any T * E up to its size."""
    return torch.zeros(_SYNC_WORDS + tokens * experts, dtype=torch.int32, device=device)


def unsupported_reason(x: Tensor, router_weight: Tensor, router_bias: Optional[Tensor],
                       correction_bias: Optional[Tensor], w13: Tensor, w2: Tensor, b13: Optional[Tensor],
                       b2: Optional[Tensor], top_k: int, n_group: int, topk_group: int, activation: str,
                       fp8: bool = False) -> str:
    """Why the kernel cannot run this case ('' when it can). Every real limit, checked before any launch.
    fp8: the expert weights are e4m3 (`packed_unsupported_reason` checks the rest of the FP8 case)."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        return f"x must be [T, H] and expert weights 3-D, got {tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}"
    tokens, hidden = x.shape
    experts, _, inter = w2.shape
    problems = []
    if not x.is_cuda or not _is_hopper(x.device.index or 0):
        problems.append(f"device {x.device} is not a Hopper GPU")
    if x.dtype not in (torch.bfloat16, torch.float16):
        problems.append(f"dtype {x.dtype} (kernel: bf16, fp16)")
    weight_dtype = FP8_DTYPE if fp8 else x.dtype
    if w13.dtype != weight_dtype or w2.dtype != weight_dtype or any(t is not None and t.dtype != x.dtype
                                                                     for t in (b13, b2)):
        problems.append(f"expert weights must be {weight_dtype} and biases {x.dtype}")
    if router_weight.dtype not in (x.dtype, torch.float32):
        problems.append(f"router dtype {router_weight.dtype} (kernel: x's dtype or fp32)")
    if correction_bias is not None and correction_bias.dtype not in _DTYPE_CODES:
        problems.append(f"correction bias dtype {correction_bias.dtype}")
    if tokens > MAX_TOKENS:
        problems.append(f"{tokens} tokens (decode kernel: <= {MAX_TOKENS})")
    if top_k > MAX_TOP_K or experts > MAX_EXPERTS:
        problems.append(f"top_k {top_k} / {experts} experts (kernel: <= {MAX_TOP_K} / <= {MAX_EXPERTS})")
    if n_group > 1 and topk_group < n_group and (experts % n_group or top_k > topk_group * (experts // n_group)):
        problems.append(f"grouped top-k with {n_group} groups, {topk_group} kept, top_k {top_k}")
    if activation not in _ACTIVATIONS:
        problems.append(f"activation {activation!r}")
    if w13.shape[1] not in (inter, 2 * inter) or w13.shape[2] != hidden or w2.shape[1] != hidden:
        problems.append(f"weight shapes w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} for H={hidden}, I={inter}")
    if w13.shape[1] * hidden > _INT32_MAX or hidden * inter > _INT32_MAX:
        problems.append("one expert's weights exceed 2^31 elements")
    tensors = (router_weight, router_bias, correction_bias, w13, w2, b13, b2)
    if not all(t is None or t.is_contiguous() for t in tensors):
        problems.append("router / expert tensors must be contiguous")
    return "; ".join(problems)


@functools.lru_cache(maxsize=None)
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def _aligned(*tensors: Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def cuda_fused_moe(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling: float,
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
) -> Tensor:
    """Same contract as `reference.torch_fused_moe`: [T, H] -> [T, H] in x's dtype."""
    args = (x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, top_k, scoring, renormalize, n_group,
            topk_group, routed_scaling, weight_on_input, activation, alpha, limit)
    reason = unsupported_reason(x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, top_k, n_group,
                                topk_group, activation)
    if reason:
        return _delegate(reason, args)
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    return launch(*args)[0]


def _delegate(reason: str, args: tuple, packed: bool = False) -> Tensor:
    """Shapes and variants beyond the decode kernel run the triton backend (`fused_moe`'s, or with `packed`
    `fused_moe_packed`'s), logged once per reason."""
    op_name = "fused_moe_packed" if packed else "fused_moe"
    try:
        if packed:
            from moe_compile.kernels.triton_packed import triton_fused_moe_packed as triton_backend
        else:
            from moe_compile.kernels.triton_moe import triton_fused_moe as triton_backend
    except ImportError as exc:
        raise UnsupportedByCuda(f"cuda {op_name} cannot run this case: {reason}; the triton backend is unavailable "
                                f"({exc}). {FALLBACK}") from exc
    if reason not in _LOGGED:
        _LOGGED.add(reason)
        log.debug("%s cuda backend: %s; running the triton backend", op_name, reason)
    return triton_backend(*args)


def launch(x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, top_k, scoring, renormalize, n_group,
           topk_group, routed_scaling, weight_on_input, activation, alpha, limit,
           with_routing: bool = False, timing: Optional[Tensor] = None, lib: Optional[ctypes.CDLL] = None,
           workspace: Optional[Tensor] = None, w13_scale: Optional[Tensor] = None,
           w2_scale: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """One kernel launch for a supported case -> (out [T, H], and with_routing: expert ids [T, K] int32 and
    weights [T, K] fp32 as the kernel selected them, for tests). timing: int64 [G, TIME_POINTS] to receive each
    CTA's %globaltimer at the phase boundaries; lib: a variant from load_library (benchmarks); workspace: from
    new_workspace (default: a fresh one, freed with the call), to read barrier_timed_out from afterwards.
    FP8: w13 / w2 in e4m3 with w13_scale [E, 2I or I] / w2_scale [E, H] fp32 (activations quantized in the kernel,
    x per token, the intermediate per 32-column block of a routed row)."""
    tokens, hidden = x.shape
    experts, _, inter = w2.shape
    x = x.contiguous()
    if router_bias is not None:
        router_bias = router_bias.to(router_weight.dtype).contiguous()  # as reference.router_logits
    device = x.device
    stream = torch.cuda.current_stream(device).cuda_stream
    if workspace is None:
        workspace = new_workspace(tokens, experts, device)
    elif workspace.dtype != torch.int32 or not workspace.is_cuda or workspace.numel() < _SYNC_WORDS + tokens * experts:
        raise ValueError(f"workspace must be cuda_moe.new_workspace({tokens}, {experts}, device): int32, at least "
                         f"{_SYNC_WORDS + tokens * experts} elements")
    out = torch.empty_like(x)
    acc = torch.empty(tokens, hidden, dtype=torch.float32, device=device)
    fp8 = w13.dtype == FP8_DTYPE
    xq = x_scale = None
    if fp8:  # the kernel's per-token e4m3 copy of x (rows padded to 16 bytes) and its scales
        xq = torch.empty(tokens, -(-hidden // 16) * 16, dtype=torch.uint8, device=device)
        x_scale = torch.empty(tokens, dtype=torch.float32, device=device)
    ids = weights = None
    if with_routing:
        ids = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
        weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)

    def ptr(t: Optional[Tensor]) -> Optional[int]:
        return None if t is None else t.data_ptr()

    grouped = n_group > 1 and topk_group < n_group
    a = MoeArgs(
        x=ptr(x), router_w=ptr(router_weight), router_b=ptr(router_bias), corr=ptr(correction_bias), w13=ptr(w13),
        w2=ptr(w2), b13=ptr(b13), b2=ptr(b2), out=ptr(out), acc=ptr(acc), logits=workspace.data_ptr() + 4 * _SYNC_WORDS,
        sync=ptr(workspace),
        route_ids=ptr(ids), route_weights=ptr(weights), timing=ptr(timing), w13_scale=ptr(w13_scale),
        w2_scale=ptr(w2_scale), xq=ptr(xq), x_scale=ptr(x_scale), fp8=int(fp8),
        T=tokens, E=experts, K=top_k, H=hidden, I=inter, gated=int(w13.shape[1] == 2 * inter),
        x_dtype=_DTYPE_CODES[x.dtype], router_dtype=_DTYPE_CODES[router_weight.dtype],
        corr_dtype=_DTYPE_CODES[correction_bias.dtype] if correction_bias is not None else 2,
        scoring=0 if scoring == "softmax" else 1, renormalize=int(renormalize),
        n_group=n_group if grouped else 1, topk_group=topk_group if grouped else 1,
        weight_on_input=int(weight_on_input), activation=_ACTIVATIONS[activation],
        routed_scaling=float(routed_scaling), alpha=float(alpha), limit=float(limit),
    )
    multiple = 16 if fp8 else 8  # elements of one 16-byte load
    vec = int(hidden % multiple == 0 and inter % multiple == 0 and _aligned(x, router_weight, w13, w2))
    with torch.cuda.device(device):
        error = (lib or _LIB).moe_decode_launch(ctypes.byref(a), ctypes.c_void_p(stream), vec)
    if error is not None:
        raise RuntimeError(f"cuda fused_moe: {error.decode()}")
    return out, ids, weights


def barrier_timed_out(workspace: Tensor) -> bool:
    """Whether the launch that used `workspace` waited past the grid barrier's timeout (a bug: the kernel then
    finishes instead of hanging, and writes NaN to its output). Synchronises; for tests."""
    return bool(workspace[3].item())


def packed_unsupported_reason(x: Tensor, router_weight: Tensor, router_bias: Optional[Tensor],
                              correction_bias: Optional[Tensor], w13: Tensor, w2: Tensor, b13: Optional[Tensor],
                              b2: Optional[Tensor], w13_scale: Optional[Tensor], w2_scale: Optional[Tensor],
                              w13_meta: Optional[Tensor], w2_meta: Optional[Tensor], top_k: int, n_group: int,
                              topk_group: int, weight_on_input: bool, activation: str, act_quant: str) -> str:
    """Why the kernel cannot run this `fused_moe_packed` case ('' when it can): it runs FP8 W8A8 only."""
    problems = []
    if w13_meta is not None or w2_meta is not None:
        problems.append("2:4 compressed weights (cuda kernel: FP8 only)")
    if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE:
        problems.append(f"weights in {w13.dtype} (cuda kernel: {FP8_DTYPE})")
    if act_quant != "fp8_per_token":
        problems.append(f"act_quant {act_quant!r} (cuda kernel: 'fp8_per_token', W8A8)")
    if weight_on_input:
        problems.append("the routing weight on FP8 activations")
    experts, hidden, _ = w2.shape
    scales = ((w13_scale, (experts, w13.shape[1])), (w2_scale, (experts, hidden)))
    if any(s is None or s.dtype != torch.float32 or tuple(s.shape) != shape or not s.is_contiguous()
           for s, shape in scales):
        problems.append("weight scales must be contiguous fp32 [E, 2I or I] and [E, H]")
    if problems:
        return "; ".join(problems)
    return unsupported_reason(x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, top_k, n_group,
                              topk_group, activation, fp8=True)


def cuda_fused_moe_packed(
    x: Tensor,
    router_weight: Tensor,
    router_bias: Optional[Tensor],
    correction_bias: Optional[Tensor],
    w13: Tensor,
    w2: Tensor,
    b13: Optional[Tensor],
    b2: Optional[Tensor],
    w13_scale: Optional[Tensor],
    w2_scale: Optional[Tensor],
    w13_meta: Optional[Tensor],
    w2_meta: Optional[Tensor],
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    routed_scaling: float,
    weight_on_input: bool,
    activation: str,
    alpha: float,
    limit: float,
    act_quant: str,
) -> Tensor:
    """Same contract as `reference.torch_fused_moe_packed`; FP8 W8A8 in the decode kernel, the rest on triton."""
    reason = packed_unsupported_reason(x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, w13_scale,
                                       w2_scale, w13_meta, w2_meta, top_k, n_group, topk_group, weight_on_input,
                                       activation, act_quant)
    args = (x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, w13_scale, w2_scale, w13_meta, w2_meta,
            top_k, scoring, renormalize, n_group, topk_group, routed_scaling, weight_on_input, activation, alpha,
            limit, act_quant)
    if reason:
        return _delegate(reason, args, packed=True)
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    return launch(x, router_weight, router_bias, correction_bias, w13, w2, b13, b2, top_k, scoring, renormalize,
                  n_group, topk_group, routed_scaling, weight_on_input, activation, alpha, limit,
                  w13_scale=w13_scale, w2_scale=w2_scale)[0]


register_backend("cuda", cuda_fused_moe)
register_packed_backend("cuda", cuda_fused_moe_packed)
