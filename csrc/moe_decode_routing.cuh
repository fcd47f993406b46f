// Phase 1 and 2 of the persistent decode MoE kernel: router logits split over the whole grid, then every CTA
// routes every token itself (T <= 16: cheaper than a second grid barrier) and builds the work-unit tables.
//
// Selection follows reference.route bit for bit given the same logits: logits rounded to the router dtype (as
// F.linear returns them), scores by torch's formulas (softmax exp(l - max) / sum; sigmoid 1 / (1 + exp(-l))),
// the correction bias for selection only, group-limited top-k (a group scores its top-2 sum), then top-k with ties
// to the lowest index (torch.topk on CUDA), weights renormalised (+1e-20) and scaled. The logits themselves are an
// fp32 sum in a different order than cuBLAS's, so a logit that sits on a rounding boundary of the router dtype can
// round the other way: only exact near-ties can then select differently.
//
// Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, G = expert groups (n_group), GS = E / G.
#pragma once

#include "moe_decode_common.cuh"

namespace moe {

// Shared memory of one CTA. The routing scratch and the unit reduction buffer are never live together.
struct Smem {
  union {
    float route_scratch[kWarps][2][kMaxE];    // per warp: scores [E], selection values [E]
    float red[kWarps][2 * kSlice][kMaxT];     // per warp partial gate_up sums [unit row q][routed row r]
#if MOE_CP_ASYNC
    uint4 ring[kWarps][MOE_CP_STAGES][8][32];  // per warp gate_up weight stages [stage][tile, row half][lane]
#endif
  } u;
  uint16_t act[kMaxT][kSlice + 8];            // activations of a unit [routed row][q], x dtype bits (padded);
                                              // FP8: e4m3 bytes, the first kSlice of each row's 80
  float act_scale[kMaxT];                     // FP8: per routed row, the scale of its activation slice
  float topk_w[kMaxT * kMaxK];                // [T, K] routing weights
  int16_t topk_id[kMaxT * kMaxK];             // [T, K] expert ids
  int rank[kMaxE];                            // expert -> index among the active experts (-1: none)
  int unit_expert[kMaxT * kMaxK];             // active expert index a -> expert id (ascending)
  int unit_rows[kMaxT * kMaxK];               // a -> routed rows R
  int16_t unit_entry[kMaxT * kMaxK][kMaxT];   // a, row -> routed entry t * K + k
  int num_active;
  int is_last;
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  static_assert(sizeof(T) * N == 16 || sizeof(T) * N == 8, "16- or 8-byte vectors");
  if constexpr (sizeof(T) == 4) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  } else if constexpr (sizeof(T) * N == 16) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = Dt<T>::unpack(w[j]);
      out[2 * j] = f.x; out[2 * j + 1] = f.y;
    }
  } else {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    const float2 f0 = Dt<T>::unpack(v.x), f1 = Dt<T>::unpack(v.y);
    out[0] = f0.x; out[1] = f0.y; out[2] = f1.x; out[3] = f1.y;
  }
}

// logits[t, e] += x[t, piece] . router_w[e, piece] for every work item (e, piece), spread over all warps of the
// grid; fp32 products of values converted exactly (x to the router dtype is exact for the supported pairs).
template <typename XT, typename RT, bool VEC>
__device__ void router_logits_phase(const Params& P, int gwarp, int nwarps, int lane) {
  const MoeArgs& a = P.a;
  const int T = a.T, E = a.E, H = a.H;
  const RT* rw = static_cast<const RT*>(a.router_w);
  const XT* x = static_cast<const XT*>(a.x);
  const int items = E * P.router_splits;
  for (int item = gwarp; item < items; item += nwarps) {
    const int e = item / P.router_splits;
    const int k0 = (item % P.router_splits) * P.router_span;
    const int k1 = min(H, k0 + P.router_span);
    float acc[kMaxT];
#pragma unroll
    for (int t = 0; t < kMaxT; ++t) acc[t] = 0.0f;
    if constexpr (VEC) {
      constexpr int VN = 16 / sizeof(RT);  // router elements per 16-byte load
      for (int k = k0 + lane * VN; k < k1; k += 32 * VN) {
        float w[VN];
        load_floats<RT, VN>(rw + (int64_t)e * H + k, w);
#pragma unroll
        for (int t = 0; t < kMaxT; ++t) {
          if (t < T) {
            float xv[VN];
            load_floats<XT, VN>(x + (int64_t)t * H + k, xv);
#pragma unroll
            for (int j = 0; j < VN; ++j) acc[t] = fmaf(xv[j], w[j], acc[t]);
          }
        }
      }
    } else {
      for (int k = k0 + lane; k < k1; k += 32) {
        const float w = Dt<RT>::load(rw, (int64_t)e * H + k);
#pragma unroll
        for (int t = 0; t < kMaxT; ++t)
          if (t < T) acc[t] = fmaf(Dt<XT>::load(x, (int64_t)t * H + k), w, acc[t]);
      }
    }
#pragma unroll
    for (int t = 0; t < kMaxT; ++t) {
      if (t < T) {
        const float v = warp_sum(acc[t]);
        if (lane == 0) atomicAdd(a.logits + t * E + e, v);
      }
    }
  }
}

// Group-limited top-k: keep the topk_group groups of best top-2 sums (ties: lowest group), mask the rest -inf.
__device__ void mask_groups(const MoeArgs& a, float* choice, int lane) {
  const int G = a.n_group, GS = a.E / a.n_group;
  float gscore[kMaxE / 32];  // group g = lane + 32 j
#pragma unroll
  for (int j = 0; j < kMaxE / 32; ++j) {
    const int g = lane + 32 * j;
    float m1 = -INFINITY, m2 = -INFINITY;
    if (g < G) {
      for (int i = 0; i < GS; ++i) {
        const float v = choice[g * GS + i];
        if (v > m1) { m2 = m1; m1 = v; } else if (v > m2) { m2 = v; }
      }
    }
    gscore[j] = (GS >= 2 ? m1 + m2 : m1) + 0.0f;
  }
  unsigned keep = 0;  // bit j: group lane + 32 j kept
  for (int r = 0; r < a.topk_group; ++r) {
    unsigned long long best = 0;
#pragma unroll
    for (int j = 0; j < kMaxE / 32; ++j) {
      const int g = lane + 32 * j;
      if (g < G && !((keep >> j) & 1u)) {
        const unsigned long long key =
            ((unsigned long long)order_key(gscore[j]) << 32) | (0xffffffffu - (unsigned)g);
        best = key > best ? key : best;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
      best = other > best ? other : best;
    }
    const int pick = (int)(0xffffffffu - (unsigned)(best & 0xffffffffu));
    if ((pick & 31) == lane) keep |= 1u << (pick >> 5);
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < kMaxE / 32; ++j) {
    const int g = lane + 32 * j;
    if (g < G && !((keep >> j) & 1u))
      for (int i = 0; i < GS; ++i) choice[g * GS + i] = -INFINITY;
  }
  __syncwarp();
}

// One warp routes token t: topk_id / topk_w [t, :] in shared memory.
template <typename RT>
__device__ void route_token(const MoeArgs& a, int t, Smem& s, int warp, int lane) {
  const int E = a.E, K = a.K;
  float* score = s.u.route_scratch[warp][0];
  float* choice = s.u.route_scratch[warp][1];
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    float v = __ldcg(a.logits + t * E + e);
    if (a.router_b) v += Dt<RT>::load(a.router_b, e);
    v = Dt<RT>::round(v);  // F.linear returns logits in the router dtype
    score[e] = v;
    mx = fmaxf(mx, v);
  }
  if (a.scoring == kSoftmax) {
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) {
      const float p = expf(score[e] - mx);
      score[e] = p;
      sum += p;
    }
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) score[e] = score[e] / sum;
  } else {
    for (int e = lane; e < E; e += 32) score[e] = sigmoidf_ref(score[e]);
  }
  for (int e = lane; e < E; e += 32) {
    const float bias = a.corr ? load_any(a.corr, e, a.corr_dtype) : 0.0f;
    choice[e] = (score[e] + bias) + 0.0f;  // + 0 folds -0 onto +0 for order_key
  }
  __syncwarp();
  if (a.n_group > 1 && a.topk_group < a.n_group) mask_groups(a, choice, lane);

  // top-k: each lane holds a contiguous block of experts, so the lowest lane among equal maxima holds the lowest id
  const int per_lane = (E + 31) / 32;
  const int base = lane * per_lane;
  float v[kMaxE / 32];
#pragma unroll
  for (int j = 0; j < kMaxE / 32; ++j) v[j] = (j < per_lane && base + j < E) ? choice[base + j] : NAN;
  float my_w = 0.0f;
  int my_id = 0;
  for (int k = 0; k < K; ++k) {
    float best = 0.0f;
    int bj = -1;
#pragma unroll
    for (int j = 0; j < kMaxE / 32; ++j)
      if (!isnan(v[j]) && (bj < 0 || v[j] > best)) { best = v[j]; bj = j; }
    const uint32_t key = bj >= 0 ? order_key(best) : 0u;
    const uint32_t top = __reduce_max_sync(0xffffffffu, key);
    const unsigned holders = __ballot_sync(0xffffffffu, bj >= 0 && key == top);
    const int src = holders ? __ffs(holders) - 1 : 0;
    const int shuffled = __shfl_sync(0xffffffffu, base + bj, src);
    const int pick = holders ? shuffled : 0;  // no candidate left (NaN logits): any valid id, never out of range
    if (lane == src) {
#pragma unroll
      for (int j = 0; j < kMaxE / 32; ++j)
        if (j == bj) v[j] = NAN;
    }
    if (lane == k) { my_id = pick; my_w = score[pick]; }
  }
  const float total = warp_sum(lane < K ? my_w : 0.0f);
  if (a.renormalize) my_w = my_w / (total + 1e-20f);  // reference.RENORM_EPS
  my_w *= (float)a.routed_scaling;
  if (lane < K) {
    s.topk_id[t * K + lane] = (int16_t)my_id;
    s.topk_w[t * K + lane] = my_w;
  }
}

// Active experts in ascending order, and for each the routed entries (t * K + k) of its tokens by token.
__device__ void build_units(const MoeArgs& a, Smem& s, int tid, int warp, int lane) {
  const int E = a.E, K = a.K, TK = a.T * a.K;
  for (int e = tid; e < E; e += kThreads) s.rank[e] = 0;
  __syncthreads();
  for (int i = tid; i < TK; i += kThreads) s.rank[s.topk_id[i]] = 1;
  __syncthreads();
  if (warp == 0) {
    const int per_lane = (E + 31) / 32, base = lane * per_lane;
    int count = 0;
    for (int j = 0; j < per_lane; ++j)
      if (base + j < E) count += s.rank[base + j];
    int incl = count;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += up;
    }
    int r = incl - count;
    for (int j = 0; j < per_lane; ++j) {
      const int e = base + j;
      if (e >= E) break;
      if (s.rank[e]) { s.unit_expert[r] = e; s.rank[e] = r++; } else { s.rank[e] = -1; }
    }
    if (lane == 31) s.num_active = incl;
  }
  __syncthreads();
  for (int i = tid; i < TK; i += kThreads) {
    const int t = i / K, e = s.topk_id[i];
    int slot = 0, total = 0;
    for (int j = 0; j < TK; ++j) {
      if (s.topk_id[j] == e) {
        ++total;
        if (j / K < t) ++slot;
      }
    }
    const int ai = s.rank[e];
    s.unit_entry[ai][slot] = (int16_t)i;
    if (slot == 0) s.unit_rows[ai] = total;
  }
  __syncthreads();
}

}  // namespace moe
