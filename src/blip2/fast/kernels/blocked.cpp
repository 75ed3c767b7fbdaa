// A few rows of activations times a weight matrix kept in a blocked layout: y = x @ W.T + b.
//
// Decoding several images (or beams) at once multiplies a handful of rows (8) by every weight of the
// model each step. At that size the product is bound by the weight stream and, on one core, by the
// multiply-adds as well (8 per weight): a matmul library tuned for large matrices (oneDNN) reaches about
// half of either (measured on an AMD EPYC, one thread, OPT-125m's layers at 8 rows: 11 GB/s, against 21 here).
//
// The layout: W [N, K] is cut into blocks of 16 output columns, and each block is stored k by k,
// [ceil(N / 16), K, 16] for float32 (zero-padded to whole blocks). A block's 16 weights of one k are one
// vector, so the product is an axpy: for each k, acc[r] += x[r, k] * W[block, k, :] for every row r, one
// vector load of weights feeding a multiply-add per row. A tile of C blocks (C weight streams: several
// streams keep more reads in flight than one, the more so far apart in memory: NB / C blocks between them
// for up to 8 rows, side by side for a prefill's chunks) and R <= 8 rows keeps R x C accumulators in
// registers for the whole sum over k; the result is stored once. bfloat16 weights pair neighbouring k:
// [ceil(N / 16), ceil(K / 2), 16, 2], and an AVX-512 BF16 dot product takes one pair per column.
//
// Accumulation is in fp32, in the plain order k = 0, 1, ..., K - 1 (bf16: pairs), bias added, rounded once
// to x's dtype. Many rows (a prefill) run in chunks of 8 rows over a tile while its weights sit in the
// core's cache; K is cut into slices of kSliceK so a tile's slice stays there, with the partial sums in
// fp32. Threads split the tiles.
//
// With AVX2 (simd.h: a 16-lane vector is two registers of 16) the tiles are smaller: at most 4 rows in
// registers at once (more run as groups of 4 over the same blocks, the second reading them from cache) and
// fewer blocks per tile, so that the accumulators fit the registers. The sums do not change with the tile.
//
// Included by steps.cpp (one translation unit); needs AVX-512 F and BW or AVX2 and FMA (simd.h; bf16
// weights: AVX-512 BF16).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace blocked {

using simd::V16;

constexpr int kBlock = 16;             // output columns per block: one fp32 vector
constexpr int kMaxRows = 8;            // rows per tile
constexpr int kRegRows = BLIP2_AVX512 ? 8 : 4;  // rows whose accumulators a tile keeps in registers at once
constexpr int64_t kSliceK = 1024;      // k per slice when many rows reuse a tile (fits a 1 MB L2 with C = 3)
constexpr int64_t kFewRows = 16;       // up to this many rows, one pass over K (the weights stream once)
constexpr int64_t kTaskBytes = 192 * 1024;  // the least weight one thread's task reads
constexpr int kFewRowStreams = 6;           // far-apart blocks a tile of up to 4 rows reads at once

// blocks per tile for R rows: R x C accumulators fill the registers (32 with AVX-512; with AVX2 16, a V16
// taking two, and the rows go kRegRows at a time)
template <int R>
constexpr int tile_blocks() {
  if constexpr (BLIP2_AVX512) return R <= 4 ? kFewRowStreams : 3;
  else return R == 1 ? 4 : R == 2 ? 2 : 1;
}

// fp32 weights [NB, K, 16], x fp32
struct F32 {
  using W = float;
  using X = float;
  static constexpr int kPer = 1;  // k per step
  static inline V16 x_at(const X* x, int64_t step) { return simd::set1(x[step]); }
  static inline V16 load(const W* w) { return simd::load(w); }
  static inline V16 mac(V16 acc, V16 w, V16 x) { return simd::fmadd(w, x, acc); }
};

#if defined(__AVX512BF16__)
// bf16 weights [NB, ceil(K/2), 16, 2], x bf16: one dot product of a pair per column
struct BF16 {
  using W = uint16_t;
  using X = uint16_t;
  static constexpr int kPer = 2;
  static inline __m512 x_at(const X* x, int64_t step) {
    int32_t pair;
    std::memcpy(&pair, x + 2 * step, sizeof(pair));
    return _mm512_castsi512_ps(_mm512_set1_epi32(pair));
  }
  static inline __m512 load(const W* w) { return _mm512_castsi512_ps(_mm512_loadu_si512(w)); }
  static inline __m512 mac(__m512 acc, __m512 w, __m512 x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(w), (__m512bh)_mm512_castps_si512(x));
  }
};
#endif

// acc over steps [s0, s1) of R rows (x rows ldx apart, indexed by step) and C blocks starting at w
// (blocks `block_stride` elements apart, kBlock * kPer elements a step), started from zero or (add) from
// the partial sums in `out`, plus `bias` (C * 16 floats, or none) once the sums are whole; written to
// `out` (R x C vectors, ldo apart).
template <class T, int R, int C>
inline void tile_regs(const typename T::X* x, int64_t ldx, const typename T::W* w, int64_t block_stride, int64_t s0,
                      int64_t s1, float* out, int64_t ldo, bool add, const float* bias, int64_t spacing) {
  constexpr int64_t step_elems = kBlock * T::kPer;
  V16 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = add ? simd::load(out + r * ldo + c * spacing * kBlock) : simd::zero();
  for (int64_t s = s0; s < s1; ++s) {
    const typename T::W* ws = w + s * step_elems;
    V16 wv[C];  // each weight vector loaded once, used by every row
    for (int c = 0; c < C; ++c) wv[c] = T::load(ws + c * spacing * block_stride);
    for (int r = 0; r < R; ++r) {
      const V16 xv = T::x_at(x + r * ldx, s);
      for (int c = 0; c < C; ++c) acc[r][c] = T::mac(acc[r][c], wv[c], xv);
    }
  }
  if (bias != nullptr) {
    for (int c = 0; c < C; ++c) {
      const V16 b = simd::load(bias + c * spacing * kBlock);
      for (int r = 0; r < R; ++r) acc[r][c] = simd::add(acc[r][c], b);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) simd::store(out + r * ldo + c * spacing * kBlock, acc[r][c]);
}

// tile_regs for any R <= kMaxRows: kRegRows rows at a time over the same blocks
template <class T, int R, int C>
inline void tile(const typename T::X* x, int64_t ldx, const typename T::W* w, int64_t block_stride, int64_t s0,
                 int64_t s1, float* out, int64_t ldo, bool add, const float* bias, int64_t spacing = 1) {
  if constexpr (R <= kRegRows) {
    tile_regs<T, R, C>(x, ldx, w, block_stride, s0, s1, out, ldo, add, bias, spacing);
  } else {
    tile_regs<T, kRegRows, C>(x, ldx, w, block_stride, s0, s1, out, ldo, add, bias, spacing);
    tile<T, R - kRegRows, C>(x + kRegRows * ldx, ldx, w, block_stride, s0, s1, out + kRegRows * ldo, ldo, add, bias,
                             spacing);
  }
}

// the sums of rows [0, rows) (<= kMaxRows) over blocks [b, b + width) and steps [s0, s1)
template <class T, int R>
void tile_rows(const typename T::X* x, int64_t ldx, const typename T::W* w, int64_t block_stride, int64_t b,
               int64_t width, int64_t s0, int64_t s1, float* out, int64_t ldo, bool add, const float* bias) {
  constexpr int C = tile_blocks<R>();
  const typename T::W* wb = w + b * block_stride;
  float* ob = out + b * kBlock;
  const float* bb = bias ? bias + b * kBlock : nullptr;
  int64_t c = 0;
  for (; c + C <= width; c += C)
    tile<T, R, C>(x, ldx, wb + c * block_stride, block_stride, s0, s1, ob + c * kBlock, ldo, add, bb ? bb + c * kBlock : nullptr);
  for (; c < width; ++c)
    tile<T, R, 1>(x, ldx, wb + c * block_stride, block_stride, s0, s1, ob + c * kBlock, ldo, add, bb ? bb + c * kBlock : nullptr);
}

template <class T>
void tile_any(int64_t rows, const typename T::X* x, int64_t ldx, const typename T::W* w, int64_t block_stride,
              int64_t b, int64_t width, int64_t s0, int64_t s1, float* out, int64_t ldo, bool add, const float* bias) {
  switch (rows) {
    case 8: return tile_rows<T, 8>(x, ldx, w, block_stride, b, width, s0, s1, out, ldo, add, bias);
    case 7: return tile_rows<T, 7>(x, ldx, w, block_stride, b, width, s0, s1, out, ldo, add, bias);
    case 6: return tile_rows<T, 6>(x, ldx, w, block_stride, b, width, s0, s1, out, ldo, add, bias);
    case 5: return tile_rows<T, 5>(x, ldx, w, block_stride, b, width, s0, s1, out, ldo, add, bias);
    case 4: return tile_rows<T, 4>(x, ldx, w, block_stride, b, width, s0, s1, out, ldo, add, bias);
    case 3: return tile_rows<T, 3>(x, ldx, w, block_stride, b, width, s0, s1, out, ldo, add, bias);
    case 2: return tile_rows<T, 2>(x, ldx, w, block_stride, b, width, s0, s1, out, ldo, add, bias);
    default: return tile_rows<T, 1>(x, ldx, w, block_stride, b, width, s0, s1, out, ldo, add, bias);
  }
}

// the sums of R <= kMaxRows rows over every block in one pass over K: tiles of C blocks NB / C apart
// (tile_blocks), the leftover blocks one at a time
template <class T, int R>
void spaced(const typename T::X* x, int64_t ldx, const typename T::W* w, int64_t block_stride, int64_t steps,
            int64_t NB, float* y, int64_t ldy, const float* bias) {
  constexpr int C = tile_blocks<R>();
  const int64_t spacing = NB / C;  // 0 when NB < C: every block is left over
  const int64_t g = std::max<int64_t>(1, kTaskBytes / (C * block_stride * (int64_t)sizeof(typename T::W)));
  at::parallel_for(0, spacing, g, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      tile<T, R, C>(x, ldx, w + t * block_stride, block_stride, 0, steps, y + t * kBlock, ldy, false,
                    bias ? bias + t * kBlock : nullptr, spacing);
  });
  for (int64_t b = spacing * C; b < NB; ++b)
    tile<T, R, 1>(x, ldx, w + b * block_stride, block_stride, 0, steps, y + b * kBlock, ldy, false,
                  bias ? bias + b * kBlock : nullptr);
}

// fp32 sums y [M, NB * 16] (ldy = NB * 16) of x [M, steps * kPer] and a blocked weight [NB, steps, 16 * kPer],
// plus bias (NB * 16 floats, zero-padded; or none).
template <class T>
void sums(const typename T::X* x, int64_t M, int64_t steps, const typename T::W* w, int64_t NB, float* y,
          const float* bias = nullptr) {
  const int64_t block_stride = steps * kBlock * T::kPer;
  const int64_t ldx = steps * T::kPer, ldy = NB * kBlock;
  if (M <= kMaxRows) {
    // a few rows: each tile reads its blocks far apart (NB / C blocks between them: a core keeps more
    // reads in flight for streams in distant parts of memory, as row_product.cpp's; measured at 8 rows,
    // OPT-125m's layers: 4-5% faster than side by side at one thread, 7% at two), the blocks left over one
    // at a time. The sums are the same whatever the tile: each column's, row by row, in the order of k.
    switch (M) {
      case 8: return spaced<T, 8>(x, ldx, w, block_stride, steps, NB, y, ldy, bias);
      case 7: return spaced<T, 7>(x, ldx, w, block_stride, steps, NB, y, ldy, bias);
      case 6: return spaced<T, 6>(x, ldx, w, block_stride, steps, NB, y, ldy, bias);
      case 5: return spaced<T, 5>(x, ldx, w, block_stride, steps, NB, y, ldy, bias);
      case 4: return spaced<T, 4>(x, ldx, w, block_stride, steps, NB, y, ldy, bias);
      case 3: return spaced<T, 3>(x, ldx, w, block_stride, steps, NB, y, ldy, bias);
      case 2: return spaced<T, 2>(x, ldx, w, block_stride, steps, NB, y, ldy, bias);
      default: return spaced<T, 1>(x, ldx, w, block_stride, steps, NB, y, ldy, bias);
    }
  }
  // more rows: tiles of blocks side by side, the rows in chunks of kMaxRows over each while it is in cache
  const int64_t tile_blocks = 3;
  const int64_t tiles = (NB + tile_blocks - 1) / tile_blocks;
  const int64_t tile_bytes = tile_blocks * block_stride * (int64_t)sizeof(typename T::W);
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / tile_bytes);
  const int64_t slice = M <= kFewRows ? steps : std::max<int64_t>(1, kSliceK / T::kPer);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t * tile_blocks, width = std::min(tile_blocks, NB - b);
      for (int64_t s0 = 0; s0 < steps; s0 += slice) {
        const int64_t s1 = std::min(steps, s0 + slice);
        for (int64_t m = 0; m < M; m += kMaxRows) {
          tile_any<T>(std::min<int64_t>(kMaxRows, M - m), x + m * ldx, ldx, w, block_stride, b, width, s0, s1,
                      y + m * ldy, ldy, s0 > 0, s1 == steps ? bias : nullptr);
        }
      }
    }
  });
}

inline bool bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// a bias of n outputs as the kernel takes it, fp32 over `width` (whole blocks): in place where it is fp32
// and fills them, else widened and zero-padded into buf; nullptr without a bias
inline const float* padded_bias(const Vector& b, int64_t n, int64_t width, std::vector<float>& buf) {
  if (!b.present()) return nullptr;
  if (b.f32 != nullptr && n == width) return b.f32;
  buf.assign(width, 0.f);
  for (int64_t i = 0; i < n; ++i) buf[i] = b[i];
  return buf.data();
}

// y[0:n] rounded to bfloat16 (to nearest even, as at::BFloat16)
inline void to_bf16(const float* y, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = at::BFloat16(y[i]).x;
}

// x [..., K] (float32 with a float32 weight, bfloat16 with a bfloat16 one), w blocked, bias [N] or none
// -> [..., N] in x's dtype
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t n) {
  const auto xt = x.scalar_type(), wt = w.scalar_type();
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "blocked_linear: x and w must be on the CPU");
  TORCH_CHECK(w.is_contiguous() && ((wt == at::kFloat && w.dim() == 3 && w.size(2) == kBlock) ||
                                    (wt == at::kBFloat16 && w.dim() == 4 && w.size(2) == kBlock && w.size(3) == 2)),
              "blocked_linear: w must be a contiguous blocked weight, float32 [NB, K, 16] or bfloat16 "
              "[NB, K/2, 16, 2], got ", wt, " ", w.sizes());
  TORCH_CHECK(xt == wt, "blocked_linear: x is ", xt, " but the weight is ", wt);
  TORCH_CHECK(wt != at::kBFloat16 || bf16_dot(), "blocked_linear: bfloat16 weights need AVX-512 BF16");
  const int64_t NB = w.size(0), steps = w.size(1), per = wt == at::kFloat ? 1 : 2;
  TORCH_CHECK(n > (NB - 1) * kBlock && n <= NB * kBlock, "blocked_linear: ", n, " outputs do not fit ", NB,
              " blocks of ", kBlock);
  TORCH_CHECK(x.dim() >= 1, "blocked_linear: x must have a last dimension");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > (steps - 1) * per && K <= steps * per, "blocked_linear: x has ", K, " features, the weight ",
              steps * per);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous() && bias->numel() == n &&
                (bias->scalar_type() == at::kFloat || bias->scalar_type() == at::kBFloat16),
                "blocked_linear: bias must be a contiguous float32/bfloat16 CPU tensor of ", n);
  }
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor out = at::empty(shape, x.options());
  if (M == 0) return out;
  at::Tensor xc = x.reshape({M, K}).contiguous();
  if (K != steps * per) xc = at::constant_pad_nd(xc, {0, steps * per - K});  // odd K, bf16: a zero to pair with
  // fp32 sums over whole blocks with the bias, then one rounding into out
  const int64_t ldy = NB * kBlock;
  std::vector<float> bias_buf;
  const float* b32 = padded_bias(Vector(bias), n, ldy, bias_buf);
  const bool direct = xt == at::kFloat && n == ldy;
  at::Tensor sums_t = direct ? out : at::empty({M, ldy}, x.options().dtype(at::kFloat));
  float* y = sums_t.data_ptr<float>();
  if (wt == at::kFloat) {
    sums<F32>(xc.data_ptr<float>(), M, steps, w.data_ptr<float>(), NB, y, b32);
  } else {
#if defined(__AVX512BF16__)
    sums<BF16>((const uint16_t*)xc.data_ptr(), M, steps, (const uint16_t*)w.data_ptr(), NB, y, b32);
#endif
  }
  if (direct) return out;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if (xt == at::kFloat) std::memcpy(out.data_ptr<float>() + m * n, y + m * ldy, n * sizeof(float));
      else to_bf16(y + m * ldy, (uint16_t*)out.data_ptr() + m * n, n);
    }
  });
  return out;
}

// float32 [n, k] -> [ceil(n / 16), k, 16]: out[b][j][i] = w[16 b + i][j], zero past row n. Each block reads
// its 16 rows as 16 sequential streams and writes its 64-byte groups in order, so laying out a model runs at
// the memory's pace (torch's strided copy of the same permutation ran at a third of it)
static void block_float(const float* src, float* dst, int64_t n, int64_t k, int64_t nb) {
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::min<int64_t>(kBlock, n - b * kBlock);
      const float* r[kBlock];
      for (int i = 0; i < kBlock; ++i) r[i] = src + (b * kBlock + std::min<int64_t>(i, rows - 1)) * k;
      float* o = dst + b * k * kBlock;
      if (rows == kBlock) {
        for (int64_t j = 0; j < k; ++j)
          for (int i = 0; i < kBlock; ++i) o[j * kBlock + i] = r[i][j];
      } else {
        for (int64_t j = 0; j < k; ++j)
          for (int i = 0; i < kBlock; ++i) o[j * kBlock + i] = i < rows ? r[i][j] : 0.f;
      }
    }
  });
}

// bfloat16 [n, k] -> [ceil(n / 16), ceil(k / 2), 16, 2]: pairs of neighbouring k, zero past row n and column
// k; the same streams, a pair moved as one 32-bit word where the block is whole
static void block_bf16(const uint16_t* src, uint16_t* dst, int64_t n, int64_t k, int64_t nb) {
  const int64_t pairs = (k + 1) / 2;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t rows = std::min<int64_t>(kBlock, n - b * kBlock);
      const uint16_t* r[kBlock];
      for (int i = 0; i < kBlock; ++i) r[i] = src + (b * kBlock + std::min<int64_t>(i, rows - 1)) * k;
      uint16_t* o = dst + b * pairs * kBlock * 2;
      if (rows == kBlock && k % 2 == 0) {
        for (int64_t p = 0; p < pairs; ++p)
          for (int i = 0; i < kBlock; ++i) std::memcpy(o + (p * kBlock + i) * 2, r[i] + 2 * p, 4);
      } else {
        for (int64_t p = 0; p < pairs; ++p)
          for (int i = 0; i < kBlock; ++i)
            for (int t = 0; t < 2; ++t)
              o[(p * kBlock + i) * 2 + t] = i < rows && 2 * p + t < k ? r[i][2 * p + t] : uint16_t(0);
      }
    }
  });
}

// w [n, k] into out, of blip2.fast.kernels.blocked_shape(n, k, dtype): at the memory's pace
void block_weight_into(const at::Tensor& w, at::Tensor& out) {
  const auto dtype = w.scalar_type();
  TORCH_CHECK(w.device().is_cpu() && (dtype == at::kFloat || dtype == at::kBFloat16) && w.dim() == 2 &&
                  w.is_contiguous(),
              "block_weight_into: w must be a contiguous float32 or bfloat16 CPU matrix");
  const int64_t n = w.size(0), k = w.size(1), nb = (n + kBlock - 1) / kBlock;
  const bool bf16 = dtype == at::kBFloat16;
  const std::vector<int64_t> shape = bf16 ? std::vector<int64_t>{nb, (k + 1) / 2, kBlock, 2}
                                          : std::vector<int64_t>{nb, k, kBlock};
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == dtype && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef(shape),
              "block_weight_into: out must be a contiguous ", dtype, " ", at::IntArrayRef(shape), ", got ",
              out.sizes());
  if (bf16)
    block_bf16(reinterpret_cast<const uint16_t*>(w.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()), n,
               k, nb);
  else
    block_float(w.data_ptr<float>(), out.data_ptr<float>(), n, k, nb);
}

}  // namespace blocked

TORCH_LIBRARY_FRAGMENT(blip2_kernels, m) {
  python_module(m, 0);
  m.def("blocked_linear(Tensor x, Tensor w, Tensor? bias, int out_features) -> Tensor");
  m.def("block_weight_into(Tensor w, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(blip2_kernels, CPU, m) {
  m.impl("blocked_linear", &blocked::linear);
  m.impl("block_weight_into", &blocked::block_weight_into);
}
