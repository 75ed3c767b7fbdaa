// The pieces both decoding steps (steps.cpp) are made of: float views of float32/bfloat16 tensors, a linear
// layer's product for R rows with the eager rounding (Step), T5's RMS norm and LayerNorm, one-query
// attention over a cache (attend), writing the cache, and the activations.
//
// Included by steps.cpp after row_product.cpp and blocked.cpp, whose product kernels it calls.

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>

namespace {

// A float32 or bfloat16 tensor's elements read (and written) as float.
struct View {
  float* f = nullptr;
  at::BFloat16* h = nullptr;
  View() = default;
  explicit View(const at::Tensor& t) {
    if (!t.defined()) return;
    TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16),
                "decode step: expected a float32 or bfloat16 CPU tensor, got ", t.scalar_type(), " on ", t.device());
    if (t.scalar_type() == at::kFloat) f = t.data_ptr<float>();
    else h = t.data_ptr<at::BFloat16>();
  }
  bool present() const { return f != nullptr || h != nullptr; }
  float operator[](int64_t i) const { return f ? f[i] : static_cast<float>(h[i]); }
  void set(int64_t i, float v) const {
    if (f) f[i] = v;
    else h[i] = at::BFloat16(v);
  }
};

// A linear layer: its weight, scale [N] (int8) and bias [N], both optional (the slots <name>.weight, .scale
// and .bias of a step's weight list, read by Call::linear in slots.cpp). The weight is plain [N, K] (float
// or int8) or blocked (blocked.cpp: float32 [NB, K, 16], bfloat16 [NB, K/2, 16, 2]), whose bias must be
// there (zeros where the layer has none): it gives the output count.
struct Linear {
  at::Tensor w;
  Vector scale, bias;
  int64_t n = 0, k = 0;
  bool present = false;
  bool blocked = false;
};

struct Step {
  bool bf16;  // activations are bfloat16 (else float32)
  std::vector<uint16_t> xb;
  std::vector<float> sums_buf, bias_buf, part_buf;

  explicit Step(bool bf16) : bf16(bf16) {}

  float round(float v) const { return bf16 ? static_cast<float>(at::BFloat16(v)) : v; }

  // y[r, 0:N] = round(x[r] @ W.T * scale + bias) for rows r < R; x [R, K] (already rounded to the
  // activation dtype) and y [R, N] contiguous
  void linear(const Linear& l, const float* x, int64_t R, float* y) {
    if (l.blocked) {  // the bias is added in the kernel (a blocked weight has no scale)
      const int64_t NB = l.w.size(0), steps = l.w.size(1), ld = NB * blocked::kBlock;
      const float* bias = blocked::padded_bias(l.bias, l.n, ld, bias_buf);
      const bool direct = !bf16 && ld == l.n;  // fp32 sums straight into y
      if (!direct) sums_buf.resize(R * ld);
      float* into = direct ? y : sums_buf.data();
      if (l.w.scalar_type() == at::kFloat) {
        blocked::sums<blocked::F32>(x, R, steps, l.w.data_ptr<float>(), NB, into, bias);
      } else {
#if defined(__AVX512BF16__)
        const int64_t kp = 2 * steps;  // K rounded up to whole pairs, the last one padded with a zero
        xb.assign(R * kp, 0);
        for (int64_t r = 0; r < R; ++r)
          for (int64_t i = 0; i < l.k; ++i) xb[r * kp + i] = at::BFloat16(x[r * l.k + i]).x;  // exact: bf16-valued
        blocked::sums<blocked::BF16>(xb.data(), R, steps, (const uint16_t*)l.w.data_ptr(), NB, into, bias);
#endif
      }
      if (direct) return;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < l.n; ++i) y[r * l.n + i] = round(sums_buf[r * ld + i]);
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * l.k;
      const uint16_t* x16 = nullptr;
#if defined(__AVX512BF16__)
      if (l.w.scalar_type() == at::kBFloat16) {
        xb.resize(l.k);
        for (int64_t i = 0; i < l.k; ++i) xb[i] = at::BFloat16(xr[i]).x;  // exact: x is bf16-valued
        x16 = xb.data();
      }
#endif
      sums(l.w, xr, x16, y + r * l.n);
      finish(l, y + r * l.n, y + r * l.n);
    }
  }

  // Layers that read the same input, their outputs side by side in y [R, sum of their N] (absent ones
  // skipped): q, k and v (T5's wi_0 and wi_1) as a checkpoint holds them, where fusing them into one weight
  // would copy it. Each output is the one its own layer gives.
  void linear(std::initializer_list<const Linear*> parts, const float* x, int64_t R, float* y) {
    int64_t n = 0;
    for (const Linear* p : parts) n += p->present ? p->n : 0;
    int64_t at = 0;
    for (const Linear* p : parts) {
      if (!p->present) continue;
      if (R == 1 || p->n == n) {
        linear(*p, x, R, y + at);
      } else {
        part_buf.resize(R * p->n);
        linear(*p, x, R, part_buf.data());
        for (int64_t r = 0; r < R; ++r) std::copy_n(part_buf.data() + r * p->n, p->n, y + r * n + at);
      }
      at += p->n;
    }
  }

  // scale, bias and one rounding: y[i] = round(sums[i] * scale[i] + bias[i])
  void finish(const Linear& l, const float* sums, float* y) const {
    for (int64_t i = 0; i < l.n; ++i) {
      float v = sums[i];
      if (l.scale.present()) v *= l.scale[i];
      if (l.bias.present()) v += l.bias[i];
      y[i] = round(v);
    }
  }

  // T5's RMS norm: mean square in fp32, x * rsqrt(ms + eps) rounded to the dtype, then times the weight
  void rms_norm(const float* x, const View& w, int64_t d, float eps, float* y) const {
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / d + eps);
    for (int64_t i = 0; i < d; ++i) y[i] = round(w[i] * round(x[i] * r));
  }

  // LayerNorm: mean and biased variance in fp32, one rounding after the affine part
  void layer_norm(const float* x, const View& w, const View& b, int64_t d, float eps, float* y) const {
    float mean = 0.f;
    for (int64_t i = 0; i < d; ++i) mean += x[i];
    mean /= d;
    float var = 0.f;
    for (int64_t i = 0; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / std::sqrt(var / d + eps);
    for (int64_t i = 0; i < d; ++i) {
      float v = (x[i] - mean) * r;
      if (w.present()) v *= w[i];
      if (b.present()) v += b[i];
      y[i] = round(v);
    }
  }
};

// 16 floats from p (the first `left` of them when fewer): float32 as is, bfloat16 widened exactly
inline simd::V16 load16(const float* p, int64_t left) { return simd::load(p, left); }
inline simd::V16 load16(const at::BFloat16* p, int64_t left) {
  return simd::load_bf16(reinterpret_cast<const uint16_t*>(p), left);
}

template <class E>
inline float dot(const float* q, const E* k, int64_t n) {
  simd::V16 acc = simd::zero();
  for (int64_t i = 0; i < n; i += 16) acc = simd::fmadd(load16(q + i, n - i), load16(k + i, n - i), acc);
  return simd::reduce_add(acc);
}

// o[0:n] += w * v[0:n]
template <class E>
inline void axpy(float w, const E* v, float* o, int64_t n) {
  const simd::V16 wv = simd::set1(w);
  for (int64_t i = 0; i < n; i += 16)
    simd::store(o + i, simd::fmadd(wv, load16(v + i, n - i), simd::load(o + i, n - i)), n - i);
}

// Keys or values of one layer, [R, H, S, Dh] (any strides, the last one 1), of float32 or bfloat16.
struct Heads {
  const at::Tensor& t;
  void* base = nullptr;  // the data pointer, read once (data_ptr() checks the tensor on every call)
  bool half = false;
  int64_t sb, sh, ss;
  Heads(const at::Tensor& t, int64_t rows, const char* what) : t(t) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == rows && t.stride(3) == 1 && t.device().is_cpu() &&
                (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16), "decode step: ", what,
                " must be float32/bfloat16 CPU [", rows, ", H, S, Dh] with unit last stride, got ", t.scalar_type(),
                " ", t.sizes(), " strides ", t.strides());
    sb = t.stride(0), sh = t.stride(1), ss = t.stride(2);
    base = t.data_ptr();
    half = t.scalar_type() == at::kBFloat16;
  }
  bool bf16() const { return half; }
  template <class E>
  E* at(int64_t b, int64_t h, int64_t s) const { return static_cast<E*>(base) + b * sb + h * sh + s * ss; }
};

// One query per head of row b attends over S keys: out[h, :] = softmax(q . k_j * scale + mask_j) @ v, in
// fp32. mask(h, j) returns the additive mask (-inf drops the key); keys whose mask is -inf, or the
// dtype's lowest value, are skipped (their weight is exactly 0) unless every key is.
template <class E, class Mask>
void attend_head(const float* qh, const Heads& k, const Heads& v, int64_t b, int64_t h, int64_t dh, int64_t S,
                 const Mask& mask, float* oh, std::vector<float>& p, const Step& st) {
  p.resize(S);
  float best = -std::numeric_limits<float>::infinity();
  bool any = false;
  for (int64_t j = 0; j < S; ++j) {
    const float m = mask(h, j);
    if (m == -std::numeric_limits<float>::infinity() || m <= -3.3e38f) {
      p[j] = std::numeric_limits<float>::quiet_NaN();  // marks a skipped key
      continue;
    }
    any = true;
    p[j] = dot(qh, k.at<E>(b, h, j), dh) + m;
    best = std::max(best, p[j]);
  }
  if (!any) {  // every key masked: softmax over the masked scores, as the reference does
    for (int64_t j = 0; j < S; ++j) {
      p[j] = dot(qh, k.at<E>(b, h, j), dh) + mask(h, j);
      best = std::max(best, p[j]);
    }
  }
  float total = 0.f;
  for (int64_t j = 0; j < S; ++j) {
    if (std::isnan(p[j]) && any) { p[j] = 0.f; continue; }
    p[j] = std::exp(p[j] - best);
    total += p[j];
  }
  for (int64_t d = 0; d < dh; ++d) oh[d] = 0.f;
  for (int64_t j = 0; j < S; ++j) {
    if (p[j] != 0.f) axpy(p[j] / total, v.at<E>(b, h, j), oh, dh);
  }
  for (int64_t d = 0; d < dh; ++d) oh[d] = st.round(oh[d]);
}

// Every row's query (q: row r at q + r * q_stride, heads side by side) attends over its own keys and
// values; out [R, heads * dh]. mask(r, h, j) as in attend_head. Rows and heads are split over threads.
template <class Mask>
void attend(const float* q, int64_t q_stride, const Heads& k, const Heads& v, int64_t R, int64_t heads, int64_t dh,
            int64_t S, const Mask& mask, float* out, const Step& st) {
  TORCH_CHECK(k.t.scalar_type() == v.t.scalar_type(), "decode step: keys and values of different dtypes");
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, S * dh));
  at::parallel_for(0, R * heads, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / heads, h = i % heads;
      const auto m = [&](int64_t hh, int64_t j) { return mask(r, hh, j); };
      const float* qh = q + r * q_stride + h * dh;
      float* oh = out + r * heads * dh + h * dh;
      if (k.bf16()) attend_head<at::BFloat16>(qh, k, v, r, h, dh, S, m, oh, p, st);
      else attend_head<float>(qh, k, v, r, h, dh, S, m, oh, p, st);
    }
  });
}

// the R rows' keys or values (row r at x + r * x_stride, heads side by side) into cache slot pos[r]
void write_cache(const Heads& c, int64_t R, const int64_t* pos, const float* x, int64_t x_stride, int64_t heads,
                 int64_t dh) {
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < c.t.size(2), "decode step: cache slot ", pos[r], " outside [0, ",
                c.t.size(2), ")");
  for (int64_t r = 0; r < R; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      const float* src = x + r * x_stride + h * dh;
      if (c.bf16()) {
        at::BFloat16* dst = c.at<at::BFloat16>(r, h, pos[r]);
        for (int64_t d = 0; d < dh; ++d) dst[d] = at::BFloat16(src[d]);
      } else {
        std::copy(src, src + dh, c.at<float>(r, h, pos[r]));
      }
    }
}

// rows [R, n] of v as a new float32 tensor (the head's input, for blip2_kernels::greedy_head)
at::Tensor torch_from(const std::vector<float>& v, int64_t R, int64_t n) {
  at::Tensor t = at::empty({R, n}, at::TensorOptions().dtype(at::kFloat));
  std::copy(v.begin(), v.begin() + R * n, t.data_ptr<float>());
  return t;
}

enum Act : int64_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };

inline float activate(float x, int64_t act) {
  switch (act) {
    case kRelu: return x > 0.f ? x : 0.f;
    case kGelu: return 0.5f * x * (1.f + std::erf(x * static_cast<float>(M_SQRT1_2)));
    case kGeluTanh: {
      const float kBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);
      return 0.5f * x * (1.f + std::tanh(kBeta * (x + 0.044715f * x * x * x)));
    }
    default: return x / (1.f + std::exp(-x));
  }
}

// out[0:n] = round(activate(x[0:n])) (out may be x). The tanh GELU 16 at a time as torch's kernel writes it
// (x^3, the inner product, SLEEF's tanh, simd::tanh): what F.gelu(approximate="tanh") computes; a scalar
// tanh per element costs about 1 ms of a T5-small step at 8 rows.
inline void activate_row(const float* x, int64_t n, int64_t act, const Step& st, float* out) {
  using namespace simd;
  int64_t i = 0;
  if (act == kGeluTanh) {
    const V16 beta = set1(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5));
    const V16 kappa = set1(0.044715f), half = set1(0.5f), one = set1(1.f);
    for (; i < n; i += 16) {
      const V16 v = load(x + i, n - i);
      const V16 cube = mul(mul(v, v), v);
      const V16 inner = mul(beta, add(v, mul(kappa, cube)));
      store(out + i, mul(mul(half, v), add(one, simd::tanh(inner))), n - i);
    }
    if (st.bf16)
      for (int64_t j = 0; j < n; ++j) out[j] = st.round(out[j]);
    return;
  }
  for (; i < n; ++i) out[i] = st.round(activate(x[i], act));
}

bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "decode step: activations must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

}  // namespace
