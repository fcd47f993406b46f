// Pieces shared by the 16-bit and the FP8 work units of the persistent decode MoE kernel (moe_decode.cu,
// moe_decode_fp8.cuh): which w13 rows a lane loads, and the gate_up partial sums into shared memory.
//
// Dimension legend: H = hidden, I = expert intermediate, S = kSlice (I-columns of a unit), NT = n-tiles of 8 rows.
#pragma once

#include "moe_decode_routing.cuh"

namespace moe {

// A rows of this lane in a unit's w13 tiles, as element offsets inside the expert: unit row q = 16 mt + g (+ 8)
// is gate row i0 + q for q < S, else up row I + i0 + q - S; -1 past I or past the unit's mt_count tiles.
__device__ __forceinline__ void unit_row_offsets(int i0, int I, int H, int mt_count, int g, int (&offA)[4],
                                                 int (&offB)[4]) {
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    int off[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = mt * 16 + g + 8 * h;
      const int col = q < kSlice ? i0 + q : i0 + q - kSlice;  // I-column of the row
      const int row = q < kSlice ? col : I + col;
      off[h] = (mt < mt_count && col < I) ? row * H : -1;
    }
    offA[mt] = off[0];
    offB[mt] = off[1];
  }
}

// This warp's gate_up partial sums into s.u.red[warp][unit row][routed row]. C fragment: c0, c1 = (tile row g,
// routed rows 2c, 2c+1); c2, c3 = (tile row g + 8, same).
template <int NT>
__device__ __forceinline__ void store_partials(Smem& s, int warp, const float (&acc13)[4][NT][4], int mt_count,
                                               int g, int c) {
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    if (mt < mt_count) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          s.u.red[warp][mt * 16 + g][nt * 8 + 2 * c + j] = acc13[mt][nt][j];
          s.u.red[warp][mt * 16 + g + 8][nt * 8 + 2 * c + j] = acc13[mt][nt][2 + j];
        }
      }
    }
  }
}

}  // namespace moe
