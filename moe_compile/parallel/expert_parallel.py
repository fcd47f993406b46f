"""`ExpertParallelMoEBlock`: a fused MoE block whose experts are sharded over an expert-parallel group.

Every rank keeps the router (and the shared expert) and routes its own tokens; each routed (token, k) row goes to
the rank that hosts its expert (to one replica, chosen by token index, when the placement replicates it) through
`all_to_all_single`, runs there through one grouped GEMM over the rank's local experts (`experts_for_rows`: the
Triton kernels on CUDA, the reference loop on CPU), and comes back through a second all-to-all to be weighted and
summed on the rank that owns the token (fp32 accumulation, as `reference.torch_experts` does).

Host synchronisation: one per block call. The split sizes of an all-to-all must be known on the host, so the
per-rank row counts are exchanged with one small all-to-all and copied to the host once (`_exchange_counts`);
everything else (routing, replica choice, sorting, packing, the combine) stays on the device. Each payload row
carries its slot on the receiving rank and its routing weight (`payload.py`), so the receiving rank runs one
grouped GEMM over its local experts with the weight applied in fp32, and the owner only sums over K. Because of
the host sync these blocks are not CUDA-graph capturable, and `optimize` turns cuda_graphs and compile off when it
applies them. (A sync-free decode exchange needs fixed-capacity buffers whose size every rank agrees on without
talking, i.e. a decode-phase contract across ranks; not in this version.)

Dual-batch overlap: the tokens split in two micro-batches; the dispatch of the second is in flight
while the experts run on the first, and the first's combine is in flight while the experts run on the second. It
is decided after the counts exchange from the group's total token count, so every rank makes the same choice.

All ranks of the group must call each block the same number of times (lockstep forwards, as in any EP system).
Inference only: no gradient flows back through the all-to-all.

Dimension legend: T = tokens on this rank, K = top_k, H = hidden, I = expert intermediate, E = experts,
N = expert-parallel ranks, L = expert slots per rank (the largest shard), n = routed rows sent or received.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_compile.fused_block import FusedMoEBlock, finish_output
from moe_compile.kernels import reference
from moe_compile.kernels.given_routing import experts_for_rows
from moe_compile.parallel import payload
from moe_compile.parallel.distributed import EPGroup
from moe_compile.parallel.placement import Placement

log = logging.getLogger("moe_compile")

# Tokens per rank from which `overlap="auto"` splits into two micro-batches. Measured on H100s with the local
# experts on the Triton grouped GEMM (benchmarks/results/ep_*ranks*_v2/_v4.csv, 2026-11-26): on 2 GPUs (final
# code) overlap won 2 of 36 layer cases (at most 9%) and lost up to 61% (median +15%); on 4 GPUs (before the
# payload change) it won 7 of 9 cases at 8192 tokens per rank (1.4-13%) and lost below that. The block is
# host- and wait-bound (one host sync, three collectives), so splitting it adds more than it hides: `auto` stays
# off through every size measured. A 4-GPU rerun of the final code would say whether 8192+ should turn it on.
OVERLAP_MIN_TOKENS = 1 << 16


@dataclass
class _MicroBatch:
    """One micro-batch's routed rows, split sizes and in-flight buffers (the counts-sized exchange)."""

    rows: Tensor  # [n] flat (token * K + k) indices, sorted by destination rank
    send_splits: list[int]  # [N] rows to each rank
    recv_splits: list[int]  # [N] rows from each rank
    received: Optional[Tensor] = None  # [sum(recv_splits), W] payload rows
    returned: Optional[Tensor] = None  # [n, H] weighted expert outputs back from their ranks
    work: object = None  # the in-flight collective


class ExpertParallelMoEBlock(nn.Module):
    """Replaces a `FusedMoEBlock` on one rank; same inputs and return contract.

    State: the replicated router, correction bias and shared expert (the fused block's own objects), this rank's
    expert slots `w13 [L_r, 2I, H]`, `w2 [L_r, H, I]` (+ biases), and the placement as buffers: `placement_table
    [N, L]` (global expert per slot, -1 padded; `Placement.from_tensor` rebuilds it) and the routing lookups
    `copies [E]`, `replica_rank [E, R]`, `replica_slot [E, R]`.
    """

    def __init__(self, fused: FusedMoEBlock, placement: Placement, ep: EPGroup,
                 overlap: Union[bool, str] = "auto", overlap_min_tokens: int = OVERLAP_MIN_TOKENS):
        super().__init__()
        if placement.num_experts != fused.spec.num_experts or placement.world_size != ep.size:
            raise ValueError(f"placement for E={placement.num_experts} on {placement.world_size} ranks does not fit a "
                             f"block with E={fused.spec.num_experts} on an expert-parallel group of {ep.size}")
        self.spec, self.source_class, self.ep = fused.spec, fused.source_class, ep
        self.overlap, self.overlap_min_tokens = overlap, overlap_min_tokens
        self.placement = placement
        self.router_weight, self.router_bias = fused.router_weight, fused.router_bias  # [E, H], [E]: replicated
        self.register_buffer("correction_bias", fused.correction_bias)  # [E]
        local = torch.tensor(placement.rank_experts[ep.rank], dtype=torch.int64, device=fused.w13.device)  # [L_r]
        self.w13 = _local(fused.w13, local)  # [L_r, 2I, H]
        self.w2 = _local(fused.w2, local)  # [L_r, H, I]
        self.b13 = _local(fused.b13, local)  # [L_r, 2I]
        self.b2 = _local(fused.b2, local)  # [L_r, H]
        self.shared_expert, self.shared_expert_gate = fused.shared_expert, fused.shared_expert_gate
        device = fused.w13.device
        self.register_buffer("placement_table", placement.to_tensor().to(device))  # [N, L]
        copies, ranks, slots = (t.to(device) for t in placement.lookup_tables())
        self.register_buffer("copies", copies)  # [E]
        self.register_buffer("replica_rank", ranks)  # [E, R]
        self.register_buffer("replica_slot", slots)  # [E, R]
        self.expert_load: Optional[list[float]] = None  # tokens per expert the placement was made from, if any
        self.last_overlap = False  # whether the last call split into micro-batches (for tests and benchmarks)
        self.experts_backend = "auto"  # local experts: Triton grouped GEMM on CUDA, reference loop elsewhere

    def extra_repr(self) -> str:
        s = self.spec
        return (f"E={s.num_experts} (local {list(self.placement.rank_experts[self.ep.rank])}), top_k={s.top_k}, "
                f"H={s.hidden_size}, I={s.intermediate_size}, ranks={self.ep.size}, rank={self.ep.rank}, "
                f"overlap={self.overlap}")

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        x = hidden_states.reshape(-1, self.spec.hidden_size)  # [T, H]
        return finish_output(self, hidden_states, x, self.routed_experts(x))

    def routed_experts(self, x: Tensor) -> Tensor:
        """[T, H] -> [T, H]: route, dispatch, run the local experts, combine. A collective over the EP group."""
        s = self.spec
        logits = reference.router_logits(x, self.router_weight, self.router_bias)  # [T, E]
        weights, ids = reference.route(logits, self.correction_bias, s.top_k, s.scoring, s.renormalize, s.n_group,
                                       s.topk_group, s.routed_scaling)  # [T, K] fp32, [T, K]
        rank, slot = self._destinations(ids.reshape(-1))  # [T*K] each
        returned = self._exchange_by_counts(x, rank, slot, weights.reshape(-1))  # [T*K, H] weighted outputs
        tokens, hidden = x.shape
        return returned.view(tokens, s.top_k, hidden).sum(dim=1, dtype=reference.acc_dtype(x.dtype)).to(x.dtype)

    # -- routing ------------------------------------------------------------------------------------------------
    def _destinations(self, flat_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Rank and local slot of every routed row [T*K]; replicas of an expert share its tokens by token index."""
        rows = torch.arange(flat_ids.numel(), device=flat_ids.device)  # [T*K]
        replica = (rows // self.spec.top_k) % self.copies[flat_ids]
        return self.replica_rank[flat_ids, replica], self.replica_slot[flat_ids, replica]

    # -- exchange sized by counts, optional dual-batch overlap ---------------------------------------------------
    def _exchange_by_counts(self, x: Tensor, rank: Tensor, slot: Tensor, flat_weights: Tensor) -> Tensor:
        """x [T, H], each routed row's rank, slot and weight [T*K] -> its weighted expert output [T*K, H]."""
        tokens, hidden = x.shape
        batches = self._plan(rank, tokens)
        for mb in batches:  # both dispatches in flight before any expert runs
            self._dispatch(x, slot, flat_weights, mb)
        for mb in batches:
            mb.work.wait()
            self._send_back(self._local_experts(mb.received, hidden), mb)  # overlaps the other's transfer
        returned = x.new_empty(rank.numel(), hidden)  # [T*K, H]
        for mb in batches:
            mb.work.wait()
            returned[mb.rows] = mb.returned
        return returned

    def _plan(self, rank: Tensor, tokens: int) -> list[_MicroBatch]:
        """Rows sorted by destination rank, the counts exchange, and the micro-batch split."""
        n_ranks, k = self.ep.size, self.spec.top_k
        rows = torch.arange(rank.numel(), device=rank.device)  # [T*K]
        half = (tokens // 2) * k  # micro-batch boundary on a token boundary
        half_of_row = (rows >= half).long()  # [T*K] micro-batch 0 or 1
        counts = torch.zeros(2 * n_ranks, dtype=torch.int64, device=rank.device)  # scatter, not bincount:
        counts.scatter_add_(0, half_of_row * n_ranks + rank, torch.ones_like(rank))  # CUDA bincount syncs
        sent, received, total_tokens = self._exchange_counts(counts.view(2, n_ranks), tokens)
        self.last_overlap = self._use_overlap(total_tokens)
        bounds = [(0, half), (half, rank.numel())]
        if not self.last_overlap:  # one batch: the two halves' counts add up
            bounds = [(0, rank.numel())]
            sent, received = sent.sum(0, keepdim=True), received.sum(0, keepdim=True)
        return [_MicroBatch(rows=rank[start:stop].argsort(stable=True) + start,  # [n] by destination rank
                            send_splits=sent[m].tolist(), recv_splits=received[m].tolist())
                for m, (start, stop) in enumerate(bounds)]

    def _exchange_counts(self, counts: Tensor, tokens: int) -> tuple[Tensor, Tensor, int]:
        """All-to-all of the row counts per (micro-batch, destination rank) plus this rank's token count.

        Returns sent [2, N] and received [2, N] on the host and the group's total token count. The one host sync
        of the prefill path: the data all-to-alls need their split sizes as host integers."""
        n_ranks = self.ep.size
        size = torch.full((n_ranks, 1), tokens, dtype=counts.dtype, device=counts.device)  # [N, 1]
        send = torch.cat([counts.t(), size], dim=1)  # [N, 3]: row d goes to rank d
        recv = torch.empty_like(send)  # row s came from rank s
        dist.all_to_all_single(recv, send, group=self.ep.group)
        host = torch.stack([send, recv]).cpu()  # the host sync
        return host[0, :, :2].t(), host[1, :, :2].t(), int(host[1, :, 2].sum())

    def _use_overlap(self, total_tokens: int) -> bool:
        if self.overlap == "auto":
            return total_tokens >= self.overlap_min_tokens * self.ep.size
        return bool(self.overlap)

    # -- data movement and compute ----------------------------------------------------------------------------
    def _dispatch(self, x: Tensor, slot: Tensor, flat_weights: Tensor, mb: _MicroBatch) -> None:
        x_rows, weights = x[mb.rows // self.spec.top_k], flat_weights[mb.rows]  # [n, H], [n]
        if self.spec.weight_on_input:  # as reference.torch_experts: scale in fp32, back to the activation dtype
            x_rows, weights = (x_rows * weights.unsqueeze(1)).to(x.dtype), torch.ones_like(weights)
        send = payload.pack(x_rows, slot[mb.rows], weights)  # [n, W]
        mb.received = send.new_empty((sum(mb.recv_splits), send.shape[1]))  # [sum(recv), W]
        mb.work = dist.all_to_all_single(mb.received, send, mb.recv_splits, mb.send_splits, group=self.ep.group,
                                         async_op=True)

    def _local_experts(self, received: Tensor, hidden: int) -> Tensor:
        """Received payload rows [m, W] -> weighted expert outputs [m, H], same order.

        One grouped-GEMM call over all local slots (`experts_for_rows`: Triton on CUDA), the routing weight
        applied in fp32 in its epilogue."""
        x, slots, weights = payload.read(received, hidden)
        return experts_for_rows(x, weights.unsqueeze(1), slots.unsqueeze(1), self.w13, self.w2, self.b13, self.b2,
                                False, self.spec.activation, self.spec.alpha, self.spec.limit, self.experts_backend)

    def _send_back(self, y: Tensor, mb: _MicroBatch) -> None:
        mb.returned = y.new_empty((mb.rows.numel(), y.shape[1]))  # [n, H]
        mb.work = dist.all_to_all_single(mb.returned, y, mb.send_splits, mb.recv_splits, group=self.ep.group,
                                         async_op=True)


def _local(weight: Optional[Tensor], local: Tensor) -> Optional[nn.Parameter]:
    """This rank's slots of an expert-stacked weight, as a new parameter (the full tensor can then be freed)."""
    if weight is None:
        return None
    return nn.Parameter(weight.detach().index_select(0, local).clone(), requires_grad=False)
