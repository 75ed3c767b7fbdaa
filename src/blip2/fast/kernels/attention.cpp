// Many queries attending over the same keys, no mask: a vision encoder's self-attention (ViT-g: 257 tokens,
// 16 heads of 88), in bfloat16.
//
// torch's CPU attention (the flash kernel) runs these shapes at about a quarter of the rate its matrix products
// reach (blip2-opt-2.7b's ViT-g, 8 images, on a 2-core AMD EPYC with AVX-512 BF16: 118 GFLOP/s against 390),
// a tenth of the encoder's time. Here each (image, head) is two products through the blocked kernel
// (blocked.cpp), which runs them near the machine's bf16 rate: the keys laid out as a blocked weight, the
// scores summed in fp32 (sums<BF16>), scaled and exponentiated in fp32 with the row's maximum subtracted,
// the numerators rounded to bf16 (as torch's kernel rounds them for its second product) and multiplied by
// the values laid out the same way, then divided by the fp32 sums of the numerators and rounded once.
//
// Included by steps.cpp (one translation unit), after blocked.cpp; needs AVX-512 BF16.

#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace attention {

#if defined(__AVX512BF16__)
extern "C" __m512 Sleef_expf16_u10(__m512);  // torch's vectorized exp (SLEEF, exported by libtorch_cpu)

// rows [L, D] of one (image, head) of a [B, H, L, D] bf16 tensor (last dimension contiguous) into dst
// [L, dp * 2] contiguous, a zero after an odd D (the blocked kernel takes k in pairs)
static void gather(const at::Tensor& t, int64_t b, int64_t h, uint16_t* dst, int64_t dp) {
  const auto* base = reinterpret_cast<const uint16_t*>(t.data_ptr()) + b * t.stride(0) + h * t.stride(1);
  const int64_t L = t.size(2), D = t.size(3), ls = t.stride(2);
  for (int64_t i = 0; i < L; ++i) {
    std::memcpy(dst + i * 2 * dp, base + i * ls, D * sizeof(uint16_t));
    if (D % 2) dst[i * 2 * dp + D] = 0;
  }
}

// values transposed: dst [D, lp * 2], dst[d][j] = v[j][d], a zero after an odd L
static void gather_transposed(const at::Tensor& t, int64_t b, int64_t h, uint16_t* dst, int64_t lp) {
  const auto* base = reinterpret_cast<const uint16_t*>(t.data_ptr()) + b * t.stride(0) + h * t.stride(1);
  const int64_t L = t.size(2), D = t.size(3), ls = t.stride(2);
  for (int64_t j = 0; j < L; ++j)
    for (int64_t d = 0; d < D; ++d) dst[d * 2 * lp + j] = base[j * ls + d];
  if (L % 2)
    for (int64_t d = 0; d < D; ++d) dst[d * 2 * lp + L] = 0;
}

// one row of scores (width W >= L, the columns from L on padding) -> bf16 numerators exp(s * scale - max)
// into p (2 * lp of them, zero past L); returns their fp32 sum
static float numerators(float* s, int64_t L, int64_t W, float scale, uint16_t* p, int64_t lp) {
  for (int64_t j = L; j < W; ++j) s[j] = -std::numeric_limits<float>::infinity();
  const __m512 vs = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < W; c += 16) {
    const __m512 z = _mm512_mul_ps(_mm512_loadu_ps(s + c), vs);
    _mm512_storeu_ps(s + c, z);
    vmax = _mm512_max_ps(vmax, z);
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t c = 0; c < W; c += 16) {
    const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(s + c), m));
    vsum = _mm512_add_ps(vsum, e);
    const int64_t n = std::min<int64_t>(16, 2 * lp - c);  // the row of p ends at 2 * lp
    if (n > 0) {
      const __m256i r = (__m256i)_mm512_cvtneps_pbh(e);  // round to nearest even, as at::BFloat16
      _mm256_mask_storeu_epi16(p + c, (__mmask16)((1u << n) - 1u), r);
    }
  }
  return _mm512_reduce_add_ps(vsum);
}
#endif

// q, k, v [B, H, L, D] bfloat16 (any strides but a contiguous last dimension: views of a fused qkv) ->
// [B, L, H * D], softmax(q k^T * scale) v per image and head, the heads side by side (the projection's input)
at::Tensor many_query(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(blocked::bf16_dot(), "many_query_attention: needs AVX-512 BF16");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "many_query_attention: q, k and v must be [B, H, L, D] of one shape, got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->stride(3) == 1,
                "many_query_attention: q, k and v must be bfloat16 CPU tensors with a contiguous last dimension");
  TORCH_CHECK(scale > 0, "many_query_attention: scale must be positive, got ", scale);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, L, H * D}, q.options());
  if (out.numel() == 0) return out;
#if defined(__AVX512BF16__)
  using blocked::kBlock;
  const int64_t dp = (D + 1) / 2, lp = (L + 1) / 2;  // pairs along the two products' k
  const int64_t nbk = (L + kBlock - 1) / kBlock, nbv = (D + kBlock - 1) / kBlock;
  auto* o16 = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> rows(L * 2 * dp), kb(nbk * dp * kBlock * 2), vt(D * 2 * lp), vb(nbv * lp * kBlock * 2);
    std::vector<uint16_t> p(L * 2 * lp);
    std::vector<float> s(L * nbk * kBlock), o(L * nbv * kBlock), total(L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H;
      gather(k, b, h, rows.data(), dp);
      blocked::block_bf16(rows.data(), kb.data(), L, 2 * dp, nbk);
      gather(q, b, h, rows.data(), dp);
      blocked::sums<blocked::BF16>(rows.data(), L, dp, kb.data(), nbk, s.data());  // [L, nbk * 16]
      for (int64_t i = 0; i < L; ++i)
        total[i] = numerators(s.data() + i * nbk * kBlock, L, nbk * kBlock, (float)scale, p.data() + i * 2 * lp, lp);
      gather_transposed(v, b, h, vt.data(), lp);
      blocked::block_bf16(vt.data(), vb.data(), D, 2 * lp, nbv);
      blocked::sums<blocked::BF16>(p.data(), L, lp, vb.data(), nbv, o.data());  // [L, nbv * 16]
      for (int64_t i = 0; i < L; ++i) {
        uint16_t* dst = o16 + (b * L + i) * H * D + h * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = at::BFloat16(o[i * nbv * kBlock + d] / total[i]).x;
      }
    }
  });
#endif
  return out;
}

}  // namespace attention

TORCH_LIBRARY_FRAGMENT(blip2_kernels, m) {
  python_module(m, 0);
  m.def("many_query_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(blip2_kernels, CPU, m) { m.impl("many_query_attention", &attention::many_query); }
