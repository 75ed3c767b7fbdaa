// One row times a weight matrix, streamed at near the memory bandwidth: y[n] = sum_k w[n, k] * x[k].
//
// Decoding one token at a time reads every weight once per token for a single row of activations, so a
// step is bound by how fast one core reads memory. Two things keep the reads fast here:
// - every output row's dot product keeps its own vector accumulators (two), so the fused multiply-adds do
//   not wait on each other: a single accumulator caps the stream at one vector per FMA latency;
// - kStreams rows far apart (one from each quarter of the matrix) are read at once: a core keeps more
//   memory requests in flight for several long sequential streams than for one (measured on an AMD EPYC,
//   one thread: 25 GB/s against 21 for one stream).
// Accumulation is in fp32, as a matmul does: bf16 pairs go through AVX-512 BF16 dot products where the
// CPU has them (the products of two bf16 are exact in fp32), else bf16 weights are widened to fp32; int8
// weights are widened and multiplied by their per-row scale after the sum. The result is rounded once to
// x's dtype, after scale and bias.
//
// Built by blip2.fast.kernels with -march=native on the machine that runs it; needs AVX-512 F and BW, or
// AVX2 and FMA (simd.h).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using simd::V16;

constexpr int kStreams = 4;
// vector accumulators per row: two keep the multiply-adds of a row independent; with AVX2 a V16 is
// already two registers, and 4 streams x 2 x 2 would spill the 16 of them
constexpr int kAcc = BLIP2_AVX512 ? 2 : 1;
constexpr int64_t kTaskBytes = 256 * 1024;  // the least weight one thread's task reads

// Each kind of weight: X is what x is handed in as, kStep the elements one multiply-add covers, and
// mac(acc, w, x, mask) accumulates w[0:kStep] * x[0:kStep] (masked: the first `left` of them).
struct F32 {
  using W = float;
  using X = float;
  static constexpr int kStep = 16;
  static inline V16 mac(V16 acc, const W* w, const X* x) { return simd::fmadd(simd::load(w), simd::load(x), acc); }
  static inline V16 mac(V16 acc, const W* w, const X* x, int64_t left) {
    return simd::fmadd(simd::load(w, left), simd::load(x, left), acc);
  }
};

// bf16 weights, x in fp32: each bf16 widened exactly to fp32 (CPUs without AVX-512 BF16)
struct BF16Widen {
  using W = uint16_t;
  using X = float;
  static constexpr int kStep = 16;
  static inline V16 mac(V16 acc, const W* w, const X* x) {
    return simd::fmadd(simd::load_bf16(w), simd::load(x), acc);
  }
  static inline V16 mac(V16 acc, const W* w, const X* x, int64_t left) {
    return simd::fmadd(simd::load_bf16(w, left), simd::load(x, left), acc);
  }
};

#if defined(__AVX512BF16__)
// bf16 weights and x: AVX-512 BF16 dot products of pairs, accumulated in fp32
struct BF16Dot {
  using W = uint16_t;
  using X = uint16_t;
  static constexpr int kStep = 32;
  static inline __m512 mac(__m512 acc, const W* w, const X* x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
  }
  static inline __m512 mac(__m512 acc, const W* w, const X* x, int64_t left) {
    __mmask32 m = simd::mask32(left);
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, w), (__m512bh)_mm512_maskz_loadu_epi16(m, x));
  }
};
#endif

// int8 weights, x in fp32: widened to fp32 (exact), the per-row scale applied after the sum
struct Int8 {
  using W = int8_t;
  using X = float;
  static constexpr int kStep = 16;
  static inline V16 mac(V16 acc, const W* w, const X* x) { return simd::fmadd(simd::load_i8(w), simd::load(x), acc); }
  static inline V16 mac(V16 acc, const W* w, const X* x, int64_t left) {
    return simd::fmadd(simd::load_i8(w, left), simd::load(x, left), acc);
  }
};

// rows i in [begin, end) of each of S streams: stream s holds rows s * stride + i. Writes the sums to y.
template <class K, int S>
void stream_rows(const typename K::W* w, const typename K::X* x, float* y, int64_t cols, int64_t stride,
                 int64_t begin, int64_t end) {
  constexpr int step = K::kStep;
  for (int64_t i = begin; i < end; ++i) {
    const typename K::W* row[S];
    V16 acc[S][kAcc];
    for (int s = 0; s < S; ++s) {
      row[s] = w + (s * stride + i) * cols;
      for (int a = 0; a < kAcc; ++a) acc[s][a] = simd::zero();
    }
    int64_t k = 0;
    for (; k + kAcc * step <= cols; k += kAcc * step) {
      for (int s = 0; s < S; ++s)
        for (int a = 0; a < kAcc; ++a) acc[s][a] = K::mac(acc[s][a], row[s] + k + a * step, x + k + a * step);
    }
    for (; k < cols; k += step) {
      for (int s = 0; s < S; ++s) acc[s][0] = K::mac(acc[s][0], row[s] + k, x + k, cols - k);
    }
    for (int s = 0; s < S; ++s) {
      V16 total = acc[s][0];
      for (int a = 1; a < kAcc; ++a) total = simd::add(total, acc[s][a]);
      y[s * stride + i] = simd::reduce_add(total);
    }
  }
}

template <class K>
void product(const typename K::W* w, const typename K::X* x, float* y, int64_t rows, int64_t cols) {
  const int64_t stride = rows / kStreams;
  const int64_t row_bytes = cols * (int64_t)sizeof(typename K::W);
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / (kStreams * row_bytes));
  at::parallel_for(0, stride, grain, [&](int64_t begin, int64_t end) {
    stream_rows<K, kStreams>(w, x, y, cols, stride, begin, end);
  });
  const int64_t done = stride * kStreams;  // the rows left over: one stream
  stream_rows<K, 1>(w + done * cols, x, y + done, cols, 0, 0, rows - done);
}

// a [N] scale or bias, float32 or bfloat16, read as fp32
struct Vector {
  const float* f32 = nullptr;
  const at::BFloat16* bf16 = nullptr;
  Vector() = default;
  explicit Vector(const std::optional<at::Tensor>& t) {
    if (!t.has_value()) return;
    if (t->scalar_type() == at::kFloat) f32 = t->data_ptr<float>();
    else bf16 = t->data_ptr<at::BFloat16>();
  }
  bool present() const { return f32 != nullptr || bf16 != nullptr; }
  float operator[](int64_t n) const { return f32 ? f32[n] : static_cast<float>(bf16[n]); }
};

// The fp32 sums y[n] = sum_k w[n, k] * x[k] of a contiguous CPU weight [N, K] (float32, bfloat16 or int8),
// x handed in as fp32 (xf) and, for bf16 weights on CPUs with AVX-512 BF16, as bf16 (xb): the same values.
void sums(const at::Tensor& w, const float* xf, const uint16_t* xb, float* y) {
  const int64_t rows = w.size(0), cols = w.size(1);
  const auto wt = w.scalar_type();
  if (wt == at::kFloat) {
    product<F32>(w.data_ptr<float>(), xf, y, rows, cols);
  } else if (wt == at::kChar) {
    product<Int8>(w.data_ptr<int8_t>(), xf, y, rows, cols);
  } else {
#if defined(__AVX512BF16__)
    product<BF16Dot>((const uint16_t*)w.data_ptr(), xb, y, rows, cols);
#else
    product<BF16Widen>((const uint16_t*)w.data_ptr(), xf, y, rows, cols);
#endif
  }
}

at::Tensor row_product(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "row_product: w must be a contiguous CPU [N, K]");
  const int64_t rows = w.size(0), cols = w.size(1);
  TORCH_CHECK(x.device().is_cpu() && x.numel() == cols && x.dim() >= 1 && x.size(-1) == cols,
              "row_product: x must hold one row of ", cols, " on the CPU, got ", x.sizes());
  const auto xt = x.scalar_type(), wt = w.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16, "row_product: x must be float32 or bfloat16, got ", xt);
  TORCH_CHECK((wt == at::kFloat && xt == at::kFloat) || (wt == at::kBFloat16 && xt == at::kBFloat16) || wt == at::kChar,
              "row_product: unsupported weight ", wt, " for x ", xt);
  TORCH_CHECK(wt != at::kChar || scale.has_value(), "row_product: int8 weights need a scale");
  for (const auto* t : {&scale, &bias}) {
    TORCH_CHECK(!t->has_value() || ((*t)->numel() == rows && (*t)->is_contiguous() && (*t)->device().is_cpu() &&
                                    ((*t)->scalar_type() == at::kFloat || (*t)->scalar_type() == at::kBFloat16)),
                "row_product: scale and bias must be contiguous float32/bfloat16 CPU tensors of ", rows);
  }
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = rows;
  at::Tensor out = at::empty(shape, x.options());
  // the fp32 sums: straight into a float32 output, else a buffer kept per thread (no allocation per call)
  thread_local std::vector<float> buffer;
  float* y;
  if (xt == at::kFloat) {
    y = out.data_ptr<float>();
  } else {
    if ((int64_t)buffer.size() < rows) buffer.resize(rows);
    y = buffer.data();
  }
  const at::Tensor xc = x.contiguous();
  const bool bf16_dot = wt == at::kBFloat16 && xt == at::kBFloat16
#if defined(__AVX512BF16__)
      ;
#else
      && false;
#endif
  const at::Tensor xf = bf16_dot ? at::Tensor() : xc.to(at::kFloat);
  sums(w, bf16_dot ? nullptr : xf.data_ptr<float>(), bf16_dot ? (const uint16_t*)xc.data_ptr() : nullptr, y);
  // scale, bias, and one rounding to x's dtype
  const Vector s(scale), b(bias);
  at::BFloat16* out16 = xt == at::kBFloat16 ? out.data_ptr<at::BFloat16>() : nullptr;
  for (int64_t n = 0; n < rows; ++n) {
    float v = y[n];
    if (s.present()) v *= s[n];
    if (b.present()) v += b[n];
    if (out16) out16[n] = at::BFloat16(v);
    else y[n] = v;
  }
  return out;
}

}  // namespace

// The ops' shapes for torch.compile (fake implementations) are registered from Python, by blip2.fast.kernels; each
// library block names that module before its definitions (torch 2.3 requires it: impl_abstract_pystub, called
// set_python_module from torch 2.4 on).
template <class L>
auto python_module(L& m, int) -> decltype(m.set_python_module("")) { return m.set_python_module("blip2.fast.kernels"); }
template <class L>
L& python_module(L& m, long) { return m.impl_abstract_pystub("blip2.fast.kernels"); }

TORCH_LIBRARY(blip2_kernels, m) {
  python_module(m, 0);
  m.def("row_product(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(blip2_kernels, CPU, m) { m.impl("row_product", &row_product); }
