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
// Python (blip2.fast.native) checks the model is one these steps cover and builds the weight list and the
// scalars once, by name (slots.cpp: the op's schema below, blip2_kernels::step_schema); each call passes
// them with the names, and the caches and masks of its generate call.

#include "row_product.cpp"
#include "blocked.cpp"
#include "attention.cpp"
#include "screen.cpp"
#include "decode.cpp"
#include "slots.cpp"

#include <tuple>

namespace {

// ---- T5 decoder -------------------------------------------------------------------------------------
// ids [R, 1]: one token per row; kv: per layer cross k, cross v [R, H, S, Dk], self-attention cache k, v
// [R, H, L, Dk]; self_mask [1, H, L', L'] float (bias + causal, the same for every row), row `pos` used;
// cross_mask float, S values per row.
namespace t5 {
constexpr std::string_view kFirst[] = {"shared"};  // the embedding [V, D]
// qkv: the self-attention's q, k and v fused [3I, D], k and v None; or q alone [I, D], k and v in their slots
// (the checkpoint's own weights, one row a call). wi: [2F, D] gated (wi_0 then wi_1), wi_1 None; or wi_0 alone
// and wi_1; [F, D] not gated.
constexpr std::string_view kLayer[] = {
    "self_attn_norm.weight", "qkv.weight", "qkv.scale", "qkv.bias", "k.weight", "k.scale", "k.bias",
    "v.weight", "v.scale", "v.bias", "o.weight", "o.scale", "o.bias",
    "cross_attn_norm.weight", "cross_q.weight", "cross_q.scale", "cross_q.bias",
    "cross_o.weight", "cross_o.scale", "cross_o.bias",
    "ffn_norm.weight", "wi.weight", "wi.scale", "wi.bias", "wi_1.weight", "wi_1.scale", "wi_1.bias",
    "wo.weight", "wo.scale", "wo.bias"};
constexpr std::string_view kLast[] = {"final_norm.weight", "lm_head.weight", "lm_head.scale", "lm_head.bias"};
// out_scale: d_model**-0.5 for tied T5, else 1; activation: an Act (decode.cpp); gated: 0 or 1; want_hidden: 1
// returns the head's input [R, D] (fp32) instead of the logits (greedy_head's x)
constexpr std::string_view kParams[] = {"eps", "out_scale", "heads", "d_kv", "activation", "gated", "want_hidden"};
const Schema kSchema("t5_step", kFirst, kLayer, kLast, kParams);
}  // namespace t5

at::Tensor t5_step(const at::Tensor& ids, const at::Tensor& input_pos, const at::Tensor& self_mask,
                   const at::Tensor& cross_mask, at::TensorList kv, const std::vector<std::string>& slots,
                   const c10::List<std::optional<at::Tensor>>& weights, const std::vector<std::string>& params,
                   c10::ArrayRef<double> values) {
  using namespace t5;
  const Call c(kSchema, slots, weights, params, values);
  TORCH_CHECK(ids.numel() >= 1 && ids.numel() == ids.size(0) && ids.scalar_type() == at::kLong,
              "t5_step: one int64 token id per row ([R] or [R, 1]), got ", ids.sizes());
  const int64_t R = ids.size(0);
  TORCH_CHECK((input_pos.numel() == 1 || input_pos.numel() == R) && input_pos.scalar_type() == at::kLong,
              "t5_step: one int64 cache slot, or one per row, got ", input_pos.numel(), " for ", R, " rows");
  const int64_t layers = c.layers;
  TORCH_CHECK((int64_t)kv.size() == 4 * layers, "t5_step: ", kv.size(), " key/value tensors for ", layers, " layers");
  const float eps = c.scalar(slot(kParams, "eps")), out_scale = c.scalar(slot(kParams, "out_scale"));
  const int64_t H = c.integer(slot(kParams, "heads")), dk = c.integer(slot(kParams, "d_kv"));
  const int64_t act = c.integer(slot(kParams, "activation"));
  const bool gated = c.integer(slot(kParams, "gated")) != 0, hidden = c.integer(slot(kParams, "want_hidden")) != 0;
  const at::Tensor shared = c.tensor(slot(kFirst, "shared"));
  const bool bf16 = is_bf16(shared);
  const int64_t D = shared.size(1), inner = H * dk;
  const at::Tensor idc = ids.contiguous();
  const int64_t* tokens = idc.data_ptr<int64_t>();
  const at::Tensor ipc = input_pos.contiguous();
  std::vector<int64_t> pos(R);  // each row's cache slot
  for (int64_t r = 0; r < R; ++r) pos[r] = ipc.data_ptr<int64_t>()[input_pos.numel() == 1 ? 0 : r];
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(tokens[r] >= 0 && tokens[r] < shared.size(0), "t5_step: token id ", tokens[r],
                " outside the vocabulary of ", shared.size(0));
  // self_mask: the whole cache's [1, H, L, L] (every row reads its query row at the one slot), or each row's
  // own query row [R, H, 1, L] (rows at their own slots: continuous batching)
  const bool own = self_mask.dim() == 4 && self_mask.size(0) == R && self_mask.size(2) == 1;
  TORCH_CHECK(self_mask.dim() == 4 && self_mask.size(1) == H &&
              (own || (self_mask.size(0) == 1 && input_pos.numel() == 1 && pos[0] >= 0 && pos[0] < self_mask.size(2))),
              "t5_step: self_mask must be [1, ", H, ", L, L] holding slot ", pos[0], ", or [", R, ", ", H,
              ", 1, L], got ", self_mask.sizes());
  const at::Tensor cross = cross_mask.contiguous();
  const View smask(self_mask), cmask(cross);
  const int64_t L = self_mask.size(3), mh = self_mask.stride(1), mk = self_mask.stride(3);
  const int64_t mr = own ? self_mask.stride(0) : 0, mq = own ? 0 : pos[0] * self_mask.stride(2);

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
    const size_t w0 = c.layer(l);
    const Linear qkv = c.linear(w0 + linear_slot(kLayer, "qkv"), D, bf16, R);
    const Linear k = c.linear(w0 + linear_slot(kLayer, "k"), D, bf16, R);
    const Linear v = c.linear(w0 + linear_slot(kLayer, "v"), D, bf16, R);
    const Linear o = c.linear(w0 + linear_slot(kLayer, "o"), inner, bf16, R);
    const Linear cq = c.linear(w0 + linear_slot(kLayer, "cross_q"), D, bf16, R);
    const Linear co = c.linear(w0 + linear_slot(kLayer, "cross_o"), inner, bf16, R);
    const Linear wi = c.linear(w0 + linear_slot(kLayer, "wi"), D, bf16, R);
    const Linear wi_1 = c.linear(w0 + linear_slot(kLayer, "wi_1"), D, bf16, R);
    const Linear wo = c.linear(w0 + linear_slot(kLayer, "wo"), -1, bf16, R);
    const bool split = k.present;  // q, k, v in three slots
    TORCH_CHECK(k.present == v.present &&
                (split ? qkv.n == inner && k.n == inner && v.n == inner : qkv.n == 3 * inner) && cq.n == inner &&
                o.n == D && co.n == D && wo.n == D && (gated || !wi_1.present) && (!wi_1.present || wi_1.n == wi.n) &&
                wi.n + (wi_1.present ? wi_1.n : 0) == (gated ? 2 : 1) * wo.k,
                "t5_step: layer ", l, ": projection shapes do not fit");
    const Heads ck(kv[4 * l], R, "cross keys"), cv(kv[4 * l + 1], R, "cross values");
    const Heads sk(kv[4 * l + 2], R, "cached keys"), sv(kv[4 * l + 3], R, "cached values");
    const int64_t S = ck.t.size(2);
    TORCH_CHECK(sk.t.size(2) == L && sk.t.size(1) == H && sk.t.size(3) == dk && ck.t.size(1) == H &&
                ck.t.size(3) == dk && cross.numel() == R * S && cv.t.sizes() == ck.t.sizes() &&
                sv.t.sizes() == sk.t.sizes(), "t5_step: layer ", l, ": cache or cross key/value shapes do not fit");

    // self-attention
    norm(c.view(w0 + slot(kLayer, "self_attn_norm.weight")));
    big.resize(R * 3 * inner);
    st.linear({&qkv, &k, &v}, h.data(), R, big.data());
    write_cache(sk, R, pos.data(), big.data() + inner, 3 * inner, H, dk);
    write_cache(sv, R, pos.data(), big.data() + 2 * inner, 3 * inner, H, dk);
    attend(big.data(), 3 * inner, sk, sv, R, H, dk, L,
           [&](int64_t r, int64_t hh, int64_t j) { return smask[r * mr + hh * mh + mq + j * mk]; }, attn.data(), st);
    st.linear(o, attn.data(), R, h.data());
    residual();

    // cross-attention
    norm(c.view(w0 + slot(kLayer, "cross_attn_norm.weight")));
    big.resize(R * inner);
    st.linear(cq, h.data(), R, big.data());
    attend(big.data(), inner, ck, cv, R, H, dk, S, [&](int64_t r, int64_t, int64_t j) { return cmask[r * S + j]; },
           attn.data(), st);
    st.linear(co, attn.data(), R, h.data());
    residual();

    // feed-forward
    norm(c.view(w0 + slot(kLayer, "ffn_norm.weight")));
    const int64_t wide = wi.n + (wi_1.present ? wi_1.n : 0);
    big.resize(R * wide);
    st.linear({&wi, &wi_1}, h.data(), R, big.data());
    const int64_t F = wo.k;
    acts.resize(R * F);
    for (int64_t r = 0; r < R; ++r) {
      const float* in = big.data() + r * wide;
      activate_row(in, F, act, st, acts.data() + r * F);
      if (gated)
        for (int64_t i = 0; i < F; ++i) acts[r * F + i] = st.round(acts[r * F + i] * in[F + i]);
    }
    st.linear(wo, acts.data(), R, h.data());
    residual();
  }

  const size_t tail = c.last();
  norm(c.view(tail + slot(kLast, "final_norm.weight")));
  if (out_scale != 1.f)
    for (int64_t i = 0; i < R * D; ++i) h[i] = st.round(h[i] * out_scale);
  if (hidden) return torch_from(h, R, D);
  const Linear head = c.linear(tail + linear_slot(kLast, "lm_head"), D, bf16, R);
  at::Tensor logits = at::empty({R, head.n}, shared.options().dtype(at::kFloat));
  st.linear(head, h.data(), R, logits.data_ptr<float>());
  return logits;
}

// ---- OPT decoder ------------------------------------------------------------------------------------
// x: the rows' token embeddings [R, 1, E]; position [R, 1]: their position ids; key_valid [R, S] bool
// (any shape of R * S); kv: per layer cache k, v [R, H, S, Dh] (any strides but the last); input_pos: the
// cache slot of every row, or one per row [R] (continuous batching: rows at their own lengths).
namespace opt {
// the position table [P, D]; project_in absent (None) where the embedding has the hidden size
constexpr std::string_view kFirst[] = {"embed_positions", "project_in.weight", "project_in.scale", "project_in.bias"};
// qkv: q, k and v fused [3D, D], k and v None; or q alone [D, D], k and v in their slots (the checkpoint's own
// weights, one row a call)
constexpr std::string_view kLayer[] = {
    "self_attn_norm.weight", "self_attn_norm.bias", "qkv.weight", "qkv.scale", "qkv.bias",
    "k.weight", "k.scale", "k.bias", "v.weight", "v.scale", "v.bias",
    "out_proj.weight", "out_proj.scale", "out_proj.bias", "ffn_norm.weight", "ffn_norm.bias",
    "fc1.weight", "fc1.scale", "fc1.bias", "fc2.weight", "fc2.scale", "fc2.bias"};
// the final norm's weight and bias None where it has no affine part; project_out None where absent
constexpr std::string_view kLast[] = {"final_norm.weight", "final_norm.bias", "project_out.weight",
                                      "project_out.scale", "project_out.bias", "lm_head.weight", "lm_head.scale",
                                      "lm_head.bias"};
// scaling: the query's; activation: an Act (decode.cpp); pre_norm, has_final_norm: 0 or 1; want_hidden: 1
// returns the head's input [R, K] (fp32) instead of the logits (greedy_head's x)
constexpr std::string_view kParams[] = {"eps", "scaling", "heads", "activation", "pre_norm", "has_final_norm",
                                        "want_hidden"};
const Schema kSchema("opt_step", kFirst, kLayer, kLast, kParams);
}  // namespace opt

at::Tensor opt_step(const at::Tensor& x_in, const at::Tensor& position, const at::Tensor& key_valid,
                    at::TensorList kv, const at::Tensor& input_pos, const std::vector<std::string>& slots,
                    const c10::List<std::optional<at::Tensor>>& weights, const std::vector<std::string>& params,
                    c10::ArrayRef<double> values) {
  using namespace opt;
  const Call c(kSchema, slots, weights, params, values);
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(1) == 1 && x_in.size(0) >= 1, "opt_step: x must be [R, 1, E], got ",
              x_in.sizes());
  const int64_t R = x_in.size(0), E = x_in.size(2);
  TORCH_CHECK(position.numel() == R && position.scalar_type() == at::kLong, "opt_step: one int64 position per row");
  TORCH_CHECK((input_pos.numel() == 1 || input_pos.numel() == R) && input_pos.scalar_type() == at::kLong,
              "opt_step: one int64 cache slot, or one per row, got ", input_pos.numel(), " for ", R, " rows");
  TORCH_CHECK(key_valid.scalar_type() == at::kBool, "opt_step: key_valid must be bool");
  const int64_t layers = c.layers;
  TORCH_CHECK((int64_t)kv.size() == 2 * layers, "opt_step: ", kv.size(), " cache tensors for ", layers, " layers");
  const float eps = c.scalar(slot(kParams, "eps")), scaling = c.scalar(slot(kParams, "scaling"));
  const int64_t H = c.integer(slot(kParams, "heads")), act = c.integer(slot(kParams, "activation"));
  const bool pre_norm = c.integer(slot(kParams, "pre_norm")) != 0;
  const bool final_norm = c.integer(slot(kParams, "has_final_norm")) != 0;
  const bool hidden = c.integer(slot(kParams, "want_hidden")) != 0;
  const bool bf16 = is_bf16(x_in);
  const at::Tensor table = c.tensor(slot(kFirst, "embed_positions"));
  const int64_t D = table.size(1), dh = D / H;
  const at::Tensor ipc = input_pos.contiguous();
  std::vector<int64_t> pos(R);
  for (int64_t r = 0; r < R; ++r) pos[r] = ipc.data_ptr<int64_t>()[input_pos.numel() == 1 ? 0 : r];
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
  const Linear pin = c.linear(linear_slot(kFirst, "project_in"), E, bf16, R);
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
    const size_t w0 = c.layer(l);
    const View ln1w = c.view(w0 + slot(kLayer, "self_attn_norm.weight"));
    const View ln1b = c.view(w0 + slot(kLayer, "self_attn_norm.bias"));
    const View ln2w = c.view(w0 + slot(kLayer, "ffn_norm.weight")), ln2b = c.view(w0 + slot(kLayer, "ffn_norm.bias"));
    const Linear qkv = c.linear(w0 + linear_slot(kLayer, "qkv"), D, bf16, R);
    const Linear k = c.linear(w0 + linear_slot(kLayer, "k"), D, bf16, R);
    const Linear v = c.linear(w0 + linear_slot(kLayer, "v"), D, bf16, R);
    const Linear out = c.linear(w0 + linear_slot(kLayer, "out_proj"), D, bf16, R);
    const Linear fc1 = c.linear(w0 + linear_slot(kLayer, "fc1"), D, bf16, R);
    const Linear fc2 = c.linear(w0 + linear_slot(kLayer, "fc2"), -1, bf16, R);
    const bool split = k.present;  // q, k, v in three slots
    TORCH_CHECK(k.present == v.present && (split ? qkv.n == D && k.n == D && v.n == D : qkv.n == 3 * D) &&
                out.n == D && fc2.n == D && fc1.n == fc2.k, "opt_step: layer ", l, ": projection shapes do not fit");
    const Heads ck(kv[2 * l], R, "cached keys"), cv(kv[2 * l + 1], R, "cached values");
    TORCH_CHECK(ck.t.size(1) == H && ck.t.size(3) == dh && ck.t.size(2) == S && cv.t.sizes() == ck.t.sizes(),
                "opt_step: layer ", l, ": cache of ", ck.t.sizes(), " for ", S, " keys");

    if (pre_norm) norm(ln1w, ln1b, h.data());
    else std::copy(x.begin(), x.end(), h.begin());
    big.resize(R * 3 * D);
    st.linear({&qkv, &k, &v}, h.data(), R, big.data());
    for (int64_t r = 0; r < R; ++r)  // the query, scaled before the product
      for (int64_t i = 0; i < D; ++i) big[r * 3 * D + i] = st.round(big[r * 3 * D + i] * scaling);
    write_cache(ck, R, pos.data(), big.data() + D, 3 * D, H, dh);
    write_cache(cv, R, pos.data(), big.data() + 2 * D, 3 * D, H, dh);
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

  const size_t tail = c.last();
  const View fw = c.view(tail + slot(kLast, "final_norm.weight")), fb = c.view(tail + slot(kLast, "final_norm.bias"));
  std::vector<float> y(R * D);
  if (final_norm) norm(fw, fb, y.data());
  else std::copy(x.begin(), x.end(), y.begin());
  const Linear pout = c.linear(tail + linear_slot(kLast, "project_out"), D, bf16, R);
  std::vector<float> e;
  const float* last = y.data();
  if (pout.present) {
    e.resize(R * pout.n);
    st.linear(pout, y.data(), R, e.data());
    last = e.data();
  }
  if (hidden) return torch_from(pout.present ? e : y, R, pout.present ? pout.n : D);
  const Linear head = c.linear(tail + linear_slot(kLast, "lm_head"), pout.present ? pout.n : D, bf16, R);
  TORCH_CHECK(head.present, "opt_step: lm_head is missing");
  at::Tensor logits = at::empty({R, head.n}, x_in.options().dtype(at::kFloat));
  st.linear(head, last, R, logits.data_ptr<float>());
  return logits;
}

// The names a step op reads its weights and scalars by: (the slots in list order, a layer's once as
// "layers.<name>"; the scalars). Python builds its lists from them (blip2.fast.native).
std::tuple<std::vector<std::string>, std::vector<std::string>> step_schema(const std::string& op) {
  const Schema* schema = op == t5::kSchema.op ? &t5::kSchema : op == opt::kSchema.op ? &opt::kSchema : nullptr;
  TORCH_CHECK(schema != nullptr, "step_schema: no step op '", op, "' (t5_step, opt_step)");
  return {schema->slots, schema->params};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(blip2_kernels, m) {
  python_module(m, 0);
  m.def("step_schema(str op) -> (str[], str[])", &step_schema);
  m.def("t5_step(Tensor ids, Tensor input_pos, Tensor self_mask, Tensor cross_mask, Tensor[] kv, str[] slots, "
        "Tensor?[] weights, str[] params, float[] values) -> Tensor");
  m.def("opt_step(Tensor x, Tensor position, Tensor key_valid, Tensor[] kv, Tensor input_pos, str[] slots, "
        "Tensor?[] weights, str[] params, float[] values) -> Tensor");
}

TORCH_LIBRARY_IMPL(blip2_kernels, CPU, m) {
  m.impl("t5_step", &t5_step);
  m.impl("opt_step", &opt_step);
}
