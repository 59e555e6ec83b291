// A decode layer of an int4 model in two calls, and decode attention read from the paged KV pool in place
// (ttc/kernels/int4_cpu.py: FusedLayer, paged_partial). AVX2 + FMA, built with int4_cpu.cpp as one extension.
#include "int4_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

// --- a decode layer in two calls (int4 models on these kernels) ---------------------------------------------
// Why: a layer's eager path between two attention calls is ~20 PyTorch ops from Python (projections, rotary's
// five, two KV writes, residual adds, norms, SiLU), each a few microseconds of dispatch: at one stream about as
// long as the layer's matmuls. These two calls do the same arithmetic in the same order as that path
// (ttc/decoder/model.py's eager forward, their twin), so their results are its results bit for bit: rotary as
// separate products and a sum (this file is built with -ffp-contract=off, so no compiler FMA changes a rounding),
// SiLU and its product through ATen's own kernels (its vectorized exp is not libm's).

// qkv (T, (Hq + 2 Hkv) D) in T_ (float or bfloat16) -> q (T, Hq, D): rotary on q and k from the rows' cos, sin
// (T, D/2) float32 (out = [x1 c - x2 s, x2 c + x1 s] for the halves x1, x2, in float32, rounded once to T_ as
// the eager path's .to(dtype) does), and k, v written to the caches (S, Hkv, D) at slots (T,).
template <typename T_>
torch::Tensor rotary_and_write(const torch::Tensor& qkv_in, const torch::Tensor& cos, const torch::Tensor& sin,
                               torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                               int64_t Hq, int64_t Hkv) {
  const auto dtype = qkv_in.scalar_type();
  const int64_t T = qkv_in.size(0);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == dtype &&
              v_cache.scalar_type() == dtype && k_cache.size(1) == Hkv,
              "attn_in: k_cache and v_cache must be (S, Hkv, D) in the activations' dtype, contiguous");
  const int64_t S = k_cache.size(0), D = k_cache.size(2), half = D / 2, W = (Hq + 2 * Hkv) * D;
  TORCH_CHECK(D % 2 == 0 && qkv_in.size(1) == W, "attn_in: the projection's width is not (Hq + 2 Hkv) * D");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat32 &&
              sin.scalar_type() == torch::kFloat32 && cos.dim() == 2 && cos.size(0) == T && cos.size(1) == half &&
              sin.sizes() == cos.sizes(), "attn_in: cos and sin must be (T, D/2) float32, contiguous");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == T && slots.scalar_type() == torch::kLong,
              "attn_in: slots must be (T,) int64");
  auto q = torch::empty({T, Hq, D}, qkv_in.options());
  auto slots_c = slots.contiguous();
  auto qkv = qkv_in.contiguous();
  const int64_t* sp = slots_c.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; t++) TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "attn_in: a slot is outside the cache");
  const T_* src = qkv.data_ptr<T_>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  T_* qp = q.data_ptr<T_>();
  T_* kp = k_cache.data_ptr<T_>();
  T_* vp = v_cache.data_ptr<T_>();
  for (int64_t t = 0; t < T; t++) {
    const float* c = cp + t * half;
    const float* s = snp + t * half;
    const T_* row = src + t * W;
    for (int64_t head = 0; head < Hq + Hkv; head++) {
      const T_* x = row + head * D;
      T_* out = head < Hq ? qp + (t * Hq + head) * D : kp + (sp[t] * Hkv + head - Hq) * D;
      for (int64_t j = 0; j < half; j++) {
        const float x1 = static_cast<float>(x[j]), x2 = static_cast<float>(x[j + half]);
        out[j] = T_(x1 * c[j] - x2 * s[j]);  // bfloat16: rounded to nearest even, as .to(bfloat16)
        out[j + half] = T_(x2 * c[j] + x1 * s[j]);
      }
    }
    std::memcpy(vp + sp[t] * Hkv * D, row + (Hq + Hkv) * D, sizeof(T_) * Hkv * D);
  }
  return q;
}

// h (T, H) float32 -> q (T, Hq, D): the qkv projection on ttc's int4 kernel (+ bias), then `rotary_and_write`.
torch::Tensor attn_in(const torch::Tensor& h, const torch::Tensor& nibbles, const torch::Tensor& d,
                      const torch::Tensor& m, const c10::optional<torch::Tensor>& bias, const torch::Tensor& cos,
                      const torch::Tensor& sin, torch::Tensor k_cache, torch::Tensor v_cache,
                      const torch::Tensor& slots, int64_t num_heads, int64_t num_kv_heads) {
  auto qkv = int4_linear(h, nibbles, d, m);
  if (bias.has_value()) qkv.add_(*bias);  // Qwen2's qkv bias: the eager path's _add_bias, one ATen op
  return rotary_and_write<float>(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads);
}

// After attention: x += o(a); h = norm(x); x += down(silu(gate) * up) for [gate, up] = gate_up(h);
// returns (x, next_norm(x)). a (T, Hq*D), x (T, H) (not modified).
std::tuple<torch::Tensor, torch::Tensor> attn_out_mlp(
    const torch::Tensor& a, const torch::Tensor& x, const torch::Tensor& o_nibbles, const torch::Tensor& o_d,
    const torch::Tensor& o_m, const torch::Tensor& mlp_norm, const torch::Tensor& gate_up_nibbles,
    const torch::Tensor& gate_up_d, const torch::Tensor& gate_up_m, const torch::Tensor& down_nibbles,
    const torch::Tensor& down_d, const torch::Tensor& down_m, const torch::Tensor& next_norm, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "attn_out_mlp: x must be (T, H) float32, contiguous");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(mlp_norm.numel() == H && next_norm.numel() == H && mlp_norm.is_contiguous() &&
              next_norm.is_contiguous() && H % 8 == 0, "attn_out_mlp: norms must be (H,) float32, H a multiple of 8");
  auto mid = int4_linear(a, o_nibbles, o_d, o_m);  // (T, H), then x + o(a) in place
  TORCH_CHECK(mid.size(1) == H, "attn_out_mlp: o's output is not H wide");
  float* mp = mid.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < T * H; i++) mp[i] = xp[i] + mp[i];
  auto h = torch::empty({T, H}, x.options());
  rms_norm_rows(mp, mlp_norm.data_ptr<float>(), h.data_ptr<float>(), T, H, eps);
  auto gate_up = int4_linear(h, gate_up_nibbles, gate_up_d, gate_up_m);  // (T, 2I)
  const int64_t I = gate_up.size(1) / 2;
  auto act = at::silu(gate_up.narrow(1, 0, I)).mul_(gate_up.narrow(1, I, I));  // as F.silu(gate) * up
  auto out = int4_linear(act, down_nibbles, down_d, down_m);  // (T, H), then x + down(...)
  TORCH_CHECK(out.size(1) == H, "attn_out_mlp: down's output is not H wide");
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < T * H; i++) op[i] = mp[i] + op[i];
  auto next = torch::empty({T, H}, x.options());
  rms_norm_rows(op, next_norm.data_ptr<float>(), next.data_ptr<float>(), T, H, eps);
  return {out, next};
}

// --- decode attention straight from the paged pool (the same models) ------------------------------------------
// q (b, Hkv, G, D) float32 or bfloat16 (the caches' dtype): one query row per sequence, grouped by KV head; slots (b, P) each row's pool slots; bias
// (b, P): 0 or -inf (padding). Returns the softmax state (o (b, Hkv, G, D), lse (b, Hkv, G)) that the cascade
// merges with its shared segments (ttc/kernels/attention.py). Why: the eager private part is two gathers into
// a workspace, two permutes and ATen's flash kernel, ~10 ops and a thread launch a layer (at one stream ~45 us
// for ~150 keys); this reads each key and value row once where it lies. Scores are float32 dot products of
// 8-wide FMAs, exp is libm's: the rounding is not the flash kernel's (tests compare them within float32 error).
// A row with no valid key gets (0, -inf), as the reference defines it.
template <typename T>
void paged_attention_rows(const T* qp, const T* kp, const T* vp, const int64_t* sp, const float* bp, float* op,
                          float* lp, int64_t b, int64_t Hkv, int64_t G, int64_t D, int64_t P, float scale) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t work = std::max<int64_t>(1, P * G * D);
  at::parallel_for(0, b * Hkv, std::max<int64_t>(1, 65536 / work), [&](int64_t i0, int64_t i1) {  // small: inline
    std::vector<float> scores(G * P);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t row = i / Hkv, head = i % Hkv;
      const T* qr = qp + i * G * D;
      for (int64_t p = 0; p < P; p++) {
        const float bias_p = bp[row * P + p];
        const T* kr = kp + (sp[row * P + p] * Hkv + head) * D;
        for (int64_t g = 0; g < G; g++) {
          if (bias_p == neg_inf) { scores[g * P + p] = neg_inf; continue; }
          __m256 acc = _mm256_setzero_ps();
          for (int64_t j = 0; j < D; j += 8) acc = _mm256_fmadd_ps(load8(qr + g * D + j), load8(kr + j), acc);
          scores[g * P + p] = hsum(acc) * scale + bias_p;
        }
      }
      for (int64_t g = 0; g < G; g++) {
        float* s = scores.data() + g * P;
        float top = neg_inf;
        for (int64_t p = 0; p < P; p++) top = std::max(top, s[p]);
        if (top == neg_inf) { lp[i * G + g] = neg_inf; continue; }  // no valid key: o stays 0
        float total = 0.f;
        for (int64_t p = 0; p < P; p++) { s[p] = std::exp(s[p] - top); total += s[p]; }
        float* out = op + (i * G + g) * D;
        for (int64_t p = 0; p < P; p++) {
          if (s[p] == 0.f) continue;
          const __m256 w = _mm256_set1_ps(s[p] / total);
          const T* vr = vp + (sp[row * P + p] * Hkv + head) * D;
          for (int64_t j = 0; j < D; j += 8)
            _mm256_storeu_ps(out + j, _mm256_fmadd_ps(w, load8(vr + j), _mm256_loadu_ps(out + j)));
        }
        lp[i * G + g] = top + std::log(total);
      }
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                                         const torch::Tensor& v_cache, const torch::Tensor& slots,
                                                         const torch::Tensor& bias, double scale) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(q.dim() == 4 && (dtype == torch::kFloat32 || dtype == torch::kBFloat16),
              "paged_attention: q must be (b, Hkv, G, D) float32 or bfloat16");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype,
              "paged_attention: caches must be (S, Hkv, D) in q's dtype, contiguous");
  const int64_t b = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3), S = k_cache.size(0);
  TORCH_CHECK(k_cache.size(1) == Hkv && k_cache.size(2) == D && D % 8 == 0,
              "paged_attention: q's heads and dim must match the caches', D a multiple of 8");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == b && slots.scalar_type() == torch::kLong &&
              bias.dim() == 2 && bias.sizes() == slots.sizes() && bias.scalar_type() == torch::kFloat32,
              "paged_attention: slots (b, P) int64 and bias (b, P) float32");
  const int64_t P = slots.size(1);
  auto qc = q.contiguous();
  auto sc = slots.contiguous();
  auto bc = bias.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t i = 0; i < b * P; i++) TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "paged_attention: a slot is outside the cache");
  auto f32 = q.options().dtype(torch::kFloat32);
  auto o = torch::zeros({b, Hkv, G, D}, f32);
  auto lse = torch::empty({b, Hkv, G}, f32);
  if (dtype == torch::kFloat32)
    paged_attention_rows<float>(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), sp,
                                bc.data_ptr<float>(), o.data_ptr<float>(), lse.data_ptr<float>(), b, Hkv, G, D, P,
                                static_cast<float>(scale));
  else
    paged_attention_rows<c10::BFloat16>(qc.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(),
                                        v_cache.data_ptr<c10::BFloat16>(), sp, bc.data_ptr<float>(),
                                        o.data_ptr<float>(), lse.data_ptr<float>(), b, Hkv, G, D, P,
                                        static_cast<float>(scale));
  return {o, lse};
}

// --- the fused layer for int4 with bfloat16 activations (PyTorch's int4 kernel) ------------------------------
// The same calls as the eager bfloat16 layer (ttc/kernels/quant.py's int4_linear, the SiLU product, the
// residual adds), made from C++ (a dispatch each, no Python); its norms are int4_cpu.cpp's one-pass RMSNorm, as
// the eager layer's are in these models; rotary and the K/V writes as loops in float32 rounded once to
// bfloat16, as the eager path's float32 rotary and .to(bfloat16) do.

torch::Tensor int4pack_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& sz) {
  return at::_weight_int4pack_mm_for_cpu(x.contiguous(), packed, x.size(1) / sz.size(0), sz);
}

torch::Tensor rms_norm_bf16(const torch::Tensor& x, const torch::Tensor& w, double eps) {  // as int4_cpu.rms_norm
  auto y = torch::empty_like(x);
  rms_norm_rows(x.data_ptr<c10::BFloat16>(), w.data_ptr<float>(), y.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), eps);
  return y;
}

// h (T, H) bfloat16 -> q (T, Hq, D): the qkv projection on PyTorch's int4 kernel (+ bias), then `rotary_and_write`.
torch::Tensor attn_in_bf16(const torch::Tensor& h, const torch::Tensor& packed, const torch::Tensor& sz,
                           const c10::optional<torch::Tensor>& bias, const torch::Tensor& cos, const torch::Tensor& sin,
                           torch::Tensor k_cache, torch::Tensor v_cache, const torch::Tensor& slots, int64_t num_heads,
                           int64_t num_kv_heads) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kBFloat16, "attn_in_bf16: h must be (T, H) bfloat16");
  auto qkv = int4pack_linear(h, packed, sz);
  if (bias.has_value()) qkv = qkv + bias->to(qkv.scalar_type());
  return rotary_and_write<c10::BFloat16>(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads);
}

std::tuple<torch::Tensor, torch::Tensor> attn_out_mlp_bf16(
    const torch::Tensor& a, const torch::Tensor& x, const torch::Tensor& o_packed, const torch::Tensor& o_sz,
    const torch::Tensor& mlp_norm, const torch::Tensor& gate_up_packed, const torch::Tensor& gate_up_sz,
    const torch::Tensor& down_packed, const torch::Tensor& down_sz, const torch::Tensor& next_norm, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "attn_out_mlp_bf16: x must be (T, H) bfloat16");
  auto mid = x + int4pack_linear(a, o_packed, o_sz);
  auto gate_up = int4pack_linear(rms_norm_bf16(mid, mlp_norm, eps), gate_up_packed, gate_up_sz);
  const int64_t I = gate_up.size(1) / 2;
  auto out = mid + int4pack_linear(at::silu(gate_up.narrow(1, 0, I)) * gate_up.narrow(1, I, I), down_packed, down_sz);
  return {out, rms_norm_bf16(out, next_norm, eps)};
}

TORCH_LIBRARY_FRAGMENT(ttc_cpu, lib) {
  lib.def("attn_in(Tensor h, Tensor nibbles, Tensor d, Tensor m, Tensor? bias, Tensor cos, Tensor sin, "
          "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, int num_heads, int num_kv_heads) -> Tensor");
  lib.def("attn_out_mlp(Tensor a, Tensor x, Tensor o_nibbles, Tensor o_d, Tensor o_m, Tensor mlp_norm, "
          "Tensor gate_up_nibbles, Tensor gate_up_d, Tensor gate_up_m, Tensor down_nibbles, Tensor down_d, "
          "Tensor down_m, Tensor next_norm, float eps) -> (Tensor, Tensor)");
  lib.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor bias, float scale) "
          "-> (Tensor, Tensor)");
  lib.def("attn_in_bf16(Tensor h, Tensor packed, Tensor scales_and_zeros, Tensor? bias, Tensor cos, Tensor sin, "
          "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, int num_heads, int num_kv_heads) -> Tensor");
  lib.def("attn_out_mlp_bf16(Tensor a, Tensor x, Tensor o_packed, Tensor o_sz, Tensor mlp_norm, "
          "Tensor gate_up_packed, Tensor gate_up_sz, Tensor down_packed, Tensor down_sz, Tensor next_norm, "
          "float eps) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(ttc_cpu, CPU, lib) {
  lib.impl("attn_in", &attn_in);
  lib.impl("attn_out_mlp", &attn_out_mlp);
  lib.impl("paged_attention", &paged_attention);
  lib.impl("attn_in_bf16", &attn_in_bf16);
  lib.impl("attn_out_mlp_bf16", &attn_out_mlp_bf16);
}
