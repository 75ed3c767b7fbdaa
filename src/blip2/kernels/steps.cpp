// Whole decoding steps at batch 1: one call per token for the OPT and T5 decoders, products included.
//
// At one row a step is a few dozen weight streams (row_product.cpp) and a few hundred tiny operations
// around them (norms, one-query attention over the cache, activations, residual adds). Run as torch
// operations, or as a compiled graph driven from Python, those cost about 0.8 ms a token on one core
// (dispatch, the graph's Python wrapper, dynamo's guards): a fifth of a Flan-T5-small bf16 step. Here they
// are plain loops over a few thousand floats, and a step costs its weight reads and little more.
//
// Numerics follow the eager modules: activations are kept as floats rounded to the model's dtype (bf16 or
// fp32) wherever a torch operation would round them (each product's output, norm outputs, activation
// outputs, residual sums); norms, softmax and the attention sums run in fp32 as torch's kernels do.
// Products accumulate in fp32 (row_product.cpp), so results differ from oneDNN's in the order of the sums.
//
// The Python side (blip2.lm.native) hands the weights over once as a flat list and checks the model is
// one these steps cover; each step passes the caches and masks of its generate call.

#include "row_product.cpp"
#include "blocked.cpp"

#include <cmath>
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

at::Tensor need(const c10::List<std::optional<at::Tensor>>& list, size_t i, const char* what) {
  TORCH_CHECK(list.get(i).has_value(), "decode step: weight ", i, " (", what, ") is missing");
  return *list.get(i);
}

// A linear layer as three list entries: weight [N, K] (float or int8), scale [N] (int8) and bias [N], both optional.
struct Linear {
  at::Tensor w;
  Vector scale, bias;
  int64_t n = 0, k = 0;
  bool present = false;
};

struct Step {
  bool bf16;  // activations are bfloat16 (else float32)
  std::vector<uint16_t> xb;

  explicit Step(bool bf16) : bf16(bf16) {}

  float round(float v) const { return bf16 ? static_cast<float>(at::BFloat16(v)) : v; }

  // y[0:N] = round(x @ W.T * scale + bias), x[0:K] already rounded to the activation dtype
  void linear(const Linear& l, const float* x, float* y) {
    const uint16_t* x16 = nullptr;
#if defined(__AVX512BF16__)
    if (l.w.scalar_type() == at::kBFloat16) {
      xb.resize(l.k);
      for (int64_t i = 0; i < l.k; ++i) xb[i] = at::BFloat16(x[i]).x;  // exact: x is bf16-valued
      x16 = xb.data();
    }
#endif
    sums(l.w, x, x16, y);
    for (int64_t i = 0; i < l.n; ++i) {
      float v = y[i];
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

// Keys and values of one layer [1, H, S, Dh] (any strides, last one 1), read as float.
struct Heads {
  View data;
  int64_t sh, ss;
  explicit Heads(const at::Tensor& t) : data(t), sh(t.stride(1)), ss(t.stride(2)) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == 1 && t.stride(3) == 1, "decode step: keys/values must be [1, H, S, Dh] "
                "with unit last stride, got ", t.sizes(), " strides ", t.strides());
  }
  int64_t at(int64_t h, int64_t s) const { return h * sh + s * ss; }
};

// One query per head attends over S keys: out[h, :] = softmax(q . k_j * scale + mask_j) @ v, in fp32.
// mask(h, j) returns the additive mask (-inf drops the key); keys whose mask is -inf, or the dtype's lowest
// value, are skipped (their weight is exactly 0) unless every key is.
template <class Mask>
void attend(const float* q, const Heads& k, const Heads& v, int64_t heads, int64_t dh, int64_t S, float scale,
            const Mask& mask, float* out, std::vector<float>& p, const Step& st) {
  p.resize(S);
  for (int64_t h = 0; h < heads; ++h) {
    const float* qh = q + h * dh;
    float best = -std::numeric_limits<float>::infinity();
    bool any = false;
    for (int64_t j = 0; j < S; ++j) {
      const float m = mask(h, j);
      if (m == -std::numeric_limits<float>::infinity() || m <= -3.3e38f) {
        p[j] = std::numeric_limits<float>::quiet_NaN();  // marks a skipped key
        continue;
      }
      any = true;
      const int64_t base = k.at(h, j);
      float s = 0.f;
      for (int64_t d = 0; d < dh; ++d) s += qh[d] * k.data[base + d];
      p[j] = s * scale + m;
      best = std::max(best, p[j]);
    }
    if (!any) {  // every key masked: softmax over the masked scores, as the reference does
      for (int64_t j = 0; j < S; ++j) {
        const int64_t base = k.at(h, j);
        float s = 0.f;
        for (int64_t d = 0; d < dh; ++d) s += qh[d] * k.data[base + d];
        p[j] = s * scale + mask(h, j);
        best = std::max(best, p[j]);
      }
    }
    float total = 0.f;
    for (int64_t j = 0; j < S; ++j) {
      if (std::isnan(p[j]) && any) { p[j] = 0.f; continue; }
      p[j] = std::exp(p[j] - best);
      total += p[j];
    }
    float* oh = out + h * dh;
    for (int64_t d = 0; d < dh; ++d) oh[d] = 0.f;
    for (int64_t j = 0; j < S; ++j) {
      if (p[j] == 0.f) continue;
      const float w = p[j] / total;
      const int64_t base = v.at(h, j);
      for (int64_t d = 0; d < dh; ++d) oh[d] += w * v.data[base + d];
    }
    for (int64_t d = 0; d < dh; ++d) oh[d] = st.round(oh[d]);
  }
}

void write_cache(const at::Tensor& cache, int64_t pos, const float* x, int64_t heads, int64_t dh) {
  Heads c(cache);
  TORCH_CHECK(pos >= 0 && pos < cache.size(2), "decode step: cache slot ", pos, " outside [0, ", cache.size(2), ")");
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t d = 0; d < dh; ++d) c.data.set(c.at(h, pos) + d, x[h * dh + d]);
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

// Reads entries [i, i+3) of the weight list as a linear layer (absent when the weight is None).
Linear linear_at(const c10::List<std::optional<at::Tensor>>& list, size_t i, int64_t k_expected, bool bf16) {
  Linear l;
  if (!list.get(i).has_value()) return l;
  l.w = *list.get(i);
  TORCH_CHECK(l.w.dim() == 2 && l.w.is_contiguous() && l.w.device().is_cpu(),
              "decode step: weight ", i, " must be a contiguous CPU [N, K], got ", l.w.sizes());
  const auto wt = l.w.scalar_type();
  TORCH_CHECK(wt == at::kChar || wt == (bf16 ? at::kBFloat16 : at::kFloat), "decode step: weight ", i, " is ", wt,
              ", expected int8 or the activations' ", (bf16 ? "bfloat16" : "float32"));
  l.n = l.w.size(0);
  l.k = l.w.size(1);
  TORCH_CHECK(k_expected < 0 || l.k == k_expected, "decode step: weight ", i, " takes ", l.k, " inputs, expected ",
              k_expected);
  std::optional<at::Tensor> s = list.get(i + 1), b = list.get(i + 2);
  for (const auto* t : {&s, &b})
    TORCH_CHECK(!t->has_value() || ((*t)->numel() == l.n && (*t)->is_contiguous() && (*t)->device().is_cpu() &&
                                    ((*t)->scalar_type() == at::kFloat || (*t)->scalar_type() == at::kBFloat16)),
                "decode step: scale/bias of weight ", i, " must be contiguous float32/bfloat16 CPU [", l.n, "]");
  TORCH_CHECK(wt != at::kChar || s.has_value(), "decode step: int8 weight ", i, " needs a scale");
  l.scale = Vector(s);
  l.bias = Vector(b);
  l.present = true;
  return l;
}

View view_at(const c10::List<std::optional<at::Tensor>>& list, size_t i) {
  return list.get(i).has_value() ? View(*list.get(i)) : View();
}

bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "decode step: activations must be float32 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

// ---- T5 decoder -------------------------------------------------------------------------------------
// weights: shared [V, D]; per layer (21 entries): self-attention norm, qkv (3), o (3), cross-attention norm,
// cross q (3), cross o (3), FFN norm, wi (3: [2F, D] gated wi_0 then wi_1, else [F, D]), wo (3);
// then the final norm and lm_head (3).
// kv: per layer cross k, cross v [1, H, S, Dk], self-attention cache k, v [1, H, L, Dk].
// self_mask [1, H, L', L'] float (bias + causal), row `pos` used; cross_mask float, S values.
// fparams: eps, output scale (d_model**-0.5 for tied T5, else 1); iparams: heads, d_kv, activation, gated.
constexpr size_t kT5PerLayer = 21;

at::Tensor t5_step(const at::Tensor& ids, const at::Tensor& input_pos, const at::Tensor& self_mask,
                   const at::Tensor& cross_mask, at::TensorList kv,
                   const c10::List<std::optional<at::Tensor>>& weights, c10::ArrayRef<double> fparams,
                   c10::ArrayRef<int64_t> iparams) {
  TORCH_CHECK(ids.numel() == 1 && ids.scalar_type() == at::kLong, "t5_step: one int64 token id, got ", ids.sizes());
  TORCH_CHECK(input_pos.numel() == 1 && input_pos.scalar_type() == at::kLong, "t5_step: one int64 cache slot");
  TORCH_CHECK(fparams.size() == 2 && iparams.size() == 4, "t5_step: fparams [eps, out_scale], iparams [heads, d_kv, act, gated]");
  TORCH_CHECK(weights.size() >= 5 && (weights.size() - 5) % kT5PerLayer == 0, "t5_step: ", weights.size(),
              " weights is not 1 + 21 per layer + 4");
  const int64_t layers = (weights.size() - 5) / kT5PerLayer;
  TORCH_CHECK((int64_t)kv.size() == 4 * layers, "t5_step: ", kv.size(), " key/value tensors for ", layers, " layers");
  const float eps = fparams[0], out_scale = fparams[1];
  const int64_t H = iparams[0], dk = iparams[1], act = iparams[2];
  const bool gated = iparams[3] != 0;
  const at::Tensor shared = need(weights, 0, "shared");
  const bool bf16 = is_bf16(shared);
  const int64_t D = shared.size(1), inner = H * dk;
  const int64_t token = ids.data_ptr<int64_t>()[0], pos = input_pos.data_ptr<int64_t>()[0];
  TORCH_CHECK(token >= 0 && token < shared.size(0), "t5_step: token id ", token, " outside the vocabulary of ",
              shared.size(0));
  TORCH_CHECK(self_mask.dim() == 4 && self_mask.size(0) == 1 && self_mask.size(1) == H && pos >= 0 &&
              pos < self_mask.size(2), "t5_step: self_mask must be [1, ", H, ", L, L] holding slot ", pos, ", got ",
              self_mask.sizes());
  const at::Tensor cross = cross_mask.contiguous();
  const View smask(self_mask), cmask(cross);
  const int64_t L = self_mask.size(3), mh = self_mask.stride(1), mq = self_mask.stride(2), mk = self_mask.stride(3);

  Step st(bf16);
  const View emb(shared);
  std::vector<float> x(D), h(D), big, attn(inner), p;
  for (int64_t i = 0; i < D; ++i) x[i] = emb[token * D + i];

  for (int64_t l = 0; l < layers; ++l) {
    const size_t w0 = 1 + l * kT5PerLayer;
    const Linear qkv = linear_at(weights, w0 + 1, D, bf16), o = linear_at(weights, w0 + 4, inner, bf16);
    const Linear cq = linear_at(weights, w0 + 8, D, bf16), co = linear_at(weights, w0 + 11, inner, bf16);
    const Linear wi = linear_at(weights, w0 + 15, D, bf16), wo = linear_at(weights, w0 + 18, -1, bf16);
    TORCH_CHECK(qkv.n == 3 * inner && cq.n == inner && o.n == D && co.n == D && wo.n == D &&
                wi.n == (gated ? 2 : 1) * wo.k, "t5_step: layer ", l, ": projection shapes do not fit");
    const at::Tensor &ck = kv[4 * l], &cv = kv[4 * l + 1], &sk = kv[4 * l + 2], &sv = kv[4 * l + 3];
    TORCH_CHECK(sk.size(2) == L && sk.size(1) == H && sk.size(3) == dk && ck.size(1) == H && ck.size(3) == dk &&
                ck.size(2) == cross_mask.numel(), "t5_step: layer ", l, ": cache or cross key/value shapes do not fit");

    // self-attention
    st.rms_norm(x.data(), view_at(weights, w0), D, eps, h.data());
    big.resize(3 * inner);
    st.linear(qkv, h.data(), big.data());
    write_cache(sk, pos, big.data() + inner, H, dk);
    write_cache(sv, pos, big.data() + 2 * inner, H, dk);
    const int64_t S = sk.size(2);
    attend(big.data(), Heads(sk), Heads(sv), H, dk, S, 1.f,
           [&](int64_t hh, int64_t j) { return smask[hh * mh + pos * mq + j * mk]; }, attn.data(), p, st);
    st.linear(o, attn.data(), h.data());
    for (int64_t i = 0; i < D; ++i) x[i] = st.round(x[i] + h[i]);

    // cross-attention
    st.rms_norm(x.data(), view_at(weights, w0 + 7), D, eps, h.data());
    big.resize(inner);
    st.linear(cq, h.data(), big.data());
    attend(big.data(), Heads(ck), Heads(cv), H, dk, ck.size(2), 1.f,
           [&](int64_t, int64_t j) { return cmask[j]; }, attn.data(), p, st);
    st.linear(co, attn.data(), h.data());
    for (int64_t i = 0; i < D; ++i) x[i] = st.round(x[i] + h[i]);

    // feed-forward
    st.rms_norm(x.data(), view_at(weights, w0 + 14), D, eps, h.data());
    big.resize(wi.n);
    st.linear(wi, h.data(), big.data());
    const int64_t F = wo.k;
    for (int64_t i = 0; i < F; ++i) {
      const float a = st.round(activate(big[i], act));
      big[i] = gated ? st.round(a * big[F + i]) : a;
    }
    st.linear(wo, big.data(), h.data());
    for (int64_t i = 0; i < D; ++i) x[i] = st.round(x[i] + h[i]);
  }

  const size_t tail = 1 + layers * kT5PerLayer;
  st.rms_norm(x.data(), view_at(weights, tail), D, eps, h.data());
  if (out_scale != 1.f)
    for (int64_t i = 0; i < D; ++i) h[i] = st.round(h[i] * out_scale);
  const Linear head = linear_at(weights, tail + 1, D, bf16);
  at::Tensor logits = at::empty({1, head.n}, shared.options().dtype(at::kFloat));
  st.linear(head, h.data(), logits.data_ptr<float>());
  return logits;
}

// ---- OPT decoder ------------------------------------------------------------------------------------
// weights: position table [P, D]; project_in (3, may be None); per layer (16 entries): attention norm
// (weight, bias), qkv (3), out (3), FFN norm (weight, bias), fc1 (3), fc2 (3); final norm (weight, bias;
// None without an affine part); project_out (3, may be None); lm_head (3).
// x: the token's embedding [1, 1, E]; position: its position id; key_valid [1, 1, 1, S] bool;
// kv: per layer cache k, v [1, H, S, Dh]; input_pos: the cache slot.
// fparams: eps, query scaling; iparams: heads, activation, pre-norm, final norm.
constexpr size_t kOptPerLayer = 16;

at::Tensor opt_step(const at::Tensor& x_in, const at::Tensor& position, const at::Tensor& key_valid,
                    at::TensorList kv, const at::Tensor& input_pos,
                    const c10::List<std::optional<at::Tensor>>& weights, c10::ArrayRef<double> fparams,
                    c10::ArrayRef<int64_t> iparams) {
  TORCH_CHECK(position.numel() == 1 && position.scalar_type() == at::kLong, "opt_step: one int64 position");
  TORCH_CHECK(input_pos.numel() == 1 && input_pos.scalar_type() == at::kLong, "opt_step: one int64 cache slot");
  TORCH_CHECK(key_valid.scalar_type() == at::kBool, "opt_step: key_valid must be bool");
  TORCH_CHECK(fparams.size() == 2 && iparams.size() == 4,
              "opt_step: fparams [eps, scaling], iparams [heads, act, pre_norm, final_norm]");
  TORCH_CHECK(weights.size() >= 12 && (weights.size() - 12) % kOptPerLayer == 0, "opt_step: ", weights.size(),
              " weights is not 4 + 16 per layer + 8");
  const int64_t layers = (weights.size() - 12) / kOptPerLayer;
  TORCH_CHECK((int64_t)kv.size() == 2 * layers, "opt_step: ", kv.size(), " cache tensors for ", layers, " layers");
  const float eps = fparams[0], scaling = fparams[1];
  const int64_t H = iparams[0], act = iparams[1];
  const bool pre_norm = iparams[2] != 0, final_norm = iparams[3] != 0;
  const bool bf16 = is_bf16(x_in);
  const at::Tensor table = need(weights, 0, "embed_positions");
  const int64_t D = table.size(1), dh = D / H, E = x_in.numel();
  const int64_t where = position.data_ptr<int64_t>()[0] + 2, pos = input_pos.data_ptr<int64_t>()[0];
  TORCH_CHECK(where >= 0 && where < table.size(0), "opt_step: position ", where - 2, " outside the table");
  const at::Tensor kvalid = key_valid.contiguous();
  const bool* valid = kvalid.data_ptr<bool>();

  Step st(bf16);
  std::vector<float> x(D), h(std::max(D, E)), big, attn(D), p;
  const at::Tensor xc = x_in.contiguous();
  const View xv(xc), pv(table);
  const Linear pin = linear_at(weights, 1, E, bf16);
  if (pin.present) {
    std::vector<float> e(E);
    for (int64_t i = 0; i < E; ++i) e[i] = xv[i];
    st.linear(pin, e.data(), x.data());
  } else {
    TORCH_CHECK(E == D, "opt_step: embedding of ", E, " without project_in for hidden size ", D);
    for (int64_t i = 0; i < D; ++i) x[i] = xv[i];
  }
  for (int64_t i = 0; i < D; ++i) x[i] = st.round(x[i] + pv[where * D + i]);

  for (int64_t l = 0; l < layers; ++l) {
    const size_t w0 = 4 + l * kOptPerLayer;
    const View ln1w = view_at(weights, w0), ln1b = view_at(weights, w0 + 1);
    const View ln2w = view_at(weights, w0 + 8), ln2b = view_at(weights, w0 + 9);
    const Linear qkv = linear_at(weights, w0 + 2, D, bf16), out = linear_at(weights, w0 + 5, D, bf16);
    const Linear fc1 = linear_at(weights, w0 + 10, D, bf16), fc2 = linear_at(weights, w0 + 13, -1, bf16);
    TORCH_CHECK(qkv.n == 3 * D && out.n == D && fc2.n == D && fc1.n == fc2.k, "opt_step: layer ", l,
                ": projection shapes do not fit");
    const at::Tensor &ck = kv[2 * l], &cv = kv[2 * l + 1];
    TORCH_CHECK(ck.size(1) == H && ck.size(3) == dh && ck.size(2) == kvalid.numel(), "opt_step: layer ", l,
                ": cache of ", ck.sizes(), " for ", kvalid.numel(), " keys");

    if (pre_norm) st.layer_norm(x.data(), ln1w, ln1b, D, eps, h.data());
    else std::copy(x.begin(), x.end(), h.begin());
    big.resize(3 * D);
    st.linear(qkv, h.data(), big.data());
    for (int64_t i = 0; i < D; ++i) big[i] = st.round(big[i] * scaling);  // the query, scaled before the product
    write_cache(ck, pos, big.data() + D, H, dh);
    write_cache(cv, pos, big.data() + 2 * D, H, dh);
    const float inf = std::numeric_limits<float>::infinity();
    attend(big.data(), Heads(ck), Heads(cv), H, dh, ck.size(2), 1.f,
           [&](int64_t, int64_t j) { return valid[j] ? 0.f : -inf; }, attn.data(), p, st);
    st.linear(out, attn.data(), h.data());
    for (int64_t i = 0; i < D; ++i) x[i] = st.round(x[i] + h[i]);
    if (!pre_norm) {
      st.layer_norm(x.data(), ln1w, ln1b, D, eps, h.data());
      std::copy(h.begin(), h.begin() + D, x.begin());
    }

    if (pre_norm) st.layer_norm(x.data(), ln2w, ln2b, D, eps, h.data());
    else std::copy(x.begin(), x.end(), h.begin());
    big.resize(fc1.n);
    st.linear(fc1, h.data(), big.data());
    for (int64_t i = 0; i < fc1.n; ++i) big[i] = st.round(activate(big[i], act));
    st.linear(fc2, big.data(), h.data());
    for (int64_t i = 0; i < D; ++i) x[i] = st.round(x[i] + h[i]);
    if (!pre_norm) {
      st.layer_norm(x.data(), ln2w, ln2b, D, eps, h.data());
      std::copy(h.begin(), h.begin() + D, x.begin());
    }
  }

  const size_t tail = 4 + layers * kOptPerLayer;
  const View fw = view_at(weights, tail), fb = view_at(weights, tail + 1);
  std::vector<float> y(D);
  if (final_norm) st.layer_norm(x.data(), fw, fb, D, eps, y.data());
  else y = x;
  const Linear pout = linear_at(weights, tail + 2, D, bf16);
  std::vector<float> e;
  const float* last = y.data();
  if (pout.present) {
    e.resize(pout.n);
    st.linear(pout, y.data(), e.data());
    last = e.data();
  }
  const Linear head = linear_at(weights, tail + 5, pout.present ? pout.n : D, bf16);
  TORCH_CHECK(head.present, "opt_step: lm_head is missing");
  at::Tensor logits = at::empty({1, head.n}, x_in.options().dtype(at::kFloat));
  st.linear(head, last, logits.data_ptr<float>());
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(blip2_kernels, m) {
  m.def("t5_step(Tensor ids, Tensor input_pos, Tensor self_mask, Tensor cross_mask, Tensor[] kv, Tensor?[] weights, "
        "float[] fparams, int[] iparams) -> Tensor");
  m.def("opt_step(Tensor x, Tensor position, Tensor key_valid, Tensor[] kv, Tensor input_pos, Tensor?[] weights, "
        "float[] fparams, int[] iparams) -> Tensor");
}

TORCH_LIBRARY_IMPL(blip2_kernels, CPU, m) {
  m.impl("t5_step", &t5_step);
  m.impl("opt_step", &opt_step);
}
