// Sixteen fp32 lanes, whatever the CPU's vectors: the one type the kernels compute with.
//
// The kernels were written for AVX-512 (a 16-lane register), and their layouts follow from it: the
// blocked weights hold 16 output columns per k (blocked.cpp), the screen's masks are 16 bits. Many x86-64
// CPUs (AMD before Zen 4, Intel client parts) stop at AVX2 + FMA; there a V16 is two 8-lane halves, so the
// same layouts, loops and sums work unchanged. With AVX-512 F and BW every function below is the single
// intrinsic the kernels called before, so that build keeps its code paths; AVX-512 BF16 code stays
// written in __m512 (V16 is __m512 there).
//
// Sums keep one order on both: a lane accumulates the same terms in the same order, and reduce_add /
// reduce_max combine the 16 lanes as GCC's _mm512_reduce_add_ps does (the upper 8 onto the lower 8, then
// 4, 2, 1), so both builds give the same bits wherever the lanes hold the same values.
//
// Tails ("left" of 16 lanes) load zeros beyond the end and never read past it: AVX2 has no masked load of
// 16- or 8-bit elements, so those go through a zeroed copy.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define BLIP2_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define BLIP2_AVX512 0
#else
#error "the blip2 kernels need AVX-512 F and BW, or AVX2 and FMA"
#endif

namespace simd {

#if BLIP2_AVX512

using V16 = __m512;

inline __mmask16 mask16(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }
inline __mmask32 mask32(int64_t left) { return left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1ull << left) - 1); }

inline V16 zero() { return _mm512_setzero_ps(); }
inline V16 set1(float v) { return _mm512_set1_ps(v); }
inline V16 load(const float* p) { return _mm512_loadu_ps(p); }
inline V16 load(const float* p, int64_t left) { return _mm512_maskz_loadu_ps(mask16(left), p); }
inline void store(float* p, V16 v) { _mm512_storeu_ps(p, v); }
inline void store(float* p, V16 v, int64_t left) { _mm512_mask_storeu_ps(p, mask16(left), v); }

inline V16 widen_bf16(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
inline V16 load_bf16(const uint16_t* p) { return widen_bf16(_mm256_loadu_si256((const __m256i*)p)); }
inline V16 load_bf16(const uint16_t* p, int64_t left) { return widen_bf16(_mm256_maskz_loadu_epi16(mask16(left), p)); }
inline V16 load_i8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline V16 load_i8(const int8_t* p, int64_t left) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask16(left), p)));
}

inline V16 fmadd(V16 a, V16 b, V16 c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c, one rounding
inline V16 add(V16 a, V16 b) { return _mm512_add_ps(a, b); }
inline V16 sub(V16 a, V16 b) { return _mm512_sub_ps(a, b); }
inline V16 mul(V16 a, V16 b) { return _mm512_mul_ps(a, b); }
inline float reduce_add(V16 v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(V16 v) { return _mm512_reduce_max_ps(v); }

// torch's vectorized tanh (SLEEF, exported by libtorch_cpu), the one its kernels call on this CPU
extern "C" __m512 Sleef_tanhf16_u10(__m512);
inline V16 tanh(V16 v) { return Sleef_tanhf16_u10(v); }

#else

struct V16 {
  __m256 lo, hi;  // lanes 0-7, 8-15
};

// the first n of 8 lanes all ones, the rest zero (n clamped to [0, 8]): kPrefix + 16 - n
alignas(64) inline constexpr int32_t kPrefix[32] = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1};
inline __m256i prefix8(int64_t n) {
  return _mm256_loadu_si256((const __m256i*)(kPrefix + 16 - std::clamp<int64_t>(n, 0, 8)));
}

inline V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V16 load(const float* p, int64_t left) {
  if (left >= 16) return load(p);
  return {_mm256_maskload_ps(p, prefix8(left)), _mm256_maskload_ps(p + 8, prefix8(left - 8))};
}
inline void store(float* p, V16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline void store(float* p, V16 v, int64_t left) {
  if (left >= 16) return store(p, v);
  _mm256_maskstore_ps(p, prefix8(left), v.lo);
  _mm256_maskstore_ps(p + 8, prefix8(left - 8), v.hi);
}

inline __m256 widen_bf16(__m128i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)); }
inline V16 load_bf16(const uint16_t* p) {
  return {widen_bf16(_mm_loadu_si128((const __m128i*)p)), widen_bf16(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
inline V16 load_bf16(const uint16_t* p, int64_t left) {
  if (left >= 16) return load_bf16(p);
  alignas(32) uint16_t tail[16] = {};
  std::memcpy(tail, p, std::max<int64_t>(left, 0) * sizeof(uint16_t));
  return load_bf16(tail);
}
inline __m256 widen_i8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
inline V16 load_i8(const int8_t* p) {
  return {widen_i8(_mm_loadl_epi64((const __m128i*)p)), widen_i8(_mm_loadl_epi64((const __m128i*)(p + 8)))};
}
inline V16 load_i8(const int8_t* p, int64_t left) {
  if (left >= 16) return load_i8(p);
  alignas(16) int8_t tail[16] = {};
  std::memcpy(tail, p, std::max<int64_t>(left, 0));
  return load_i8(tail);
}

inline V16 fmadd(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V16 add(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 sub(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 mul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }

// _mm512_reduce_add_ps's tree: lanes i + 8 onto i, then 4, 2, 1
inline float reduce_add(V16 v) {
  const __m256 t8 = _mm256_add_ps(v.hi, v.lo);
  const __m128 t4 = _mm_add_ps(_mm256_extractf128_ps(t8, 1), _mm256_castps256_ps128(t8));
  const __m128 t2 = _mm_add_ps(t4, _mm_shuffle_ps(t4, t4, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t2) + _mm_cvtss_f32(_mm_shuffle_ps(t2, t2, _MM_SHUFFLE(0, 1, 0, 1)));
}
inline float reduce_max(V16 v) {
  const __m256 t8 = _mm256_max_ps(v.hi, v.lo);
  const __m128 t4 = _mm_max_ps(_mm256_extractf128_ps(t8, 1), _mm256_castps256_ps128(t8));
  const __m128 t2 = _mm_max_ps(t4, _mm_shuffle_ps(t4, t4, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ps(t2, _mm_shuffle_ps(t2, t2, _MM_SHUFFLE(0, 1, 0, 1))));  // maxps's NaN rule
}

// torch's vectorized tanh (SLEEF, exported by libtorch_cpu): the 8-lane entry, which picks the AVX2 code
// on this CPU as torch's own kernels do
extern "C" __m256 Sleef_tanhf8_u10(__m256);
inline V16 tanh(V16 v) { return {Sleef_tanhf8_u10(v.lo), Sleef_tanhf8_u10(v.hi)}; }

#endif

}  // namespace simd
