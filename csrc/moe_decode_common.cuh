// Shared pieces of the persistent decode MoE kernel (moe_decode.cu): limits, the argument block, dtype traits,
// warp reductions, the grid barrier and the tensor-core MMA.
//
// Dimension legend: T = tokens, E = experts, K = top_k, H = hidden, I = expert intermediate, G = CTAs in the grid,
// S = width of the I-slice one work unit owns, R = rows of a unit (tokens routed to its expert, <= T).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace moe {

constexpr int kWarps = 8;              // warps per CTA
constexpr int kThreads = kWarps * 32;  // threads per CTA
constexpr int kMaxT = 16;              // tokens per launch (decode); rows per expert <= T
constexpr int kMaxK = 16;              // top_k
constexpr int kMaxE = 512;             // experts
constexpr int kSlice = 32;             // S: I-columns of one work unit (gate S rows + up S rows, w2 [H, S])
constexpr int kMaxNt = kMaxT / 8;      // n-tiles of 8 rows per unit

// Tuning knobs (nvcc -D..., see cuda_moe.build_library): H chunks per warp per gate_up iteration, CTAs per SM the
// registers are capped for, whether a unit prefetches its down slab into L2 when it starts, and whether gate_up
// streams its weights through a per-warp cp.async ring of MOE_CP_STAGES chunks instead of registers.
#ifndef MOE_UNROLL
#define MOE_UNROLL 1
#endif
#ifndef MOE_MIN_BLOCKS
#define MOE_MIN_BLOCKS 2
#endif
#ifndef MOE_PREFETCH_DOWN
#define MOE_PREFETCH_DOWN 0
#endif
#ifndef MOE_CP_ASYNC
#define MOE_CP_ASYNC 0
#endif
#ifndef MOE_CP_STAGES
#define MOE_CP_STAGES 3
#endif

enum DType : int64_t { kBF16 = 0, kF16 = 1, kF32 = 2 };
enum Scoring : int64_t { kSoftmax = 0, kSigmoid = 1 };
enum Act : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kSwigluOai = 4 };
// sync[kTimedOut] is set (and stays set) if a grid barrier waited past kBarrierTimeoutNs: a bug, never a hang (the
// kernel then finishes and writes NaN to its output).
enum SyncSlot : int { kBarrierCount = 0, kBarrierGen = 1, kDoneCount = 2, kTimedOut = 3 };
constexpr unsigned long long kBarrierTimeoutNs = 2000000000ull;

// The launch arguments, as the Python side packs them (ctypes): every field 8 bytes, no padding.
struct MoeArgs {
  const void* x;            // [T, H] x dtype
  const void* router_w;     // [E, H] router dtype
  const void* router_b;     // [E] router dtype, or null
  const void* corr;         // [E] corr dtype (selection-only correction bias), or null
  const void* w13;          // [E, 2I, H] (gated: gate rows then up rows) or [E, I, H], x dtype
  const void* w2;           // [E, H, I] x dtype
  const void* b13;          // [E, 2I] or [E, I] x dtype, or null
  const void* b2;           // [E, H] x dtype, or null
  void* out;                // [T, H] x dtype
  float* acc;               // [T, H] fp32 scratch: zeroed in phase 1, summed into by the units
  float* logits;            // [T, E] fp32, zero at launch (the caller's workspace; the last CTA re-zeroes it)
  unsigned* sync;           // [4] counters (SyncSlot), zero at launch; the kernel leaves them zero but kTimedOut
  int* route_ids;           // [T, K] selected experts (written by CTA 0; read by tests), or null
  float* route_weights;     // [T, K] their weights, or null
  unsigned long long* timing;  // [G, kTimePoints] %globaltimer ns at each phase boundary (profiling), or null
  // FP8 (fp8 != 0): w13 / w2 are e4m3 with per-output-channel fp32 scales; x is quantized per token in phase 1
  const float* w13_scale;   // [E, 2I] or [E, I] fp32, or null
  const float* w2_scale;    // [E, H] fp32, or null
  uint8_t* xq;              // [T, Hq] e4m3 scratch (Hq = H rounded up to 16, zero-padded), written in phase 1
  float* x_scale;           // [T] fp32 scratch: per-token activation scales, written in phase 1
  int64_t T, E, K, H, I;
  int64_t gated, x_dtype, router_dtype, corr_dtype, fp8;
  int64_t scoring, renormalize, n_group, topk_group, weight_on_input, activation;
  double routed_scaling, alpha, limit;
};

// Device-side copy with the derived launch geometry.
struct Params {
  MoeArgs a;
  int grid;           // G
  int router_splits;  // pieces of H per router row (phase 1 work item = (expert, piece))
  int router_span;    // elements of H per piece
};

template <typename T>
struct Dt;

template <>
struct Dt<__nv_bfloat16> {
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  static __device__ __forceinline__ float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
  // D[16x8] += A[16x16] (row) * B[16x8] (col), fp32 accumulate
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Dt<__half> {
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<const __half2*>(&u));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __half2float(static_cast<const __half*>(p)[i]);
  }
  static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

template <>
struct Dt<float> {
  static __device__ __forceinline__ float load(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  static __device__ __forceinline__ float round(float v) { return v; }
};

__device__ __forceinline__ float load_any(const void* p, int64_t i, int64_t dtype) {
  if (dtype == kF32) return Dt<float>::load(p, i);
  if (dtype == kF16) return Dt<__half>::load(p, i);
  return Dt<__nv_bfloat16>::load(p, i);
}

// cp.async of 16 bytes global -> shared, bypassing L1; zero-fills the 16 bytes when !valid (no global read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// 16 bytes of streamed weights: read once, so keep them out of L1.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 8 bytes of streamed weights (FP8 down slabs).
__device__ __forceinline__ uint2 ld_stream8(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// A float -> uint32 map that preserves order (-0 folded onto +0 by the caller).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Grid-wide barrier for a grid whose CTAs are all resident (cooperative launch). Self-resetting: the last CTA to
// arrive zeroes the count and bumps the generation, so the next launch (or a CUDA-graph replay) starts clean.
__device__ __forceinline__ void grid_barrier(unsigned* sync, unsigned grid) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned gen = ld_acquire(sync + kBarrierGen);
    if (atomicAdd(sync + kBarrierCount, 1u) == grid - 1) {
      atomicExch(sync + kBarrierCount, 0u);
      __threadfence();
      atomicAdd(sync + kBarrierGen, 1u);
    } else {
      const unsigned long long start = globaltimer_ns();
      while (ld_acquire(sync + kBarrierGen) == gen) {
        __nanosleep(20);
        if (globaltimer_ns() - start > kBarrierTimeoutNs) {
          atomicExch(sync + kTimedOut, 1u);
          break;
        }
      }
    }
    __threadfence();
  }
  __syncthreads();
}

__device__ __forceinline__ float sigmoidf_ref(float v) { return 1.0f / (1.0f + expf(-v)); }

// The expert activation, fp32 (reference.apply_activation); gated: act(gate) * up.
__device__ __forceinline__ float activate(float gate, float up, bool gated, int64_t act, float alpha, float limit) {
  if (act == kSwigluOai && gated) {
    gate = fminf(gate, limit);
    up = fminf(fmaxf(up, -limit), limit);
    return (up + 1.0f) * gate * sigmoidf_ref(gate * alpha);
  }
  float a;
  switch (act) {
    case kSilu: a = gate / (1.0f + expf(-gate)); break;
    case kGelu: a = 0.5f * gate * (1.0f + erff(gate * 0.70710678118654752f)); break;
    case kGeluTanh: {
      float inner = 0.7978845608028654f * (gate + 0.044715f * gate * gate * gate);
      a = 0.5f * gate * (1.0f + tanhf(inner));
      break;
    }
    case kRelu: a = fmaxf(gate, 0.0f); break;
    default: a = gate * sigmoidf_ref(gate * alpha); break;  // swiglu_oai, not gated
  }
  return gated ? a * up : a;
}

}  // namespace moe
