// Whole decoding steps: one call per token for the OPT and T5 decoders, products included, for one row
// or several (a batch of images, beams).
//
// At one row a step is a few dozen weight streams (row_product.cpp) and a few hundred tiny operations
// around them (norms, one-query attention over the cache, activations, residual adds). Run as torch
// operations, or as a compiled graph driven from Python, those cost about 0.8 ms a token on one core
// (dispatch, the graph's Python wrapper, dynamo's guards): a fifth of a Flan-T5-small bf16 step. Here they
// are plain loops over a few thousand floats, and a step costs its weight reads and little more. Several
// rows need weights in the blocked layout (blocked.cpp), which reads each weight once for all rows; plain
// or int8 weights ([N, K], row_product.cpp) take one row.
//
// Numerics follow the eager modules: activations are kept as floats rounded to the model's dtype (bf16 or
// fp32) wherever a torch operation would round them (each product's output, norm outputs, activation
// outputs, residual sums); norms, softmax and the attention sums run in fp32 as torch's kernels do.
// Products accumulate in fp32 (row_product.cpp, blocked.cpp), so results differ from oneDNN's in the order
// of the sums. Each row is computed alone: a row's result does not depend on the others.
//
// The Python side (blip2.fast.native) hands the weights over once as a flat list and checks the model is
// one these steps cover; each step passes the caches and masks of its generate call.

#include "row_product.cpp"
#include "blocked.cpp"
#include "screen.cpp"
#include "decode.cpp"

namespace {

at::Tensor need(const c10::List<std::optional<at::Tensor>>& list, size_t i, const char* what) {
  TORCH_CHECK(list.get(i).has_value(), "decode step: weight ", i, " (", what, ") is missing");
  return *list.get(i);
}

// Reads entries [i, i+3) of the weight list as a linear layer (absent when the weight is None).
Linear linear_at(const c10::List<std::optional<at::Tensor>>& list, size_t i, int64_t k_expected, bool bf16) {
  Linear l;
  if (!list.get(i).has_value()) return l;
  l.w = *list.get(i);
  const auto wt = l.w.scalar_type();
  std::optional<at::Tensor> s = list.get(i + 1), b = list.get(i + 2);
  TORCH_CHECK(l.w.is_contiguous() && l.w.device().is_cpu(), "decode step: weight ", i, " must be a contiguous CPU tensor");
  l.blocked = l.w.dim() != 2;
  if (l.blocked) {
    const int64_t per = wt == at::kFloat ? 1 : 2;
    TORCH_CHECK((wt == at::kFloat && l.w.dim() == 3 && l.w.size(2) == blocked::kBlock) ||
                (wt == at::kBFloat16 && l.w.dim() == 4 && l.w.size(2) == blocked::kBlock && l.w.size(3) == 2),
                "decode step: weight ", i, " must be [N, K] or blocked (float32 [NB, K, 16], bfloat16 [NB, K/2, 16, 2]), "
                "got ", wt, " ", l.w.sizes());
    TORCH_CHECK(wt != at::kBFloat16 || blocked::bf16_dot(), "decode step: blocked bfloat16 weights need AVX-512 BF16");
    TORCH_CHECK(b.has_value(), "decode step: blocked weight ", i, " needs its bias (zeros where the layer has none)");
    TORCH_CHECK(!s.has_value(), "decode step: blocked weight ", i, " takes no scale");
    l.n = b->numel();
    l.k = l.w.size(1) * per;
    if (per == 2 && k_expected == l.k - 1) l.k = k_expected;  // an odd K, padded to whole pairs
    TORCH_CHECK(l.n > (l.w.size(0) - 1) * blocked::kBlock && l.n <= l.w.size(0) * blocked::kBlock, "decode step: ",
                "blocked weight ", i, " of ", l.w.size(0), " blocks with a bias of ", l.n);
  } else {
    TORCH_CHECK(l.w.dim() == 2, "decode step: weight ", i, " must be a contiguous CPU [N, K], got ", l.w.sizes());
    l.n = l.w.size(0);
    l.k = l.w.size(1);
  }
  TORCH_CHECK(wt == (bf16 ? at::kBFloat16 : at::kFloat) || (wt == at::kChar && !l.blocked), "decode step: weight ", i,
              " is ", wt, ", expected int8 or the activations' ", (bf16 ? "bfloat16" : "float32"));
  TORCH_CHECK(k_expected < 0 || l.k == k_expected, "decode step: weight ", i, " takes ", l.k, " inputs, expected ",
              k_expected);
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


// several rows read each weight once only from the blocked layout
void check_rows(const Linear& l, int64_t R, size_t i) {
  TORCH_CHECK(R == 1 || !l.present || l.blocked, "decode step: ", R, " rows need blocked weights, weight ", i,
              " is [N, K]");
}

// ---- T5 decoder -------------------------------------------------------------------------------------
// weights: shared [V, D]; per layer (21 entries): self-attention norm, qkv (3), o (3), cross-attention norm,
// cross q (3), cross o (3), FFN norm, wi (3: [2F, D] gated wi_0 then wi_1, else [F, D]), wo (3);
// then the final norm and lm_head (3).
// ids [R, 1]: one token per row; kv: per layer cross k, cross v [R, H, S, Dk], self-attention cache k, v
// [R, H, L, Dk]; self_mask [1, H, L', L'] float (bias + causal, the same for every row), row `pos` used;
// cross_mask float, S values per row.
// fparams: eps, output scale (d_model**-0.5 for tied T5, else 1); iparams: heads, d_kv, activation, gated
// and optionally hidden: 1 returns the head's input [R, D] (fp32) instead of the logits (greedy_head's x).
constexpr size_t kT5PerLayer = 21;

at::Tensor t5_step(const at::Tensor& ids, const at::Tensor& input_pos, const at::Tensor& self_mask,
                   const at::Tensor& cross_mask, at::TensorList kv,
                   const c10::List<std::optional<at::Tensor>>& weights, c10::ArrayRef<double> fparams,
                   c10::ArrayRef<int64_t> iparams) {
  TORCH_CHECK(ids.numel() >= 1 && ids.numel() == ids.size(0) && ids.scalar_type() == at::kLong,
              "t5_step: one int64 token id per row ([R] or [R, 1]), got ", ids.sizes());
  TORCH_CHECK(input_pos.numel() == 1 && input_pos.scalar_type() == at::kLong, "t5_step: one int64 cache slot");
  TORCH_CHECK(fparams.size() == 2 && (iparams.size() == 4 || iparams.size() == 5),
              "t5_step: fparams [eps, out_scale], iparams [heads, d_kv, act, gated(, hidden)]");
  TORCH_CHECK(weights.size() >= 5 && (weights.size() - 5) % kT5PerLayer == 0, "t5_step: ", weights.size(),
              " weights is not 1 + 21 per layer + 4");
  const int64_t layers = (weights.size() - 5) / kT5PerLayer;
  TORCH_CHECK((int64_t)kv.size() == 4 * layers, "t5_step: ", kv.size(), " key/value tensors for ", layers, " layers");
  const float eps = fparams[0], out_scale = fparams[1];
  const int64_t H = iparams[0], dk = iparams[1], act = iparams[2];
  const bool gated = iparams[3] != 0, hidden = iparams.size() == 5 && iparams[4] != 0;
  const at::Tensor shared = need(weights, 0, "shared");
  const bool bf16 = is_bf16(shared);
  const int64_t R = ids.size(0), D = shared.size(1), inner = H * dk;
  const at::Tensor idc = ids.contiguous();
  const int64_t* tokens = idc.data_ptr<int64_t>();
  const int64_t pos = input_pos.data_ptr<int64_t>()[0];
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(tokens[r] >= 0 && tokens[r] < shared.size(0), "t5_step: token id ", tokens[r],
                " outside the vocabulary of ", shared.size(0));
  TORCH_CHECK(self_mask.dim() == 4 && self_mask.size(0) == 1 && self_mask.size(1) == H && pos >= 0 &&
              pos < self_mask.size(2), "t5_step: self_mask must be [1, ", H, ", L, L] holding slot ", pos, ", got ",
              self_mask.sizes());
  const at::Tensor cross = cross_mask.contiguous();
  const View smask(self_mask), cmask(cross);
  const int64_t L = self_mask.size(3), mh = self_mask.stride(1), mq = self_mask.stride(2), mk = self_mask.stride(3);

  Step st(bf16);
  const View emb(shared);
  std::vector<float> x(R * D), h(R * D), big, acts, attn(R * inner);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < D; ++i) x[r * D + i] = emb[tokens[r] * D + i];
  const auto residual = [&]() {
    for (int64_t i = 0; i < R * D; ++i) x[i] = st.round(x[i] + h[i]);
  };
  const auto norm = [&](const View& w) {
    for (int64_t r = 0; r < R; ++r) st.rms_norm(x.data() + r * D, w, D, eps, h.data() + r * D);
  };

  for (int64_t l = 0; l < layers; ++l) {
    const size_t w0 = 1 + l * kT5PerLayer;
    const Linear qkv = linear_at(weights, w0 + 1, D, bf16), o = linear_at(weights, w0 + 4, inner, bf16);
    const Linear cq = linear_at(weights, w0 + 8, D, bf16), co = linear_at(weights, w0 + 11, inner, bf16);
    const Linear wi = linear_at(weights, w0 + 15, D, bf16), wo = linear_at(weights, w0 + 18, -1, bf16);
    TORCH_CHECK(qkv.n == 3 * inner && cq.n == inner && o.n == D && co.n == D && wo.n == D &&
                wi.n == (gated ? 2 : 1) * wo.k, "t5_step: layer ", l, ": projection shapes do not fit");
    for (const auto& [lin, idx] : {std::pair{&qkv, w0 + 1}, {&o, w0 + 4}, {&cq, w0 + 8}, {&co, w0 + 11},
                                  {&wi, w0 + 15}, {&wo, w0 + 18}})
      check_rows(*lin, R, idx);
    const Heads ck(kv[4 * l], R, "cross keys"), cv(kv[4 * l + 1], R, "cross values");
    const Heads sk(kv[4 * l + 2], R, "cached keys"), sv(kv[4 * l + 3], R, "cached values");
    const int64_t S = ck.t.size(2);
    TORCH_CHECK(sk.t.size(2) == L && sk.t.size(1) == H && sk.t.size(3) == dk && ck.t.size(1) == H &&
                ck.t.size(3) == dk && cross.numel() == R * S && cv.t.sizes() == ck.t.sizes() &&
                sv.t.sizes() == sk.t.sizes(), "t5_step: layer ", l, ": cache or cross key/value shapes do not fit");

    // self-attention
    norm(view_at(weights, w0));
    big.resize(R * 3 * inner);
    st.linear(qkv, h.data(), R, big.data());
    write_cache(sk, R, pos, big.data() + inner, 3 * inner, H, dk);
    write_cache(sv, R, pos, big.data() + 2 * inner, 3 * inner, H, dk);
    attend(big.data(), 3 * inner, sk, sv, R, H, dk, L,
           [&](int64_t, int64_t hh, int64_t j) { return smask[hh * mh + pos * mq + j * mk]; }, attn.data(), st);
    st.linear(o, attn.data(), R, h.data());
    residual();

    // cross-attention
    norm(view_at(weights, w0 + 7));
    big.resize(R * inner);
    st.linear(cq, h.data(), R, big.data());
    attend(big.data(), inner, ck, cv, R, H, dk, S, [&](int64_t r, int64_t, int64_t j) { return cmask[r * S + j]; },
           attn.data(), st);
    st.linear(co, attn.data(), R, h.data());
    residual();

    // feed-forward
    norm(view_at(weights, w0 + 14));
    big.resize(R * wi.n);
    st.linear(wi, h.data(), R, big.data());
    const int64_t F = wo.k;
    acts.resize(R * F);
    for (int64_t r = 0; r < R; ++r) {
      const float* in = big.data() + r * wi.n;
      activate_row(in, F, act, st, acts.data() + r * F);
      if (gated)
        for (int64_t i = 0; i < F; ++i) acts[r * F + i] = st.round(acts[r * F + i] * in[F + i]);
    }
    st.linear(wo, acts.data(), R, h.data());
    residual();
  }

  const size_t tail = 1 + layers * kT5PerLayer;
  norm(view_at(weights, tail));
  if (out_scale != 1.f)
    for (int64_t i = 0; i < R * D; ++i) h[i] = st.round(h[i] * out_scale);
  if (hidden) return torch_from(h, R, D);
  const Linear head = linear_at(weights, tail + 1, D, bf16);
  check_rows(head, R, tail + 1);
  at::Tensor logits = at::empty({R, head.n}, shared.options().dtype(at::kFloat));
  st.linear(head, h.data(), R, logits.data_ptr<float>());
  return logits;
}

// ---- OPT decoder ------------------------------------------------------------------------------------
// weights: position table [P, D]; project_in (3, may be None); per layer (16 entries): attention norm
// (weight, bias), qkv (3), out (3), FFN norm (weight, bias), fc1 (3), fc2 (3); final norm (weight, bias;
// None without an affine part); project_out (3, may be None); lm_head (3).
// x: the rows' token embeddings [R, 1, E]; position [R, 1]: their position ids; key_valid [R, S] bool
// (any shape of R * S); kv: per layer cache k, v [R, H, S, Dh]; input_pos: the cache slot.
// fparams: eps, query scaling; iparams: heads, activation, pre-norm, final norm and optionally hidden: 1
// returns the head's input [R, K] (fp32) instead of the logits (greedy_head's x).
constexpr size_t kOptPerLayer = 16;

at::Tensor opt_step(const at::Tensor& x_in, const at::Tensor& position, const at::Tensor& key_valid,
                    at::TensorList kv, const at::Tensor& input_pos,
                    const c10::List<std::optional<at::Tensor>>& weights, c10::ArrayRef<double> fparams,
                    c10::ArrayRef<int64_t> iparams) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1 && x_in.size(0) >= 1, "opt_step: x must be [R, 1, E], got ",
              x_in.sizes());
  const int64_t R = x_in.size(0), E = x_in.size(2);
  TORCH_CHECK(position.numel() == R && position.scalar_type() == at::kLong, "opt_step: one int64 position per row");
  TORCH_CHECK(input_pos.numel() == 1 && input_pos.scalar_type() == at::kLong, "opt_step: one int64 cache slot");
  TORCH_CHECK(key_valid.scalar_type() == at::kBool, "opt_step: key_valid must be bool");
  TORCH_CHECK(fparams.size() == 2 && (iparams.size() == 4 || iparams.size() == 5),
              "opt_step: fparams [eps, scaling], iparams [heads, act, pre_norm, final_norm(, hidden)]");
  TORCH_CHECK(weights.size() >= 12 && (weights.size() - 12) % kOptPerLayer == 0, "opt_step: ", weights.size(),
              " weights is not 4 + 16 per layer + 8");
  const int64_t layers = (weights.size() - 12) / kOptPerLayer;
  TORCH_CHECK((int64_t)kv.size() == 2 * layers, "opt_step: ", kv.size(), " cache tensors for ", layers, " layers");
  const float eps = fparams[0], scaling = fparams[1];
  const int64_t H = iparams[0], act = iparams[1];
  const bool pre_norm = iparams[2] != 0, final_norm = iparams[3] != 0, hidden = iparams.size() == 5 && iparams[4] != 0;
  const bool bf16 = is_bf16(x_in);
  const at::Tensor table = need(weights, 0, "embed_positions");
  const int64_t D = table.size(1), dh = D / H, pos = input_pos.data_ptr<int64_t>()[0];
  const at::Tensor pc = position.contiguous();
  std::vector<int64_t> where(R);
  for (int64_t r = 0; r < R; ++r) {
    where[r] = pc.data_ptr<int64_t>()[r] + 2;
    TORCH_CHECK(where[r] >= 0 && where[r] < table.size(0), "opt_step: position ", where[r] - 2, " outside the table");
  }
  const at::Tensor kvalid = key_valid.contiguous();
  TORCH_CHECK(kvalid.numel() % R == 0, "opt_step: key_valid of ", kvalid.numel(), " for ", R, " rows");
  const int64_t S = kvalid.numel() / R;
  const bool* valid = kvalid.data_ptr<bool>();

  Step st(bf16);
  std::vector<float> x(R * D), h(R * std::max(D, E)), big, attn(R * D);
  const at::Tensor xc = x_in.contiguous();
  const View xv(xc), pv(table);
  const Linear pin = linear_at(weights, 1, E, bf16);
  check_rows(pin, R, 1);
  if (pin.present) {
    std::vector<float> e(R * E);
    for (int64_t i = 0; i < R * E; ++i) e[i] = xv[i];
    st.linear(pin, e.data(), R, x.data());
  } else {
    TORCH_CHECK(E == D, "opt_step: embedding of ", E, " without project_in for hidden size ", D);
    for (int64_t i = 0; i < R * D; ++i) x[i] = xv[i];
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < D; ++i) x[r * D + i] = st.round(x[r * D + i] + pv[where[r] * D + i]);
  const auto norm = [&](const View& w, const View& b, float* out) {
    for (int64_t r = 0; r < R; ++r) st.layer_norm(x.data() + r * D, w, b, D, eps, out + r * D);
  };
  const auto residual = [&]() {
    for (int64_t i = 0; i < R * D; ++i) x[i] = st.round(x[i] + h[i]);
  };
  const float inf = std::numeric_limits<float>::infinity();

  for (int64_t l = 0; l < layers; ++l) {
    const size_t w0 = 4 + l * kOptPerLayer;
    const View ln1w = view_at(weights, w0), ln1b = view_at(weights, w0 + 1);
    const View ln2w = view_at(weights, w0 + 8), ln2b = view_at(weights, w0 + 9);
    const Linear qkv = linear_at(weights, w0 + 2, D, bf16), out = linear_at(weights, w0 + 5, D, bf16);
    const Linear fc1 = linear_at(weights, w0 + 10, D, bf16), fc2 = linear_at(weights, w0 + 13, -1, bf16);
    TORCH_CHECK(qkv.n == 3 * D && out.n == D && fc2.n == D && fc1.n == fc2.k, "opt_step: layer ", l,
                ": projection shapes do not fit");
    for (const auto& [lin, idx] : {std::pair{&qkv, w0 + 2}, {&out, w0 + 5}, {&fc1, w0 + 10}, {&fc2, w0 + 13}})
      check_rows(*lin, R, idx);
    const Heads ck(kv[2 * l], R, "cached keys"), cv(kv[2 * l + 1], R, "cached values");
    TORCH_CHECK(ck.t.size(1) == H && ck.t.size(3) == dh && ck.t.size(2) == S && cv.t.sizes() == ck.t.sizes(),
                "opt_step: layer ", l, ": cache of ", ck.t.sizes(), " for ", S, " keys");

    if (pre_norm) norm(ln1w, ln1b, h.data());
    else std::copy(x.begin(), x.end(), h.begin());
    big.resize(R * 3 * D);
    st.linear(qkv, h.data(), R, big.data());
    for (int64_t r = 0; r < R; ++r)  // the query, scaled before the product
      for (int64_t i = 0; i < D; ++i) big[r * 3 * D + i] = st.round(big[r * 3 * D + i] * scaling);
    write_cache(ck, R, pos, big.data() + D, 3 * D, H, dh);
    write_cache(cv, R, pos, big.data() + 2 * D, 3 * D, H, dh);
    attend(big.data(), 3 * D, ck, cv, R, H, dh, S,
           [&](int64_t r, int64_t, int64_t j) { return valid[r * S + j] ? 0.f : -inf; }, attn.data(), st);
    st.linear(out, attn.data(), R, h.data());
    residual();
    if (!pre_norm) {
      norm(ln1w, ln1b, h.data());
      std::copy(h.begin(), h.begin() + R * D, x.begin());
    }

    if (pre_norm) norm(ln2w, ln2b, h.data());
    else std::copy(x.begin(), x.end(), h.begin());
    big.resize(R * fc1.n);
    st.linear(fc1, h.data(), R, big.data());
    activate_row(big.data(), R * fc1.n, act, st, big.data());
    st.linear(fc2, big.data(), R, h.data());
    residual();
    if (!pre_norm) {
      norm(ln2w, ln2b, h.data());
      std::copy(h.begin(), h.begin() + R * D, x.begin());
    }
  }

  const size_t tail = 4 + layers * kOptPerLayer;
  const View fw = view_at(weights, tail), fb = view_at(weights, tail + 1);
  std::vector<float> y(R * D);
  if (final_norm) norm(fw, fb, y.data());
  else std::copy(x.begin(), x.end(), y.begin());
  const Linear pout = linear_at(weights, tail + 2, D, bf16);
  check_rows(pout, R, tail + 2);
  std::vector<float> e;
  const float* last = y.data();
  if (pout.present) {
    e.resize(R * pout.n);
    st.linear(pout, y.data(), R, e.data());
    last = e.data();
  }
  if (hidden) return torch_from(pout.present ? e : y, R, pout.present ? pout.n : D);
  const Linear head = linear_at(weights, tail + 5, pout.present ? pout.n : D, bf16);
  TORCH_CHECK(head.present, "opt_step: lm_head is missing");
  check_rows(head, R, tail + 5);
  at::Tensor logits = at::empty({R, head.n}, x_in.options().dtype(at::kFloat));
  st.linear(head, last, R, logits.data_ptr<float>());
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(blip2_kernels, m) {
  python_module(m, 0);
  m.def("t5_step(Tensor ids, Tensor input_pos, Tensor self_mask, Tensor cross_mask, Tensor[] kv, Tensor?[] weights, "
        "float[] fparams, int[] iparams) -> Tensor");
  m.def("opt_step(Tensor x, Tensor position, Tensor key_valid, Tensor[] kv, Tensor input_pos, Tensor?[] weights, "
        "float[] fparams, int[] iparams) -> Tensor");
}

TORCH_LIBRARY_IMPL(blip2_kernels, CPU, m) {
  m.impl("t5_step", &t5_step);
  m.impl("opt_step", &opt_step);
}