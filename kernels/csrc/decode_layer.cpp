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
// w4a8: every linear here and in attn_out_mlp is the W4A8 one (int4_q8.cpp), as the model's eager linears are.
torch::Tensor attn_in(const torch::Tensor& h, const torch::Tensor& nibbles, const torch::Tensor& d,
                      const torch::Tensor& m, const c10::optional<torch::Tensor>& bias, const torch::Tensor& cos,
                      const torch::Tensor& sin, torch::Tensor k_cache, torch::Tensor v_cache,
                      const torch::Tensor& slots, int64_t num_heads, int64_t num_kv_heads, bool w4a8) {
  auto qkv = w4a8 ? int4_q8_linear(h, nibbles, d, m) : int4_linear(h, nibbles, d, m);
  if (bias.has_value()) qkv.add_(*bias);  // Qwen2's qkv bias: the eager path's _add_bias, one ATen op
  return rotary_and_write<float>(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads);
}

// After attention: x + o(a) = mid; h = norm(mid); out = mid + down(silu(gate) * up) for [gate, up] = gate_up(h);
// returns (out, next_norm(out)). a (T, Hq*D), x (T, H) (not modified); `linear(input, layer)` is the int4 matmul
// of the activations' dtype, layer 0, 1, 2 = o, gate_up, down. The eager layer's ATen ops (the residual adds,
// SiLU and its product) and its norm (`rms_norm`, int4_cpu.cpp), in its order.
template <typename Linear>
std::tuple<torch::Tensor, torch::Tensor> mlp_block(const torch::Tensor& a, const torch::Tensor& x, Linear linear,
                                                   const torch::Tensor& mlp_norm, const torch::Tensor& next_norm,
                                                   double eps) {
  TORCH_CHECK(x.dim() == 2 && a.dim() == 2 && a.scalar_type() == x.scalar_type(),
              "attn_out_mlp: a (T, Hq*D) and x (T, H) must be 2-D, in one dtype");
  auto mid = x + linear(a, 0);
  auto gate_up = linear(rms_norm(mid, mlp_norm, eps), 1);  // (T, 2I)
  const int64_t I = gate_up.size(1) / 2;
  auto out = mid + linear(at::silu(gate_up.narrow(1, 0, I)) * gate_up.narrow(1, I, I), 2);  // as F.silu(gate) * up
  return {out, rms_norm(out, next_norm, eps)};
}

std::tuple<torch::Tensor, torch::Tensor> attn_out_mlp(
    const torch::Tensor& a, const torch::Tensor& x, const torch::Tensor& o_nibbles, const torch::Tensor& o_d,
    const torch::Tensor& o_m, const torch::Tensor& mlp_norm, const torch::Tensor& gate_up_nibbles,
    const torch::Tensor& gate_up_d, const torch::Tensor& gate_up_m, const torch::Tensor& down_nibbles,
    const torch::Tensor& down_d, const torch::Tensor& down_m, const torch::Tensor& next_norm, double eps, bool w4a8) {
  const torch::Tensor* weights[3][3] = {{&o_nibbles, &o_d, &o_m}, {&gate_up_nibbles, &gate_up_d, &gate_up_m},
                                        {&down_nibbles, &down_d, &down_m}};
  auto linear = [&](const torch::Tensor& input, int layer) {
    return w4a8 ? int4_q8_linear(input, *weights[layer][0], *weights[layer][1], *weights[layer][2])
                : int4_linear(input, *weights[layer][0], *weights[layer][1], *weights[layer][2]);
  };
  return mlp_block(a, x, linear, mlp_norm, next_norm, eps);
}

// exp of 8 floats <= 0 (scores minus their row's maximum), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
// polynomial in r, times 2^n; within 2 ulp of libm's. Below -87 (and -inf, a masked key) it gives 0, where libm
// gives a denormal under 1.7e-38 of the row's top weight (or 0). Why not libm's expf: one call per score was
// most of this kernel's time (~15 cycles each, three query heads per key).
inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 floor = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, floor, _CMP_LT_OQ);
  x = _mm256_max_ps(x, floor);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * the first
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(two_n)));
}

// The sums of 8 vectors' lanes: lane e of the result is the sum of a[e]'s 8 lanes (a tree of horizontal adds).
inline __m256 hsum8x8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // [0-3 low halves | 0-3 high], [4-7 ...]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// --- decode attention straight from the paged pool (the same models) ------------------------------------------
// q (b, Hkv, G, D) float32 or bfloat16 (the caches' dtype): one query row per sequence, grouped by KV head;
// slots (b, P) each row's pool slots; bias (b, P) float32 or bfloat16: 0 or -inf (padding). Returns the
// softmax state (o (b, Hkv, G, D), lse (b, Hkv, G)) that the cascade merges with its shared segments
// (ttc/kernels/attention.py). Why: the eager private part is two gathers into a workspace, two permutes and
// ATen's flash kernel, ~10 ops and a thread launch a layer (at one stream ~45 us for ~150 keys); this reads each key and value row once where it lies. Scores are float32 dot products of
// 8-wide FMAs, exp is `exp_nonpositive8`: the rounding is not the flash kernel's (tests compare them within
// float32 error).
// A row with no valid key gets (0, -inf), as the reference defines it.

// out[g] = sum over the valid keys, in key order, of weight[g] * v, for GN query heads at once (weights: scores,
// G rows of P8): 8 dims at a time in GN registers, so each value row is read once for all of them.
template <int GN, typename T, typename Bias>
inline void weighted_values(const T* vp, const int64_t* slots, const Bias* bias, const float* weights, float* out,
                            int64_t Hkv, int64_t head, int64_t D, int64_t P, int64_t P8) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < D; j += 8) {
    __m256 acc[GN];
    for (int g = 0; g < GN; g++) acc[g] = _mm256_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
      if (static_cast<float>(bias[p]) == neg_inf) continue;
      const __m256 v = load8(vp + (slots[p] * Hkv + head) * D + j);
      for (int g = 0; g < GN; g++) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(weights[g * P8 + p]), v, acc[g]);
    }
    for (int g = 0; g < GN; g++) _mm256_storeu_ps(out + g * D + j, acc[g]);
  }
}

// One (row, KV head): its G query heads against the row's P keys. GT: G known when compiled (1-8), so the G
// output accumulators stay in registers and each value row is read once for all of them (`weighted_values`);
// 0: any G, one head at a time. Scores 8 keys at a time (`hsum8x8`), exp 8 at a time, sums in key order.
template <int GT, typename T, typename Bias>
inline void paged_attention_head(const T* qr, const T* kp, const T* vp, const int64_t* slots, const Bias* bias,
                                 float* out, float* lse, int64_t Hkv, int64_t head, int64_t G, int64_t D,
                                 int64_t P, int64_t P8, float scale, float* scores) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t p0 = 0; p0 < P8; p0 += 8) {
    alignas(32) float bias8[8];
    for (int e = 0; e < 8; e++) bias8[e] = p0 + e < P ? static_cast<float>(bias[p0 + e]) : neg_inf;
    const __m256 bias_v = _mm256_load_ps(bias8), scale_v = _mm256_set1_ps(scale);
    for (int64_t g = 0; g < G; g++) {
      __m256 part[8];
      for (int e = 0; e < 8; e++) {
        part[e] = _mm256_setzero_ps();
        if (bias8[e] == neg_inf) continue;  // padding, or past P
        const T* kr = kp + (slots[p0 + e] * Hkv + head) * D;
        for (int64_t j = 0; j < D; j += 8) part[e] = _mm256_fmadd_ps(load8(qr + g * D + j), load8(kr + j), part[e]);
      }
      _mm256_storeu_ps(scores + g * P8 + p0, _mm256_add_ps(_mm256_mul_ps(hsum8x8(part), scale_v), bias_v));
    }
  }
  for (int64_t g = 0; g < G; g++) {  // softmax weights, in place of the scores
    float* s = scores + g * P8;
    float top = neg_inf;
    for (int64_t p = 0; p < P; p++) top = std::max(top, s[p]);
    if (top == neg_inf) { lse[g] = neg_inf; std::fill(s, s + P8, 0.f); continue; }  // no valid key: o is 0
    const __m256 topv = _mm256_set1_ps(top);
    for (int64_t p = 0; p < P8; p += 8)
      _mm256_storeu_ps(s + p, exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + p), topv)));
    float total = 0.f;
    for (int64_t p = 0; p < P; p++) total += s[p];  // in key order
    for (int64_t p = 0; p < P; p++) s[p] = s[p] / total;
    lse[g] = top + std::log(total);
  }
  if constexpr (GT > 0) {
    weighted_values<GT>(vp, slots, bias, scores, out, Hkv, head, D, P, P8);
  } else {
    for (int64_t g = 0; g < G; g++) weighted_values<1>(vp, slots, bias, scores + g * P8, out + g * D, Hkv, head, D, P, P8);
  }
}

template <typename T, typename Bias>
void paged_attention_rows(const T* qp, const T* kp, const T* vp, const int64_t* sp, const Bias* bp, float* op,
                          float* lp, int64_t b, int64_t Hkv, int64_t G, int64_t D, int64_t P, float scale) {
  const int64_t work = std::max<int64_t>(1, P * G * D);
  const int64_t P8 = (P + 7) / 8 * 8;  // scores padded to whole vectors
  at::parallel_for(0, b * Hkv, std::max<int64_t>(1, 65536 / work), [&](int64_t i0, int64_t i1) {  // small: inline
    std::vector<float> scores(G * P8);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t row = i / Hkv, head = i % Hkv;
      auto run = [&](auto g_known) {
        paged_attention_head<decltype(g_known)::value>(qp + i * G * D, kp, vp, sp + row * P, bp + row * P,
                                                        op + i * G * D, lp + i * G, Hkv, head, G, D, P, P8, scale,
                                                        scores.data());
      };
      switch (G) {  // GQA's usual group sizes compiled, so their accumulators stay in registers
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        case 4: run(std::integral_constant<int, 4>{}); break;
        case 5: run(std::integral_constant<int, 5>{}); break;
        case 6: run(std::integral_constant<int, 6>{}); break;
        case 7: run(std::integral_constant<int, 7>{}); break;
        case 8: run(std::integral_constant<int, 8>{}); break;
        default: run(std::integral_constant<int, 0>{}); break;
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
              bias.dim() == 2 && bias.sizes() == slots.sizes() &&
              (bias.scalar_type() == torch::kFloat32 || bias.scalar_type() == torch::kBFloat16),
              "paged_attention: slots (b, P) int64 and bias (b, P) float32 or bfloat16");
  const int64_t P = slots.size(1);
  auto qc = q.contiguous();
  auto sc = slots.contiguous();
  auto bc = bias.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  for (int64_t i = 0; i < b * P; i++) TORCH_CHECK(sp[i] >= 0 && sp[i] < S, "paged_attention: a slot is outside the cache");
  auto f32 = q.options().dtype(torch::kFloat32);
  auto o = torch::empty({b, Hkv, G, D}, f32);  // every entry written
  auto lse = torch::empty({b, Hkv, G}, f32);
  // the bias in the plan's dtype (the model's) or float32: read as it is, not converted once per layer
  const float scale_f = static_cast<float>(scale);
  auto run = [&](auto* q_rows, auto* k_rows, auto* v_rows) {
    if (bc.scalar_type() == torch::kFloat32)
      paged_attention_rows(q_rows, k_rows, v_rows, sp, bc.data_ptr<float>(), o.data_ptr<float>(),
                           lse.data_ptr<float>(), b, Hkv, G, D, P, scale_f);
    else
      paged_attention_rows(q_rows, k_rows, v_rows, sp, bc.data_ptr<c10::BFloat16>(), o.data_ptr<float>(),
                           lse.data_ptr<float>(), b, Hkv, G, D, P, scale_f);
  };
  if (dtype == torch::kFloat32)
    run(qc.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  else
    run(qc.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>());
  return {o, lse};
}

// --- the fused layer for int4 with bfloat16 activations (PyTorch's int4 kernel) ------------------------------
// PyTorch's int4 matmul (ttc/kernels/quant.py's int4_linear) in `rotary_and_write` and `mlp_block` above.

torch::Tensor int4pack_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& sz) {
  return at::_weight_int4pack_mm_for_cpu(x.contiguous(), packed, x.size(1) / sz.size(0), sz);
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
  const torch::Tensor* weights[3][2] = {{&o_packed, &o_sz}, {&gate_up_packed, &gate_up_sz}, {&down_packed, &down_sz}};
  auto linear = [&](const torch::Tensor& input, int layer) {
    return int4pack_linear(input, *weights[layer][0], *weights[layer][1]);
  };
  return mlp_block(a, x, linear, mlp_norm, next_norm, eps);
}

TORCH_LIBRARY_FRAGMENT(ttc_cpu, lib) {
  lib.def("attn_in(Tensor h, Tensor nibbles, Tensor d, Tensor m, Tensor? bias, Tensor cos, Tensor sin, "
          "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, int num_heads, int num_kv_heads, bool w4a8=False) "
          "-> Tensor");
  lib.def("attn_out_mlp(Tensor a, Tensor x, Tensor o_nibbles, Tensor o_d, Tensor o_m, Tensor mlp_norm, "
          "Tensor gate_up_nibbles, Tensor gate_up_d, Tensor gate_up_m, Tensor down_nibbles, Tensor down_d, "
          "Tensor down_m, Tensor next_norm, float eps, bool w4a8=False) -> (Tensor, Tensor)");
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
