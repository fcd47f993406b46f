"""2:4 pruning of expert weights that uses calibration activations: the SparseGPT algorithm (Frantar & Alistarh,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", 2023), applied per expert.

Magnitude pruning keeps the 2 largest |w| of each group of 4 and leaves the rest of the row as it was. SparseGPT
instead picks, per group, the 2 weights whose removal costs least on the layer's actual inputs X (saliency
w^2 / [H^-1]_jj^2 with H = X^T X), and after pruning each column it updates the not-yet-pruned columns of the row
to compensate (optimal brain surgeon: the error times the row of the inverse Hessian's Cholesky factor), column by
column, in blocks. The result is a 2:4 pattern with adjusted kept values, so it compresses with
`sparse24.compress_24` exactly like a magnitude-pruned weight.

Per fused block: the calibration hidden states routed to expert e (`modelopt_calib.route_for_calibration`, which
also feeds experts the router rarely picks) are the inputs of its gate/up rows; the activations computed from the
*pruned* gate/up rows are the inputs of its down projection (pruning in order, as SparseGPT does layer by layer).
An expert with no calibration rows at all is magnitude-pruned.

Dimension legend: N = output channels, K = input channels (the pruned dim), n = calibration rows, E = experts,
H = hidden, I = expert intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_compile.kernels import reference
from moe_compile.quant.sparse24 import GROUP, KEEP, _check_k, prune_24

BLOCK_COLUMNS = 128  # columns updated together (a multiple of the group of 4)
DAMPING = 0.01  # fraction of the mean Hessian diagonal added to it (numerical stability)


@torch.no_grad()
def prune_24_sparsegpt(w: Tensor, x: Tensor, block_columns: int = BLOCK_COLUMNS, damping: float = DAMPING) -> Tensor:
    """w [N, K], calibration inputs x [n, K] -> a 2:4-sparse (along K) version of w in w's dtype, chosen and
    compensated to keep x @ w.T close to the original."""
    _check_k(w.shape[1])
    if x.shape[0] == 0:
        return prune_24(w)
    weight = w.detach().double().clone()  # [N, K]
    xs = x.detach().double()
    hessian = xs.T @ xs  # [K, K]
    dead = torch.diagonal(hessian) == 0  # inputs that are always zero: their weights never matter
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    hessian += damping * torch.diagonal(hessian).mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype,
                                                                      device=hessian.device)
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)  # [K, K]
    k = weight.shape[1]
    for start in range(0, k, block_columns):
        stop = min(start + block_columns, k)
        _prune_columns(weight, inverse, start, stop)
    return weight.to(w.dtype)


def _prune_columns(weight: Tensor, inverse: Tensor, start: int, stop: int) -> None:
    """Prune columns [start, stop) of weight in place (2 of every 4), spreading each column's error over the
    remaining columns of the block, then the block's error over every later column."""
    block = weight[:, start:stop].clone()  # [N, B]
    errors = torch.zeros_like(block)  # [N, B]
    inv = inverse[start:stop, start:stop]  # [B, B]
    diag = torch.diagonal(inv)  # [B]
    pruned = torch.zeros_like(block, dtype=torch.bool)  # [N, B]
    for i in range(stop - start):
        if i % GROUP == 0:  # choose this group's pruned pair from the current (compensated) weights
            saliency = block[:, i:i + GROUP] ** 2 / diag[i:i + GROUP].unsqueeze(0) ** 2  # [N, 4]
            drop = saliency.topk(GROUP - KEEP, dim=1, largest=False).indices  # [N, 2]
            pruned[:, i:i + GROUP].scatter_(1, drop, True)
        column = block[:, i]
        kept = torch.where(pruned[:, i], torch.zeros_like(column), column)
        error = (column - kept) / diag[i]  # [N]
        block[:, i:] -= error.unsqueeze(1) * inv[i, i:].unsqueeze(0)
        block[:, i] = kept
        errors[:, i] = error
    weight[:, start:stop] = block
    weight[:, stop:] -= errors @ inverse[start:stop, stop:]


@torch.no_grad()
def sparsegpt_expert_weights(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """A fused block's (w13 [E, 2I, H], w2 [E, H, I]) pruned to 2:4 by SparseGPT on its calibration inputs
    x [n, H] (routed by the block's own router)."""
    from moe_compile.quant.calibration_data import route_for_calibration

    spec = block.spec
    w13, w2 = block.w13.detach(), block.w2.detach()
    out13, out2 = w13.clone(), w2.clone()
    groups = {e: rows for e, rows, _ in route_for_calibration(block, x)[0]}
    for e in range(spec.num_experts):
        rows = groups.get(e)
        if rows is None:
            out13[e], out2[e] = prune_24(w13[e]), prune_24(w2[e])
            continue
        xe = x[rows].to(torch.float32)  # [n, H]
        out13[e] = prune_24_sparsegpt(w13[e], xe)
        b13 = None if block.b13 is None else block.b13[e].float()
        h = F.linear(xe, out13[e].float(), b13)  # [n, 2I or I] from the pruned rows
        a = reference.apply_activation(h, spec.intermediate_size, spec.gated, spec.activation, spec.alpha,
                                       spec.limit)  # [n, I]
        out2[e] = prune_24_sparsegpt(w2[e], a)
    return out13, out2
