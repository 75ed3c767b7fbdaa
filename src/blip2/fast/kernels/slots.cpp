// A decoding step's weights and scalars by name.
//
// Each step op (steps.cpp) declares its schema: the names of the slots of its weight list in list order
// (the slots before the layers, one layer's, the slots after the layers; the list repeats the layer's
// slots once per layer) and the names of its scalars. The op reads a slot at an index found from its name
// while compiling (slot(), linear_slot(): consteval, so a name not in the schema does not compile), so what
// a slot is called and what the op reads there cannot drift apart.
//
// Python asks for the names (blip2_kernels::step_schema), builds the lists from its tensors and scalars
// by name, and sends the names along with every call; Call checks them against the schema before anything
// is read, naming the first slot or scalar that differs. A reordered, missing or extra slot or scalar is
// an error, never a wrong read.
//
// Included by steps.cpp after decode.cpp (View, Linear).

#include <span>
#include <string>
#include <string_view>

namespace {

using Names = std::span<const std::string_view>;

// the prefix of a layer's slot in the names a call sends, e.g. "layers.qkv.weight"
constexpr std::string_view kLayerPrefix = "layers.";

// The index of `name` in `names`, found while compiling.
consteval size_t slot(Names names, std::string_view name) {
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return i;
  throw "no such slot";  // a throw in a consteval function: a compile error here
}

consteval bool is_part(std::string_view name, std::string_view layer, std::string_view part) {
  return name.size() == layer.size() + 1 + part.size() && name.starts_with(layer) && name[layer.size()] == '.' &&
         name.ends_with(part);
}

// The index of linear layer `layer`'s slots: <layer>.weight, then .scale and .bias (Linear's three parts).
consteval size_t linear_slot(Names names, std::string_view layer) {
  for (size_t i = 0; i + 2 < names.size(); ++i)
    if (is_part(names[i], layer, "weight")) {
      if (!is_part(names[i + 1], layer, "scale") || !is_part(names[i + 2], layer, "bias"))
        throw "a linear layer's slots are <layer>.weight, <layer>.scale, <layer>.bias";
      return i;
    }
  throw "no such linear layer";
}

// An op's schema as the names a call sends: every slot once (a layer's with kLayerPrefix) and the scalars.
struct Schema {
  std::string op;
  size_t first, per_layer, last;   // slots before the layers, in each layer, after them
  std::vector<std::string> slots;  // in list order
  std::vector<std::string> params;

  Schema(std::string_view op, Names first, Names layer, Names last, Names params)
      : op(op), first(first.size()), per_layer(layer.size()), last(last.size()),
        params(params.begin(), params.end()) {
    slots.assign(first.begin(), first.end());
    for (std::string_view n : layer) slots.push_back(std::string(kLayerPrefix) + std::string(n));
    slots.insert(slots.end(), last.begin(), last.end());
  }
};

// Names sent by a call against the schema's, in order: the first that differs is the error.
void check_names(const std::string& op, const char* kind, const std::vector<std::string>& got,
                 const std::vector<std::string>& want) {
  for (size_t i = 0; i < std::max(got.size(), want.size()); ++i) {
    TORCH_CHECK(i < got.size(), op, ": the call has no ", kind, " '", want[i], "' (", kind, " ", i, " of the ",
                want.size(), " in blip2_kernels::step_schema('", op, "'))");
    TORCH_CHECK(i < want.size(), op, ": ", kind, " ", i, " '", got[i], "' is not one the op reads (it reads ",
                want.size(), ": blip2_kernels::step_schema('", op, "'))");
    TORCH_CHECK(got[i] == want[i], op, ": ", kind, " ", i, " is '", got[i], "' where the op reads '", want[i],
                "' (blip2_kernels::step_schema('", op, "') gives the names in order)");
  }
}

// One call's weight list and scalar values, their names checked against the op's schema; read by index
// (slot(), linear_slot() of the schema's names, plus layer(l) or last() for the slots of a layer or after
// the layers). Messages name the slot, e.g. "layers.2.qkv.weight".
struct Call {
  const Schema& s;
  const c10::List<std::optional<at::Tensor>>& list;
  c10::ArrayRef<double> values;
  int64_t layers = 0;

  Call(const Schema& schema, const std::vector<std::string>& slots, const c10::List<std::optional<at::Tensor>>& weights,
       const std::vector<std::string>& params, c10::ArrayRef<double> values)
      : s(schema), list(weights), values(values) {
    check_names(s.op, "slot", slots, s.slots);
    check_names(s.op, "scalar", params, s.params);
    TORCH_CHECK(values.size() == params.size(), s.op, ": ", values.size(), " values for ", params.size(), " scalars");
    const size_t n = weights.size(), ends = s.first + s.last;
    TORCH_CHECK(n >= ends && (n - ends) % s.per_layer == 0, s.op, ": ", n, " weights is not ", s.first, " + ",
                s.per_layer, " per layer + ", s.last);
    layers = (n - ends) / s.per_layer;
  }

  size_t layer(int64_t l) const { return s.first + l * s.per_layer; }  // layer l's first slot
  size_t last() const { return layer(layers); }                        // the first slot after the layers

  std::string name(size_t i) const {
    if (i < s.first) return s.slots[i];
    if (i >= last()) return s.slots[s.first + s.per_layer + (i - last())];
    const size_t j = i - s.first;
    return std::string(kLayerPrefix) + std::to_string(j / s.per_layer) + "." +
           s.slots[s.first + j % s.per_layer].substr(kLayerPrefix.size());
  }

  float scalar(size_t i) const { return static_cast<float>(values[i]); }
  int64_t integer(size_t i) const {
    TORCH_CHECK(values[i] == std::trunc(values[i]), s.op, ": ", s.params[i], " must be a whole number, got ",
                values[i]);
    return static_cast<int64_t>(values[i]);
  }

  at::Tensor tensor(size_t i) const {
    TORCH_CHECK(list.get(i).has_value(), s.op, ": weight ", name(i), " is missing");
    return *list.get(i);
  }
  View view(size_t i) const { return list.get(i).has_value() ? View(*list.get(i)) : View(); }

  // Slots [i, i+3) as a linear layer (absent when the weight is None) for `rows` rows of `k_expected`
  // inputs (any where negative) in the activation dtype (bf16, else float32).
  Linear linear(size_t i, int64_t k_expected, bool bf16, int64_t rows) const {
    Linear l;
    if (!list.get(i).has_value()) return l;
    l.w = *list.get(i);
    const auto wt = l.w.scalar_type();
    std::optional<at::Tensor> sc = list.get(i + 1), b = list.get(i + 2);
    TORCH_CHECK(l.w.is_contiguous() && l.w.device().is_cpu(), s.op, ": weight ", name(i),
                " must be a contiguous CPU tensor");
    l.blocked = l.w.dim() != 2;
    if (l.blocked) {
      const int64_t per = wt == at::kFloat ? 1 : 2;
      TORCH_CHECK((wt == at::kFloat && l.w.dim() == 3 && l.w.size(2) == blocked::kBlock) ||
                  (wt == at::kBFloat16 && l.w.dim() == 4 && l.w.size(2) == blocked::kBlock && l.w.size(3) == 2),
                  s.op, ": weight ", name(i), " must be [N, K] or blocked (float32 [NB, K, 16], bfloat16 ",
                  "[NB, K/2, 16, 2]), got ", wt, " ", l.w.sizes());
      TORCH_CHECK(wt != at::kBFloat16 || blocked::bf16_dot(), s.op, ": blocked bfloat16 weights need AVX-512 BF16");
      TORCH_CHECK(b.has_value(), s.op, ": blocked weight ", name(i),
                  " needs its bias (zeros where the layer has none)");
      TORCH_CHECK(!sc.has_value(), s.op, ": blocked weight ", name(i), " takes no scale");
      l.n = b->numel();
      l.k = l.w.size(1) * per;
      if (per == 2 && k_expected == l.k - 1) l.k = k_expected;  // an odd K, padded to whole pairs
      TORCH_CHECK(l.n > (l.w.size(0) - 1) * blocked::kBlock && l.n <= l.w.size(0) * blocked::kBlock, s.op,
                  ": blocked weight ", name(i), " of ", l.w.size(0), " blocks with a bias of ", l.n);
    } else {
      TORCH_CHECK(l.w.dim() == 2, s.op, ": weight ", name(i), " must be a contiguous CPU [N, K], got ", l.w.sizes());
      l.n = l.w.size(0);
      l.k = l.w.size(1);
    }
    TORCH_CHECK(wt == (bf16 ? at::kBFloat16 : at::kFloat) || (wt == at::kChar && !l.blocked), s.op, ": weight ",
                name(i), " is ", wt, ", expected int8 or the activations' ", (bf16 ? "bfloat16" : "float32"));
    TORCH_CHECK(k_expected < 0 || l.k == k_expected, s.op, ": weight ", name(i), " takes ", l.k,
                " inputs, expected ", k_expected);
    for (const auto* t : {&sc, &b})
      TORCH_CHECK(!t->has_value() || ((*t)->numel() == l.n && (*t)->is_contiguous() && (*t)->device().is_cpu() &&
                                      ((*t)->scalar_type() == at::kFloat || (*t)->scalar_type() == at::kBFloat16)),
                  s.op, ": scale/bias of weight ", name(i), " must be contiguous float32/bfloat16 CPU [", l.n, "]");
    TORCH_CHECK(wt != at::kChar || sc.has_value(), s.op, ": int8 weight ", name(i), " needs a scale");
    // several rows read each weight once only from the blocked layout
    TORCH_CHECK(rows == 1 || l.blocked, s.op, ": ", rows, " rows need blocked weights, weight ", name(i),
                " is [N, K]");
    l.scale = Vector(sc);
    l.bias = Vector(b);
    l.present = true;
    return l;
  }
};

}  // namespace
