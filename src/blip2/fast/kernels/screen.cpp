// Greedy decoding's next token, exactly, from a screen of the vocabulary in bfloat16.
//
// Greedy decoding needs only the argmax of the logits, yet the head reads the whole [V, K] fp32 matrix
// every token: a third of an OPT-125m step's weight bytes (its 50k x 768 head), and at 8 rows the same
// share of the multiply-adds. Here a bfloat16 copy of the head (half the bytes, and AVX-512 BF16 dot
// products at twice the rate) gives approximate logits a_j with a proven bound on their distance to the
// exact ones, |z_j - a_j| <= E_j. Every j whose interval [a_j - E_j, a_j + E_j] reaches the best lower
// bound max_i (a_i - E_i) is a candidate; the others are below the true maximum. The candidates (usually
// one or two) are then computed exactly, with the very code the full fp32 head runs (the same block of the
// blocked kernel, or the same row of the row kernel), so the token is the argmax of the exact logits, bit
// for bit, ties to the lowest id as torch.argmax. Rows whose inputs or screens are not finite, or whose
// candidates are many, compute the whole row exactly instead.
//
// The bound, for x (fp32) rounded to xb (bf16) and W_j rounded to Wb_j, with K products:
//   z_j - a_j = (x - xb) . W_j + xb . (W_j - Wb_j) + (rounding of the exact fp32 sum) - (rounding of a_j)
//   |.| <= |x - xb| |W_j| + |xb| |W_j - Wb_j| + g_K (|xb| |Wb_j| + |x| |W_j|),   g_K = K u / (1 - K u)
// (Cauchy-Schwarz for the first two; each sum of K terms in fp32 is within g_K of its exact value,
// u = 2^-24), widened by a relative margin (x 1.001), the roundings of the bias's addition and of the fp32
// evaluation of a_j +- E_j (16 u (|a_j| + |b_j|)), and an absolute margin for values the bf16 dot product
// flushes to zero (below 2^-126). |W_j| and |W_j - Wb_j| come
// rounded up from the caller, computed once in float64 (blip2.fast.kernels.screen_weight).
//
// Included by steps.cpp after row_product.cpp and blocked.cpp; needs AVX-512 BF16 for the screen.

#include <cmath>
#include <limits>
#include <vector>

namespace screen {

// the exact fp32 logit of columns [j0, j0 + 16) (blocked: the whole block) or of column j0 (dense) for one
// row x, as the full head computes them
struct Exact {
  const at::Tensor& w;
  const float* bias;         // [N] or null
  const float* padded_bias;  // blocked: [NB * 16] or null
  int64_t n, k;
  bool blocked;

  // z[0:16] for block b (blocked), the sums plus bias as blocked::sums stores them
  void block(const float* x, int64_t b, float* z) const {
    const int64_t steps = w.size(1), block_stride = steps * blocked::kBlock;
    blocked::tile<blocked::F32, 1, 1>(x, steps, w.data_ptr<float>() + b * block_stride, block_stride, 0, steps, z,
                                      blocked::kBlock, false, padded_bias ? padded_bias + b * blocked::kBlock : nullptr);
  }

  // column j (dense): row_product's sum of row j, then the bias as Step::finish adds it
  float column(const float* x, int64_t j) const {
    float s;
    stream_rows<F32, 1>(w.data_ptr<float>() + j * k, x, &s, k, 0, 0, 1);
    return bias ? s + bias[j] : s;
  }

  // every logit of row x into z [n]
  void all(const float* x, float* z) const {
    if (blocked) {
      const int64_t NB = w.size(0);
      std::vector<float> y(NB * blocked::kBlock);
      blocked::sums<blocked::F32>(x, 1, w.size(1), w.data_ptr<float>(), NB, y.data(), padded_bias);
      std::copy(y.begin(), y.begin() + n, z);
    } else {
      product<F32>(w.data_ptr<float>(), x, z, n, k);
      if (bias)
        for (int64_t j = 0; j < n; ++j) z[j] += bias[j];
    }
  }
};

// torch.argmax over z with the banned ids at -inf: the first NaN if any, else the first maximum
int64_t argmax(std::vector<float>& z, const std::vector<int64_t>& ban) {
  int64_t best = 0;
  for (const int64_t j : ban) z[j] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < (int64_t)z.size(); ++j) {
    if (std::isnan(z[j])) return j;
    if (z[j] > z[best]) best = j;
  }
  return best;
}

// x [R, K] fp32 (the head's input), screen: bfloat16 blocked [NB', ceil(K/2), 16, 2] of the head, norms
// [2, N] fp32 (|W_j|, |W_j - Wb_j|, rounded up), w: the exact head, fp32 blocked [NB, K, 16] or dense
// [N, K], bias [N] fp32 or none, banned: int64 ids never chosen (the logits processor's -inf).
// -> (tokens [R] int64, exact [R] int64: how many logits each row computed exactly, N for a whole row)
std::tuple<at::Tensor, at::Tensor> greedy_head(const at::Tensor& x, const at::Tensor& screen_w,
                                               const at::Tensor& norms, const at::Tensor& w,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& banned) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "greedy_head: x must be a contiguous float32 CPU [R, K], got ", x.scalar_type(), " ", x.sizes());
  const int64_t R = x.size(0), K = x.size(1);
  TORCH_CHECK(screen_w.device().is_cpu() && screen_w.is_contiguous() && screen_w.scalar_type() == at::kBFloat16 &&
              screen_w.dim() == 4 && screen_w.size(2) == blocked::kBlock && screen_w.size(3) == 2 &&
              screen_w.size(1) == (K + 1) / 2,
              "greedy_head: the screen must be a bfloat16 blocked weight [NB, ", (K + 1) / 2, ", 16, 2], got ",
              screen_w.scalar_type(), " ", screen_w.sizes());
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.scalar_type() == at::kFloat &&
              ((w.dim() == 3 && w.size(1) == K && w.size(2) == blocked::kBlock) || (w.dim() == 2 && w.size(1) == K)),
              "greedy_head: the head must be float32, blocked [NB, ", K, ", 16] or [N, ", K, "], got ",
              w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(norms.device().is_cpu() && norms.is_contiguous() && norms.scalar_type() == at::kFloat &&
              norms.dim() == 2 && norms.size(0) == 2, "greedy_head: norms must be float32 [2, N], got ",
              norms.scalar_type(), " ", norms.sizes());
  const int64_t N = norms.size(1);
  const bool is_blocked = w.dim() == 3;
  TORCH_CHECK(is_blocked ? (N > (w.size(0) - 1) * blocked::kBlock && N <= w.size(0) * blocked::kBlock) : N == w.size(0),
              "greedy_head: norms for ", N, " tokens, the head holds ", w.sizes());
  TORCH_CHECK(N > (screen_w.size(0) - 1) * blocked::kBlock && N <= screen_w.size(0) * blocked::kBlock,
              "greedy_head: a screen of ", screen_w.size(0), " blocks for ", N, " tokens");
  if (bias.has_value())
    TORCH_CHECK(bias->device().is_cpu() && bias->is_contiguous() && bias->scalar_type() == at::kFloat &&
                bias->numel() == N, "greedy_head: bias must be a contiguous float32 CPU [", N, "]");
  TORCH_CHECK(banned.device().is_cpu() && banned.scalar_type() == at::kLong && banned.dim() == 1,
              "greedy_head: banned must be an int64 CPU [n] of token ids");
  std::vector<int64_t> ban;  // a few ids (the eos ids until the minimum length)
  {
    const at::Tensor bc = banned.contiguous();
    for (int64_t i = 0; i < bc.numel(); ++i) {
      const int64_t id = bc.data_ptr<int64_t>()[i];
      TORCH_CHECK(id >= 0 && id < N, "greedy_head: banned id ", id, " outside the vocabulary of ", N);
      ban.push_back(id);
    }
  }
  at::Tensor tokens = at::empty({R}, x.options().dtype(at::kLong));
  at::Tensor exact = at::empty({R}, x.options().dtype(at::kLong));
  if (R == 0) return {tokens, exact};

  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  std::vector<float> pb;
  if (is_blocked && b) {
    pb.assign(w.size(0) * blocked::kBlock, 0.f);
    std::copy(b, b + N, pb.begin());
  }
  const Exact ex{w, b, pb.empty() ? nullptr : pb.data(), N, K, is_blocked};

  // the screen: approximate sums of every row at once
  const int64_t steps = screen_w.size(1), kp = 2 * steps, NBs = screen_w.size(0), lds = NBs * blocked::kBlock;
  const float* xf = x.data_ptr<float>();
  std::vector<uint16_t> xb(R * kp, 0);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < K; ++i) xb[r * kp + i] = at::BFloat16(xf[r * K + i]).x;
  std::vector<float> a(R * lds);
  blocked::sums<blocked::BF16>(xb.data(), R, steps, (const uint16_t*)screen_w.data_ptr(), NBs, a.data(), nullptr);

  const float* wn = norms.data_ptr<float>();
  const float* we = wn + N;
  // banned ids as cleared bits of 16-lane masks
  std::vector<__mmask16> allowed((N + 15) / 16);
  for (int64_t i = 0; i < (int64_t)allowed.size(); ++i) allowed[i] = simd::mask16(N - 16 * i);
  for (const int64_t j : ban) allowed[j / 16] &= (__mmask16)~(1u << (j % 16));
  const double u = std::ldexp(1.0, -24), g = K * u / (1.0 - K * u);
  const int64_t most = std::max<int64_t>(64, N / 64);  // more candidates than this: the whole row
  int64_t* tok = tokens.data_ptr<int64_t>();
  int64_t* cnt = exact.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> z;
    std::vector<int64_t> cand;
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xf + r * K;
      const float* ar = a.data() + r * lds;
      double dx = 0, xn = 0, xbn = 0;
      bool finite = true;  // a head with a non-finite weight has a non-finite screen sum: caught below
      const uint16_t* xbr = xb.data() + r * kp;  // x rounded to bf16 above
      for (int64_t i = 0; i < K; ++i) {
        const double v = xr[i], vb = static_cast<float>(c10::BFloat16(xbr[i], c10::BFloat16::from_bits()));
        finite &= std::isfinite(xr[i]);
        dx += (v - vb) * (v - vb), xn += v * v, xbn += vb * vb;
      }
      dx = std::sqrt(dx), xn = std::sqrt(xn), xbn = std::sqrt(xbn);
      // E_j = c_w |W_j| + c_e |W_j - Wb_j| + c_4 (|a_j| + |b_j|) + tiny (1 + |W_j|), in fp32: the factor
      // 1.001 and c_4 = 16 u (4 u needed for the bias's rounding) cover the rounding of E and of a +- E
      const __m512 cw = _mm512_set1_ps((float)(1.001 * (dx + g * (xbn + xn))));
      const __m512 ce = _mm512_set1_ps((float)(1.001 * (xbn + g * xbn)));
      const __m512 c4 = _mm512_set1_ps((float)(16 * u));
      const __m512 tiny = _mm512_set1_ps((float)(std::ldexp(1.0, -100) * (1.0 + xn) * (1.0 + std::sqrt((double)K))));
      const __m512 one = _mm512_set1_ps(1.f);
      // value and bound of lanes [j, j + 16) allowed by m
      const auto lane = [&](int64_t j, __mmask16 m, __m512& v, __m512& e) {
        const __m512 av = _mm512_maskz_loadu_ps(m, ar + j);
        const __m512 bv = b ? _mm512_maskz_loadu_ps(m, b + j) : _mm512_setzero_ps();
        const __m512 wnv = _mm512_maskz_loadu_ps(m, wn + j), wev = _mm512_maskz_loadu_ps(m, we + j);
        v = _mm512_add_ps(av, bv);
        e = _mm512_fmadd_ps(c4, _mm512_add_ps(_mm512_abs_ps(av), _mm512_abs_ps(bv)),
                            _mm512_fmadd_ps(tiny, _mm512_add_ps(one, wnv),
                                            _mm512_fmadd_ps(cw, wnv, _mm512_mul_ps(ce, wev))));
      };
      __m512 fl = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      __m512 nans = _mm512_setzero_ps();  // becomes NaN where a screen sum is not finite
      for (int64_t j = 0; j < N && finite; j += 16) {
        const __mmask16 m = allowed[j / 16];
        __m512 v, e;
        lane(j, m, v, e);
        nans = _mm512_add_ps(nans, _mm512_mul_ps(v, _mm512_setzero_ps()));
        fl = _mm512_mask_max_ps(fl, m, fl, _mm512_sub_ps(v, e));
      }
      const float floor = _mm512_reduce_max_ps(fl);
      finite &= !std::isnan(_mm512_reduce_add_ps(nans)) && std::isfinite(floor);
      cand.clear();
      const __m512 flv = _mm512_set1_ps(floor);
      for (int64_t j = 0; j < N && finite && (int64_t)cand.size() <= most; j += 16) {
        const __mmask16 m = allowed[j / 16];
        __m512 v, e;
        lane(j, m, v, e);
        for (uint32_t hit = _mm512_mask_cmp_ps_mask(m, _mm512_add_ps(v, e), flv, _CMP_GE_OQ); hit; hit &= hit - 1)
          cand.push_back(j + __builtin_ctz(hit));
      }
      if (!finite || cand.empty() || (int64_t)cand.size() > most) {
        z.resize(N);
        ex.all(xr, z.data());
        tok[r] = argmax(z, ban);
        cnt[r] = N;
        continue;
      }
      // the candidates exactly; ascending ids, so a block is computed once
      float blk[blocked::kBlock];
      int64_t have = -1, best = -1;
      float best_z = 0.f;
      bool nan = false;
      for (const int64_t j : cand) {
        float zj;
        if (is_blocked) {
          if (j / blocked::kBlock != have) {
            have = j / blocked::kBlock;
            ex.block(xr, have, blk);
          }
          zj = blk[j % blocked::kBlock];
        } else {
          zj = ex.column(xr, j);
        }
        if (std::isnan(zj)) { nan = true; break; }
        if (best < 0 || zj > best_z) best = j, best_z = zj;
      }
      if (nan || !std::isfinite(best_z)) {  // overflow in the exact sums: the whole row, as torch sees it
        z.resize(N);
        ex.all(xr, z.data());
        tok[r] = argmax(z, ban);
        cnt[r] = N;
        continue;
      }
      tok[r] = best;
      cnt[r] = (int64_t)cand.size();
    }
  });
  return {tokens, exact};
#else
  TORCH_CHECK(false, "greedy_head: needs AVX-512 BF16 (this build's CPU lacks it)");
#endif
}

}  // namespace screen

TORCH_LIBRARY_FRAGMENT(blip2_kernels, m) {
  python_module(m, 0);
  m.def("greedy_head(Tensor x, Tensor screen, Tensor norms, Tensor w, Tensor? bias, Tensor banned) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(blip2_kernels, CPU, m) { m.impl("greedy_head", &screen::greedy_head); }
