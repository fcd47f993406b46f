"""`ExpertParallelMoEBlock`: a fused MoE block whose experts are sharded over an expert-parallel group.

Every rank keeps the router (and the shared expert) and routes its own tokens; each routed (token, k) row goes to
the rank that hosts its expert (to one replica, chosen by token index, when the placement replicates it) through
`all_to_all_single`, runs there through the reference expert math, and comes back through a second all-to-all to
be weighted and summed on the rank that owns the token (fp32 accumulation, as `reference.torch_experts` does).

Host synchronisation: one per block call. The split sizes of an all-to-all must be known on the host, so the
per-(rank, slot) row counts are exchanged with one small all-to-all and copied to the host once (`_exchange_counts`);
everything else (routing, replica choice, sorting, gathering, the combine) stays on the device. For the same reason
these blocks are not CUDA-graph capturable, and `optimize` turns cuda_graphs and compile off when it applies them.

Dual-batch overlap: the tokens split in two micro-batches; the dispatch of the second is in flight while the
experts run on the first, and the first's combine is in flight while the experts run on the second. It is decided
after the counts exchange from the group's total token count, so every rank makes the same choice.

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
from moe_compile.parallel.distributed import EPGroup
from moe_compile.parallel.placement import Placement

log = logging.getLogger("moe_compile")

# Global tokens per rank from which `overlap="auto"` splits into two micro-batches. Measured on 2 and 4 H100s
# (benchmarks/results/ep_*ranks*.csv, 2026-11-26): with the local experts on the reference loop, overlap was slower
# than no overlap at every size tried (1, 64 and 2048 tokens per rank; e.g. DeepSeek-V3 layer, 4 ranks, 2048 tokens:
# 8.9 ms off vs 13.2 ms on), so `auto` stays off through that range. Revisit once the local experts run the triton
# grouped GEMM, where the expert time per micro-batch is what hides the dispatch.
OVERLAP_MIN_TOKENS = 1 << 16


@dataclass
class _MicroBatch:
    """One micro-batch's routed rows, split sizes and in-flight buffers."""

    rows: Tensor  # [n] flat (token * K + k) indices, sorted by destination (rank, slot)
    send_splits: list[int]  # [N] rows to each rank
    recv_splits: list[int]  # [N] rows from each rank
    recv_counts: Tensor  # [N, L] rows from each rank for each local slot (device)
    slot_totals: list[int]  # [L] rows received per local slot (host)
    received: Optional[Tensor] = None  # [sum(recv_splits), H]
    returned: Optional[Tensor] = None  # [n, H] expert outputs back from their ranks
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
        batches = self._plan(ids.reshape(-1))
        flat_weights = weights.reshape(-1)  # [T*K]
        for mb in batches:  # both dispatches in flight before any expert runs
            self._dispatch(x, flat_weights, mb)
        for mb in batches:
            mb.work.wait()
            self._send_back(self._local_experts(mb), mb)  # overlaps the other micro-batch's transfer
        out = torch.zeros(x.shape, dtype=reference.acc_dtype(x.dtype), device=x.device)  # [T, H]
        for mb in batches:
            mb.work.wait()
            y = mb.returned.to(out.dtype)  # [n, H]
            if not s.weight_on_input:
                y = y * flat_weights[mb.rows].unsqueeze(1)
            out.index_add_(0, mb.rows // s.top_k, y)
        return out.to(x.dtype)

    # -- routing plan -------------------------------------------------------------------------------------------
    def _plan(self, flat_ids: Tensor) -> list[_MicroBatch]:
        """Destination (rank, slot) of every routed row, the counts exchange, and the micro-batch split."""
        n_ranks, slots, k = self.ep.size, self.placement.slots_per_rank, self.spec.top_k
        rows = torch.arange(flat_ids.numel(), device=flat_ids.device)  # [T*K]
        replica = (rows // k) % self.copies[flat_ids]  # replicas share an expert's tokens by token index
        key = self.replica_rank[flat_ids, replica] * slots + self.replica_slot[flat_ids, replica]  # [T*K]
        half = (flat_ids.numel() // k // 2) * k  # micro-batch boundary on a token boundary
        half_of_row = (rows >= half).long()  # [T*K] micro-batch 0 or 1
        counts = torch.zeros(2 * n_ranks * slots, dtype=torch.int64, device=key.device)  # scatter, not bincount:
        counts.scatter_add_(0, half_of_row * n_ranks * slots + key, torch.ones_like(key))  # CUDA bincount syncs
        counts = counts.view(2, n_ranks * slots)  # [2, N*L]
        sent, received, received_dev, total_tokens = self._exchange_counts(counts, flat_ids.numel() // k)
        self.last_overlap = self._use_overlap(total_tokens)
        bounds = [(0, half), (half, key.numel())]
        if not self.last_overlap:  # one batch: the two halves' counts add up
            bounds = [(0, key.numel())]
            sent, received, received_dev = (t.sum(0, keepdim=True) for t in (sent, received, received_dev))
        batches = []
        for m, (start, stop) in enumerate(bounds):
            batches.append(_MicroBatch(
                rows=key[start:stop].argsort(stable=True) + start,  # [n] by destination (rank, slot)
                send_splits=sent[m].sum(1).tolist(), recv_splits=received[m].sum(1).tolist(),
                recv_counts=received_dev[m], slot_totals=received[m].sum(0).tolist()))
        return batches

    def _exchange_counts(self, counts: Tensor, tokens: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """All-to-all of the row counts per (micro-batch, destination slot) plus this rank's token count.

        Returns sent [2, N, L] and received [2, N, L] on the host, received [2, N, L] on the device, and the group's
        total token count. The one host sync of the block: the data all-to-alls need their split sizes as host
        integers."""
        n_ranks, slots = self.ep.size, self.placement.slots_per_rank
        per_rank = counts.view(2, n_ranks, slots).permute(1, 0, 2).reshape(n_ranks, 2 * slots)  # [N, 2L]
        size = torch.full((n_ranks, 1), tokens, dtype=per_rank.dtype, device=per_rank.device)  # [N, 1]
        send = torch.cat([per_rank, size], dim=1)  # [N, 2L+1]: row d goes to rank d
        recv = torch.empty_like(send)  # row s came from rank s
        dist.all_to_all_single(recv, send, group=self.ep.group)
        received_dev = recv[:, :-1].reshape(n_ranks, 2, slots).permute(1, 0, 2)  # [2, N, L]
        host = torch.stack([send, recv]).cpu()  # the host sync
        sent = host[0, :, :-1].reshape(n_ranks, 2, slots).permute(1, 0, 2)  # [2, N, L]
        received = host[1, :, :-1].reshape(n_ranks, 2, slots).permute(1, 0, 2)  # [2, N, L]
        return sent, received, received_dev, int(host[1, :, -1].sum())

    def _use_overlap(self, total_tokens: int) -> bool:
        if self.overlap == "auto":
            return total_tokens >= self.overlap_min_tokens * self.ep.size
        return bool(self.overlap)

    # -- data movement and compute ----------------------------------------------------------------------------
    def _dispatch(self, x: Tensor, flat_weights: Tensor, mb: _MicroBatch) -> None:
        send = x[mb.rows // self.spec.top_k]  # [n, H]
        if self.spec.weight_on_input:  # as reference.torch_experts: scale in fp32, back to the activation dtype
            send = (send * flat_weights[mb.rows].unsqueeze(1)).to(x.dtype)
        mb.received = x.new_empty((sum(mb.recv_splits), x.shape[1]))  # [sum(recv), H]
        mb.work = dist.all_to_all_single(mb.received, send, mb.recv_splits, mb.send_splits, group=self.ep.group,
                                         async_op=True)

    def _local_experts(self, mb: _MicroBatch) -> Tensor:
        """[m, H] received rows, grouped by source rank then slot -> unweighted expert outputs [m, H], same order."""
        received, slots = mb.received, self.placement.slots_per_rank
        pattern = torch.arange(slots, device=received.device).repeat(self.ep.size)  # [N*L]
        slot_of_row = pattern.repeat_interleave(mb.recv_counts.reshape(-1), output_size=received.shape[0])  # [m]
        order = slot_of_row.argsort(stable=True)  # rows grouped by local slot
        xs = received[order]  # [m, H]
        outputs, start = [], 0
        for slot, count in enumerate(mb.slot_totals):
            if count == 0:
                continue
            b13 = None if self.b13 is None else self.b13[slot]
            b2 = None if self.b2 is None else self.b2[slot]
            outputs.append(reference.expert_forward(xs[start:start + count], self.w13[slot], self.w2[slot], b13, b2,
                                                    self.spec.activation, self.spec.alpha, self.spec.limit))
            start += count
        y = torch.empty_like(received)  # [m, H]
        if outputs:
            y[order] = torch.cat(outputs)
        return y

    def _send_back(self, y: Tensor, mb: _MicroBatch) -> None:
        mb.returned = y.new_empty((mb.rows.numel(), y.shape[1]))  # [n, H]
        mb.work = dist.all_to_all_single(mb.returned, y, mb.send_splits, mb.recv_splits, group=self.ep.group,
                                         async_op=True)


def _local(weight: Optional[Tensor], local: Tensor) -> Optional[nn.Parameter]:
    """This rank's slots of an expert-stacked weight, as a new parameter (the full tensor can then be freed)."""
    if weight is None:
        return None
    return nn.Parameter(weight.detach().index_select(0, local).clone(), requires_grad=False)
