// FP8 (W8A8) work units of the persistent decode MoE kernel (moe_decode.cu): e4m3 expert weights with one fp32 scale
// per output channel (quant.fp8.quantize_per_channel), activations quantized to e4m3 at run time, tensor-core MMAs
// mma.sync m16n8k32 e4m3 x e4m3 -> fp32. Same work units as the 16-bit kernel: (active expert, 32-column I-slice).
//
// Dimension legend: T = tokens, H = hidden, I = expert intermediate, S = kSlice = 32, R = routed rows of a unit,
//   Hq = H rounded up to 16 (the row stride of the quantized x).
//
// Activation scales. x: one per token, amax over H / 448, as quant.fp8.quantize_per_token; phase 1 quantizes each
//   token once (one warp per token) into xq [T, Hq] (zero-padded), so every unit reads e4m3 B fragments with one
//   16-byte load. The intermediate: a unit owns a 32-column slice of I and no CTA ever holds a whole row (that would
//   take a second grid barrier), so each routed row's slice gets its own scale, amax over its 32 columns / 448:
//   block scaling with 1 x 32 blocks, finer than the reference's one scale per row (the quantization error of a
//   block is at most that of the row).
// Fragments (m16n8k32, 8-bit operands): lane (g = lane / 4, c = lane % 4) holds 4 bytes of A rows g and g + 8 at
//   fragment k 4c..4c+3 (a0, a1) and 4c+16..4c+19 (a2, a3), and of B column g at the same k (b0, b1). As in the
//   16-bit kernel the K order is permuted identically for A and B, which a dot product does not see. gate_up: lane
//   c loads 16 bytes at k = 64 ch + 16 c of a 64-wide chunk ch: bytes 0-7 feed k-step 0, bytes 8-15 k-step 1.
//   down: lane c loads 8 bytes at slice column 8 c: one k32 step per slice.
#pragma once

#include "moe_decode_unit.cuh"

namespace moe {

constexpr float kE4m3Max = 448.0f;
constexpr float kMinScale = 1e-12f;  // quant.fp8.MIN_SCALE: the scale of an all-zero row
static_assert(kSlice == 32, "the FP8 activation pass gives one warp lane to each slice column");

__host__ __device__ constexpr int xq_stride(int H) { return (H + 15) & ~15; }

// Two floats -> two e4m3 in the low 16 bits (lo in the low byte): round to nearest even, saturating at +-448 (the
// reference clamps to +-448 before its cast).
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  unsigned short v;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(v) : "f"(hi), "f"(lo));
  return v;
}

// D[16x8] += A[16x32] (row) * B[32x8] (col), e4m3 operands, fp32 accumulate
__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Bytes row[off + k .. + N) of e4m3 weights, zero past kmax or for an absent row (off < 0). VEC: kmax % 16 == 0
// and 16-byte aligned rows, so a piece is wholly inside or outside.
template <bool VEC>
__device__ __forceinline__ uint4 load16_e4m3(const uint8_t* base, int off, int k, int kmax) {
  if (off < 0 || k >= kmax) return make_uint4(0, 0, 0, 0);
  if constexpr (VEC) return ld_stream(base + off + k);
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int b = 0; b < 16; ++b)
    if (k + b < kmax) w[b / 4] |= (uint32_t)base[off + k + b] << (8 * (b % 4));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <bool VEC>
__device__ __forceinline__ uint2 load8_e4m3(const uint8_t* base, int off, int k, int kmax) {
  if (off < 0 || k >= kmax) return make_uint2(0, 0);
  if constexpr (VEC) return ld_stream8(base + off + k);
  uint32_t w[2] = {0, 0};
#pragma unroll
  for (int b = 0; b < 8; ++b)
    if (k + b < kmax) w[b / 4] |= (uint32_t)base[off + k + b] << (8 * (b % 4));
  return make_uint2(w[0], w[1]);
}

// Phase 1, one warp per token t: x_scale[t] = max(amax |x[t]| / 448, kMinScale), xq[t, :] = e4m3(x[t] / scale).
template <typename XT>
__device__ void quantize_x_row(const MoeArgs& a, int t, int lane) {
  const int H = a.H, Hq = xq_stride(H);
  const void* x = static_cast<const XT*>(a.x) + (int64_t)t * H;
  float amax = 0.0f;
  for (int k = lane; k < H; k += 32) amax = fmaxf(amax, fabsf(Dt<XT>::load(x, k)));
  const float scale = fmaxf(warp_max(amax) / kE4m3Max, kMinScale);
  if (lane == 0) a.x_scale[t] = scale;
  uint32_t* row = reinterpret_cast<uint32_t*>(a.xq + (int64_t)t * Hq);
  for (int k = lane * 4; k < Hq; k += 128) {
    float v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = k + j < H ? Dt<XT>::load(x, k + j) / scale : 0.0f;
    row[k / 4] = e4m3x2(v[0], v[1]) | (e4m3x2(v[2], v[3]) << 16);
  }
}

// One FP8 work unit (active expert ai, I-slice) with NT n-tiles of 8 routed rows; the 16-bit run_unit's steps.
template <typename XT, bool VEC, int NT>
__device__ void run_unit_fp8(const MoeArgs& a, Smem& s, int ai, int slice, int warp, int lane) {
  const int H = a.H, I = a.I, K = a.K, Hq = xq_stride(H);
  const int e = s.unit_expert[ai], R = s.unit_rows[ai];
  const int i0 = slice * kSlice;
  const bool gated = a.gated != 0;
  const int rows13 = gated ? 2 * I : I;
  const int mt_count = gated ? 4 : 2;  // m16 tiles of the unit's w13 rows (2S gated, S not)
  const int g = lane >> 2, c = lane & 3;
  const uint8_t* w13 = static_cast<const uint8_t*>(a.w13) + (int64_t)e * rows13 * H;

  // A rows of this lane, as byte offsets inside the expert: unit row q (< S: gate row i0 + q, else up row)
  int offA[4], offB[4];
  unit_row_offsets(i0, I, H, mt_count, g, offA, offB);
  int offX[NT];  // B columns: the quantized x row of routed row nt * 8 + g (clamped to a real row)
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) offX[nt] = (s.unit_entry[ai][min(nt * 8 + g, R - 1)] / K) * Hq;

  // ---- gate_up: acc13 [mt][nt] = 16 w13 rows x 8 routed rows over this warp's 64-wide chunks of H ----
  float acc13[4][NT][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc13[mt][nt][j] = 0.0f;
  const int nch = (H + 63) / 64;
  for (int ch = warp; ch < nch; ch += kWarps) {
    const int k = ch * 64 + c * 16;
    uint4 wa[4], wb[4], xb[NT];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      if (mt < mt_count) {
        wa[mt] = load16_e4m3<VEC>(w13, offA[mt], k, H);
        wb[mt] = load16_e4m3<VEC>(w13, offB[mt], k, H);
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)  // written in phase 1 by other CTAs: read through L2 (ld.cg), not ld.nc
      xb[nt] = k < Hq ? __ldcg(reinterpret_cast<const uint4*>(a.xq + offX[nt] + k)) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      if (mt < mt_count) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma_e4m3(acc13[mt][nt], wa[mt].x, wb[mt].x, wa[mt].y, wb[mt].y, xb[nt].x, xb[nt].y);
          mma_e4m3(acc13[mt][nt], wa[mt].z, wb[mt].z, wa[mt].w, wb[mt].w, xb[nt].z, xb[nt].w);
        }
      }
    }
  }
  store_partials<NT>(s, warp, acc13, mt_count, g, c);
  __syncthreads();

  // ---- activation, one warp per routed row r, lane = slice column q; then e4m3 with the slice's own scale ----
  const float* s13 = a.w13_scale + (int64_t)e * rows13;
  for (int r = warp; r < NT * 8; r += kWarps) {
    const int q = lane;
    float v = 0.0f;
    if (r < R && i0 + q < I) {
      const float xs = __ldcg(a.x_scale + s.unit_entry[ai][r] / K);
      float gsum = 0.0f, usum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        gsum += s.u.red[w][q][r];
        if (gated) usum += s.u.red[w][kSlice + q][r];
      }
      gsum *= xs * s13[i0 + q];
      if (gated) usum *= xs * s13[I + i0 + q];
      if (a.b13) {
        const int64_t b = (int64_t)e * rows13 + i0 + q;
        gsum += Dt<XT>::load(a.b13, b);
        if (gated) usum += Dt<XT>::load(a.b13, b + I);
      }
      v = Dt<XT>::round(activate(gsum, usum, gated, a.activation, (float)a.alpha, (float)a.limit));
    }
    const float scale = fmaxf(warp_max(fabsf(v)) / kE4m3Max, kMinScale);
    reinterpret_cast<uint8_t*>(s.act[r])[q] = (uint8_t)(e4m3x2(v / scale, 0.0f) & 0xffu);
    if (lane == 0) s.act_scale[r] = scale;
  }
  __syncthreads();

  // ---- down: acc[token, h] += weight * (scale_r * w2_scale[h] * sum_q act8[r, q] * w2_8[e, h, i0 + q] + b2) ----
  uint2 bfrag[NT];
  int tok[NT][2];
  float wgt[NT][2], ascale[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    bfrag[nt] = *reinterpret_cast<const uint2*>(reinterpret_cast<const uint8_t*>(s.act[nt * 8 + g]) + c * 8);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int r = nt * 8 + 2 * c + j;
      const int entry = s.unit_entry[ai][min(r, R - 1)];
      tok[nt][j] = r < R ? entry / K : -1;
      wgt[nt][j] = s.topk_w[entry];
      ascale[nt][j] = s.act_scale[r];
    }
  }
  const uint8_t* w2 = static_cast<const uint8_t*>(a.w2) + (int64_t)e * H * I;
  const float* s2 = a.w2_scale + (int64_t)e * H;
  const bool add_b2 = a.b2 != nullptr && slice == 0;
  const int k = i0 + c * 8;
  constexpr int kTiles = NT == 1 ? 8 : 4;  // m16 tiles of H in flight per warp
  const int nmt = (H + 15) / 16;
  for (int mt0 = warp; mt0 < nmt; mt0 += kWarps * kTiles) {
    uint2 wa[kTiles], wb[kTiles];
#pragma unroll
    for (int d = 0; d < kTiles; ++d) {
      const int h = (mt0 + d * kWarps) * 16 + g;
      wa[d] = load8_e4m3<VEC>(w2, h < H ? h * I : -1, k, I);
      wb[d] = load8_e4m3<VEC>(w2, h + 8 < H ? (h + 8) * I : -1, k, I);
    }
#pragma unroll
    for (int d = 0; d < kTiles; ++d) {
      const int tile_h = (mt0 + d * kWarps) * 16;
      if (tile_h >= H) continue;  // warp-uniform: mma.sync needs the whole warp (csrc/NOTES.md)
      const int h = tile_h + g;
      const float sc0 = h < H ? s2[h] : 0.0f, sc1 = h + 8 < H ? s2[h + 8] : 0.0f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_e4m3(acc, wa[d].x, wb[d].x, wa[d].y, wb[d].y, bfrag[nt].x, bfrag[nt].y);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (tok[nt][j] < 0 || h >= H) continue;
          float* dst = a.acc + (int64_t)tok[nt][j] * H;
          float v0 = acc[j] * ascale[nt][j] * sc0, v1 = acc[2 + j] * ascale[nt][j] * sc1;
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

}  // namespace moe
