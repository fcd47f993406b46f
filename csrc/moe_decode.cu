// moe_compile `cuda` backend: one persistent launch per MoE layer at decode sizes (T <= 16 tokens), in the manner
// of FlashDMoE: routing in the kernel, then "split-I" expert work units that stream each needed weight byte once.
//
// Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate, G = CTAs in the grid
// (all resident: #SMs x occupancy, cooperative launch), S = kSlice = 32 I-columns per work unit, R = routed rows of
// a unit (tokens sent to its expert, <= T), A = active experts (ascending ids).
//
// Phase 1 (all CTAs): zero the fp32 accumulator acc [T, H]; router logits [T, E] as (expert, piece of H) work items
//   over every warp of the grid, fp32 sums added atomically into the caller's zeroed workspace (cuda_moe.py allocates
//   one per call, so CUDA-graph capture owns no state that outlives the call).
// Grid barrier (atomic count + generation in the same workspace; all CTAs co-resident: the grid is the occupancy of
//   this instantiation x #SMs, launched cooperatively, which fails rather than run a grid that cannot be resident).
// Phase 2 (every CTA, redundantly: T is small, and it saves a second barrier): route each token (one warp per token,
//   moe_decode_routing.cuh), then number the active experts and list each one's routed rows.
// Phase 3: work unit u = (active expert a, I-slice s) for u = blockIdx.x, + G, ... over A * ceil(I / S):
//   gate_up  h [R, 2S] = x_rows [R, H] . w13[e, slice rows]^T    (w13 rows: S gate + S up, each [H]; K-dim H split
//            over the 8 warps, reduced in shared memory), a [R, S] = act(h (+ b13)) rounded to x's dtype;
//   down     acc[token, :] += weight * (a [R, S] . w2[e, :, slice]^T (+ b2 once, in slice 0))   [R, H], fp32 atomics.
//   No barrier between the two GEMMs: a unit needs only its own slice of the activation. Each weight byte is read
//   once, by one unit, with 16-byte non-allocating loads, and every SM has units even when few experts are active.
//   MMAs are mma.sync m16n8k16 with the weights as the 16-row A operand and the routed rows as the 8 columns of B
//   (swap-AB: decode has few rows). Both operands come straight from 16-byte loads: the K order inside each 32-wide
//   chunk is permuted identically for A and B (thread c holds K c*8 .. c*8+7: the first four feed k-step 0 as the
//   fragment's k pairs {2c, 2c+1} and {2c+8, 2c+9}, the last four k-step 1), which a dot product does not see.
// Phase 4: the last CTA to finish (atomic count) casts acc to the output dtype (NaN if a barrier timed out), re-zeroes
//   the logits and the count, so a workspace can be reused on one stream. One launch, no host synchronisation.
//
// Why mma.sync and plain 16-byte loads rather than wgmma and TMA: at decode a unit multiplies its weights by at
// most 16 routed rows, so the tensor cores are nearly idle either way (the MMA is there to keep the FMA count off
// the critical path, not for rate); what matters is bytes in flight. TMA needs 2-D tensor maps per weight tensor
// for the strided w2 slabs; the cp.async ring variant (MOE_CP_ASYNC, moe_decode_common.cuh) is the step between.
// Status, measurements and the tuning knobs' results: csrc/NOTES.md.
//
// Built by moe_compile/kernels/cuda_moe.py with nvcc for sm_90a and called through a C ABI (moe_decode_launch).
#include <algorithm>
#include <cstdio>
#include <cstring>

#include "moe_decode_fp8.cuh"

namespace moe {

constexpr int kTimePoints = 6;  // start, router done, barrier passed, units listed, units done, (last CTA) end

// 8 consecutive 16-bit elements row[off + k .. + 8) as a 16-byte vector, zero past kmax or for an absent row
// (off < 0). VEC: kmax % 8 == 0 and 16-byte aligned rows, so a chunk is wholly inside or outside.
template <bool VEC, bool STREAM>
__device__ __forceinline__ uint4 load8(const uint16_t* base, int off, int k, int kmax) {
  if (off < 0) return make_uint4(0, 0, 0, 0);
  if constexpr (VEC) {
    if (k >= kmax) return make_uint4(0, 0, 0, 0);
    if constexpr (STREAM) return ld_stream(base + off + k);
    else return __ldg(reinterpret_cast<const uint4*>(base + off + k));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lo = (k + 2 * j < kmax) ? base[off + k + 2 * j] : 0u;
      const uint32_t hi = (k + 2 * j + 1 < kmax) ? base[off + k + 2 * j + 1] : 0u;
      w[j] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// (x * weight) rounded to x's dtype, as reference.torch_experts scales the input when weight_on_input.
template <typename XT>
__device__ __forceinline__ uint32_t scale_pair(uint32_t u, float w) {
  const float2 f = Dt<XT>::unpack(u);
  return Dt<XT>::pack(f.x * w, f.y * w);
}

// One work unit (active expert ai, I-slice) with NT n-tiles of 8 routed rows.
template <typename XT, bool VEC, int NT>
__device__ void run_unit(const MoeArgs& a, Smem& s, int ai, int slice, int warp, int lane) {
  const int H = a.H, I = a.I, K = a.K;
  const int e = s.unit_expert[ai], R = s.unit_rows[ai];
  const int i0 = slice * kSlice;
  const bool gated = a.gated != 0;
  const int rows13 = gated ? 2 * I : I;
  const int mt_count = gated ? 4 : 2;  // m16 tiles of the unit's w13 rows (2S gated, S not)
  const int g = lane >> 2, c = lane & 3;
  const uint16_t* w13 = static_cast<const uint16_t*>(a.w13) + (int64_t)e * rows13 * H;
  const uint16_t* x = static_cast<const uint16_t*>(a.x);

  // A rows of this lane: unit row q (< S: gate row i0 + q; >= S: up row I + i0 + q - S), rows g and g + 8 per tile
  int offA[4], offB[4];
  unit_row_offsets(i0, I, H, mt_count, g, offA, offB);
  // B columns of this lane: routed row n = nt * 8 + g (clamped to a real row; extra columns are discarded)
  int offX[NT];
  float wX[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int entry = s.unit_entry[ai][min(nt * 8 + g, R - 1)];
    offX[nt] = (entry / K) * H;
    wX[nt] = s.topk_w[entry];
  }
  const bool scale_x = a.weight_on_input != 0;
  if (MOE_PREFETCH_DOWN) {  // start the down slab w2[e, :, i0 : i0 + S] towards L2 while gate_up streams
    const char* w2 = static_cast<const char*>(a.w2) + ((int64_t)e * H * I + i0) * 2;
    for (int h = threadIdx.x; h < H; h += kThreads)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(w2 + (int64_t)h * I * 2));
  }

  // ---- gate_up: acc13 [mt][nt] = 16 w13 rows x 8 routed rows, this warp's share of the H chunks ----
  float acc13[4][NT][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc13[mt][nt][j] = 0.0f;
  const int nch = (H + 31) / 32;  // 32-wide chunks of H; warp w takes chunks w, w + 8, ...
  // B fragment of chunk ch for n-tile nt: x[token of routed row nt * 8 + g, ch * 32 + c * 8 .. + 8), scaled by the
  // routing weight (rounded to x's dtype) when weight_on_input
  auto x_frag = [&](int kk, int nt) {
    uint4 v = load8<VEC, false>(x, offX[nt], kk, H);
    if (scale_x) {
      v.x = scale_pair<XT>(v.x, wX[nt]); v.y = scale_pair<XT>(v.y, wX[nt]);
      v.z = scale_pair<XT>(v.z, wX[nt]); v.w = scale_pair<XT>(v.w, wX[nt]);
    }
    return v;
  };
  // both k-steps of one chunk: A rows g (wa) and g + 8 (wb) of tile mt, K order permuted as the header says
  auto chunk_mma = [&](int mt, const uint4& wa, const uint4& wb, const uint4 (&xb)[NT]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      Dt<XT>::mma(acc13[mt][nt], wa.x, wb.x, wa.y, wb.y, xb[nt].x, xb[nt].y);
      Dt<XT>::mma(acc13[mt][nt], wa.z, wb.z, wa.w, wb.w, xb[nt].z, xb[nt].w);
    }
  };
#if MOE_CP_ASYNC
  if constexpr (VEC) {
    // weights stream through a per-warp ring of MOE_CP_STAGES chunks in shared memory (cp.async, 16 bytes per
    // lane, zero-filled past the end): MOE_CP_STAGES - 1 chunks in flight without holding registers. Each lane
    // reads back only what it copied, so a lane's own wait_group is the only synchronisation.
    constexpr int NS = MOE_CP_STAGES;
    uint4* ring = &s.u.ring[warp][0][0][0];  // [NS][8 = 4 tiles x rows g, g + 8][32 lanes]
    auto issue = [&](int i) {  // the warp's i-th chunk into stage i % NS
      const int ch = warp + i * kWarps;
      const int k = ch * 32 + c * 8;
      const bool in = ch < nch && k < H;
      uint4* stage = ring + (i % NS) * 8 * 32 + lane;
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        if (mt < mt_count) {
          cp_async16(stage + (2 * mt) * 32, w13 + (in && offA[mt] >= 0 ? offA[mt] + k : 0), in && offA[mt] >= 0);
          cp_async16(stage + (2 * mt + 1) * 32, w13 + (in && offB[mt] >= 0 ? offB[mt] + k : 0), in && offB[mt] >= 0);
        }
      }
      cp_async_commit();
    };
    const int mine = warp < nch ? (nch - warp + kWarps - 1) / kWarps : 0;
#pragma unroll
    for (int i = 0; i < NS - 1; ++i) issue(i);
    for (int i = 0; i < mine; ++i) {
      issue(i + NS - 1);
      cp_async_wait<NS - 1>();
      const uint4* stage = ring + (i % NS) * 8 * 32 + lane;
      const int k = (warp + i * kWarps) * 32 + c * 8;
      uint4 xb[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) xb[nt] = x_frag(k, nt);
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
        if (mt < mt_count) chunk_mma(mt, stage[(2 * mt) * 32], stage[(2 * mt + 1) * 32], xb);
    }
    cp_async_wait<0>();
    __syncthreads();  // the reduction buffer below shares memory with the other warps' rings
  } else
#endif
  {
    // H chunks per warp per iteration: 2 doubles the loads in flight but spills at 128 registers (2 CTAs/SM)
    constexpr int kUnroll = MOE_UNROLL;
    for (int ch0 = warp; ch0 < nch; ch0 += kWarps * kUnroll) {
      uint4 wa[kUnroll][4], wb[kUnroll][4], xb[kUnroll][NT];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int k = (ch0 + u * kWarps) * 32 + c * 8;
        const int kk = (ch0 + u * kWarps < nch) ? k : H;  // past the end: zeros, no load
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          if (mt < mt_count) {
            wa[u][mt] = load8<VEC, true>(w13, offA[mt], kk, H);
            wb[u][mt] = load8<VEC, true>(w13, offB[mt], kk, H);
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xb[u][nt] = x_frag(kk, nt);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
          if (mt < mt_count) chunk_mma(mt, wa[u][mt], wb[u][mt], xb[u]);
    }
  }
  store_partials<NT>(s, warp, acc13, mt_count, g, c);
  __syncthreads();

  // ---- activation: act [r, q] for routed row r, slice column q ----
  const int tid = threadIdx.x;
  for (int idx = tid; idx < NT * 8 * kSlice; idx += kThreads) {
    const int r = idx / kSlice, q = idx % kSlice;
    float v = 0.0f;
    if (r < R && i0 + q < I) {
      float gsum = 0.0f, usum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        gsum += s.u.red[w][q][r];
        if (gated) usum += s.u.red[w][kSlice + q][r];
      }
      if (a.b13) {
        const int64_t b = (int64_t)e * rows13 + i0 + q;
        gsum += Dt<XT>::load(a.b13, b);
        if (gated) usum += Dt<XT>::load(a.b13, b + I);
      }
      v = activate(gsum, usum, gated, a.activation, (float)a.alpha, (float)a.limit);
    }
    Dt<XT>::store(s.act[r], q, v);
  }
  __syncthreads();

  // ---- down: acc[token, h] += weight * sum_q act[r, q] * w2[e, h, i0 + q] ----
  uint4 bfrag[NT];
  int tok[NT][2];
  float wgt[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    bfrag[nt] = *reinterpret_cast<const uint4*>(&s.act[nt * 8 + g][c * 8]);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = nt * 8 + 2 * c + j;
      const int entry = s.unit_entry[ai][min(r, R - 1)];
      tok[nt][j] = r < R ? entry / K : -1;
      wgt[nt][j] = scale_x ? 1.0f : s.topk_w[entry];
    }
  }
  const uint16_t* w2 = static_cast<const uint16_t*>(a.w2) + (int64_t)e * H * I;
  const bool add_b2 = a.b2 != nullptr && slice == 0;
  const int k = i0 + c * 8;
  constexpr int kTiles = NT == 1 ? 8 : 4;  // m16 tiles of H in flight per warp
  const int nmt = (H + 15) / 16;
  for (int mt0 = warp; mt0 < nmt; mt0 += kWarps * kTiles) {
    uint4 wa[kTiles], wb[kTiles];
#pragma unroll
    for (int d = 0; d < kTiles; ++d) {
      const int h = (mt0 + d * kWarps) * 16 + g;
      wa[d] = load8<VEC, true>(w2, h < H ? h * I : -1, k, I);
      wb[d] = load8<VEC, true>(w2, h + 8 < H ? (h + 8) * I : -1, k, I);
    }
#pragma unroll
    for (int d = 0; d < kTiles; ++d) {
      // mma.sync.aligned needs the whole warp: skip by tile (warp-uniform), never by row. A tile that straddles H
      // (H % 16 in 1..7) has lanes whose rows h are past H: their A rows load as zeros and they store nothing.
      const int tile_h = (mt0 + d * kWarps) * 16;
      if (tile_h >= H) continue;
      const int h = tile_h + g;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        Dt<XT>::mma(acc, wa[d].x, wb[d].x, wa[d].y, wb[d].y, bfrag[nt].x, bfrag[nt].y);
        Dt<XT>::mma(acc, wa[d].z, wb[d].z, wa[d].w, wb[d].w, bfrag[nt].z, bfrag[nt].w);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (tok[nt][j] < 0 || h >= H) continue;
          float* dst = a.acc + (int64_t)tok[nt][j] * H;
          float v0 = acc[j], v1 = acc[2 + j];
          if (add_b2) {
            v0 += Dt<XT>::load(a.b2, (int64_t)e * H + h);
            if (h + 8 < H) v1 += Dt<XT>::load(a.b2, (int64_t)e * H + h + 8);
          }
          atomicAdd(dst + h, v0 * wgt[nt][j]);
          if (h + 8 < H) atomicAdd(dst + h + 8, v1 * wgt[nt][j]);
        }
      }
    }
  }
}

// FP8: e4m3 expert weights (moe_decode_fp8.cuh); phase 1 also quantizes x, phase 3 runs the FP8 units.
template <typename XT, typename RT, bool VEC, bool FP8>
__global__ void __launch_bounds__(kThreads, MOE_MIN_BLOCKS) moe_decode_kernel(const __grid_constant__ Params P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);
  const MoeArgs& a = P.a;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int T = a.T, H = a.H, E = a.E;

  unsigned long long* clock = a.timing ? a.timing + blockIdx.x * kTimePoints : nullptr;
  if (clock && tid == 0) clock[0] = globaltimer_ns();
  // ---- phase 1: zero acc, router logits ----
  for (int i = blockIdx.x * kThreads + tid; i < T * H; i += P.grid * kThreads) a.acc[i] = 0.0f;
  if constexpr (FP8)
    for (int t = blockIdx.x * kWarps + warp; t < T; t += P.grid * kWarps) quantize_x_row<XT>(a, t, lane);
  router_logits_phase<XT, RT, VEC>(P, blockIdx.x * kWarps + warp, P.grid * kWarps, lane);
  if (clock && tid == 0) clock[1] = globaltimer_ns();
  grid_barrier(a.sync, P.grid);
  if (clock && tid == 0) clock[2] = globaltimer_ns();

  // ---- phase 2: routing and unit tables (every CTA) ----
  for (int t = warp; t < T; t += kWarps) route_token<RT>(a, t, s, warp, lane);
  __syncthreads();
  if (blockIdx.x == 0 && a.route_ids != nullptr) {
    for (int i = tid; i < T * a.K; i += kThreads) {
      a.route_ids[i] = s.topk_id[i];
      a.route_weights[i] = s.topk_w[i];
    }
  }
  build_units(a, s, tid, warp, lane);
  if (clock && tid == 0) clock[3] = globaltimer_ns();

  // ---- phase 3: work units ----
  const int slices = (a.I + kSlice - 1) / kSlice;
  const int units = s.num_active * slices;
  for (int u = blockIdx.x; u < units; u += P.grid) {
    const int ai = u / slices, slice = u % slices;
    if constexpr (FP8) {
      if (s.unit_rows[ai] <= 8) run_unit_fp8<XT, VEC, 1>(a, s, ai, slice, warp, lane);
      else run_unit_fp8<XT, VEC, 2>(a, s, ai, slice, warp, lane);
    } else {
      if (s.unit_rows[ai] <= 8) run_unit<XT, VEC, 1>(a, s, ai, slice, warp, lane);
      else run_unit<XT, VEC, 2>(a, s, ai, slice, warp, lane);
    }
  }

  // ---- phase 4: the last CTA casts the result and leaves the buffers clean for the next launch ----
  __threadfence();
  __syncthreads();
  if (clock && tid == 0) clock[4] = globaltimer_ns();
  if (tid == 0) s.is_last = atomicAdd(a.sync + kDoneCount, 1u) == (unsigned)P.grid - 1;
  __syncthreads();
  if (s.is_last) {
    __threadfence();
    const bool timed_out = ld_acquire(a.sync + kTimedOut) != 0u;  // a broken barrier: make the result loudly wrong
#pragma unroll 8
    for (int i = tid; i < T * H; i += kThreads) Dt<XT>::store(a.out, i, timed_out ? NAN : __ldcg(a.acc + i));
    for (int i = tid; i < T * E; i += kThreads) a.logits[i] = 0.0f;
    if (tid == 0) atomicExch(a.sync + kDoneCount, 0u);
    if (clock && tid == 0) clock[5] = globaltimer_ns();
  }
}

// ---------------------------------------------------------------- host side ----------------------------------

thread_local char g_error[512];

const char* fail(const char* what, cudaError_t err) {
  snprintf(g_error, sizeof(g_error), "%s: %s", what, cudaGetErrorString(err));
  return g_error;
}

template <typename XT, typename RT, bool VEC, bool FP8>
const char* launch(const MoeArgs& a, cudaStream_t stream) {
  auto kernel = moe_decode_kernel<XT, RT, VEC, FP8>;
  constexpr int kMaxDevices = 64;
  static int grid_of_device[kMaxDevices] = {0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return fail("cudaGetDevice", err);
  if (device >= kMaxDevices) return "device index out of range";
  const size_t smem = sizeof(Smem);
  if (grid_of_device[device] == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return fail("cudaFuncSetAttribute", err);
    int per_sm = 0, sms = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
    if (err != cudaSuccess) return fail("cudaOccupancyMaxActiveBlocksPerMultiprocessor", err);
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return fail("cudaDeviceGetAttribute", err);
    if (per_sm < 1) return "the kernel does not fit on one multiprocessor";
    grid_of_device[device] = per_sm * sms;
  }
  Params p;
  p.a = a;
  p.grid = grid_of_device[device];
  // router work items: (expert, piece of H) with about one item per warp of the grid
  const int step = 32 * (16 / (int)sizeof(RT));
  const int steps = (int)((a.H + step - 1) / step);
  const long long warps = (long long)p.grid * kWarps;
  const int per_item = (int)std::max(1LL, ((long long)steps * a.E + warps - 1) / warps);
  p.router_splits = (steps + per_item - 1) / per_item;
  p.router_span = per_item * step;

  cudaLaunchConfig_t cfg;
  memset(&cfg, 0, sizeof(cfg));
  cfg.gridDim = dim3(p.grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeCooperative;  // guarantees co-residency, which the grid barrier needs
  attr.val.cooperative = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  err = cudaLaunchKernelEx(&cfg, kernel, p);
  if (err != cudaSuccess) return fail("moe_decode_kernel launch", err);
  return nullptr;
}

template <typename XT, typename RT>
const char* launch_for(const MoeArgs& a, cudaStream_t stream, bool vec) {
  if (a.fp8) return vec ? launch<XT, RT, true, true>(a, stream) : launch<XT, RT, false, true>(a, stream);
  return vec ? launch<XT, RT, true, false>(a, stream) : launch<XT, RT, false, false>(a, stream);
}

}  // namespace moe

extern "C" {

// Limits the Python side checks before calling (kept here so both sides read one source of truth).
int moe_decode_limit(int which) {
  switch (which) {
    case 0: return moe::kMaxT;
    case 1: return moe::kMaxK;
    case 2: return moe::kMaxE;
    case 3: return (int)sizeof(moe::MoeArgs);
    case 4: return moe::kTimePoints;
    default: return -1;
  }
}

// Launch one layer on `stream`. Returns null on success, else a message. vec: H % 8 == 0, I % 8 == 0 (FP8: % 16)
// and 16-byte aligned x / router / expert weights (16-byte vector loads). FP8 (a.fp8): e4m3 w13 / w2 with
// w13_scale / w2_scale, and the xq / x_scale scratch (moe_decode_fp8.cuh).
const char* moe_decode_launch(const moe::MoeArgs* args, void* stream, int vec) {
  using bf16 = __nv_bfloat16;
  using f16 = __half;
  const moe::MoeArgs& a = *args;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool x_bf16 = a.x_dtype == moe::kBF16;
  const bool r_f32 = a.router_dtype == moe::kF32;
  if (a.x_dtype != moe::kBF16 && a.x_dtype != moe::kF16) return "x dtype must be bf16 or fp16";
  if (!r_f32 && a.router_dtype != a.x_dtype) return "router dtype must be x's dtype or fp32";
  if (a.fp8 && (!a.w13_scale || !a.w2_scale || !a.xq || !a.x_scale || a.weight_on_input))
    return "FP8 needs both weight scales and the xq / x_scale scratch, and no weight on the input";
  if (x_bf16) return r_f32 ? moe::launch_for<bf16, float>(a, s, vec) : moe::launch_for<bf16, bf16>(a, s, vec);
  return r_f32 ? moe::launch_for<f16, float>(a, s, vec) : moe::launch_for<f16, f16>(a, s, vec);
}

}  // extern "C"
