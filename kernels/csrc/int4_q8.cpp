// W4A8: int4 (Q4_1-form) and int8 (Q8_0-form) weights times activations quantized to int8 per group of 32, with
// integer dot products (AVX512-VNNI's vpdpbusd): llama.cpp's Q4_1 x Q8_1 scheme, on ttc's weight layouts.
//
// Why: in a one-stream decode step the int4 linears are matrix-vector products whose cost is unpacking the
// codes and multiplying them into float activations (ttc's float32 kernel: ~20 vector ops per 32 weights;
// PyTorch's bfloat16 int4 kernel reads ~13 GB/s on an AMX Xeon, with the whole model in its L3). With int8
// activations one vpdpbusd multiplies and sums 64 code-activation pairs exactly, ~13 ops per 64 weights.
// The price: the activations are rounded to int8 per group (llama.cpp's own trade), so this is an opt-in
// weight format (`dtype=w4a8`), not the float32 int4 kernel's twin. Its twin is ttc/kernels/quant.py's
// `w4a8_reference` (the same quantization in PyTorch, then exact integer sums), compared in
// tests/test_int4_q8.py.
//
// Activations x (T, K) float32, per row t and group g of 32 inputs: d = max|x| / 127, q = round-half-even(x * (1/d))
// (0 where d is 0), as PyTorch's round. Exact per group: isum = sum q_w * q_x (int32). Then
//   int4: y[t, n] = sum_g (d_w[n, g] * d[t, g]) * isum + sum_g m_w[n, g] * (d[t, g] * sum q_x), d_w and m_w float16
//   int8: the same with m_w = 0, codes stored as q_w + 128 (unsigned, as vpdpbusd needs): isum - 128 sum q_x.
// Every row of x is computed alone in one order, whatever T: results do not depend on the batch.
//
// The functions with AVX-512 instructions carry a target attribute (the extension is built for AVX2): callers
// check `w4a8_supported()` (the CPU's flags) before calling; the ops refuse otherwise.
#include "int4_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#define TTC_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c")))

namespace {

constexpr int ROWS = 8;  // rows of x per pass over a pair of groups' codes (x 2 weight rows: 16 accumulators)

// Activation layout (int8, K per row): groups in pairs of 64 bytes. int4's pair (g0, g1): [g0's even inputs (16),
// g1's even (16), g0's odd (16), g1's odd (16)], matching the nibbles' low (even inputs) and high halves loaded
// 32 bytes at a time; a last unpaired group: [even (16), odd (16)]. int8's: the natural order.
// Per (row, pair): `scale16` (16 floats) the pair's activation scales spread over the lanes its products land in
// (int4: [d0 x4, d1 x4, d0 x4, d1 x4]; int8: [d0 x8, d1 x8]); per (row, group): `sums` d * sum q.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale16, sums;
  std::vector<int32_t> offset16;  // int8 only, per (row, pair): 128 * the codes each lane's products cover
};

inline int32_t hsum_epi32(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int32_t total = 0;
  for (int i = 0; i < 8; i++) total += lanes[i];
  return total;
}

TTC_AVX512_VNNI QuantizedRows quantize(const float* x, int64_t T, int64_t K, bool int4_order) {
  const int64_t G = K / 32, P = (G + 1) / 2;
  QuantizedRows out{std::vector<int8_t>(T * K), std::vector<float>(T * P * 16, 0.f), std::vector<float>(T * G),
                    std::vector<int32_t>(int4_order ? 0 : T * P * 16, 0)};
  for (int64_t t = 0; t < T; t++)
    for (int64_t g = 0; g < G; g++) {
      const float* xg = x + t * K + g * 32;
      const __m512 a = _mm512_loadu_ps(xg), b = _mm512_loadu_ps(xg + 16);
      // A NaN or infinity in the group: d = NaN, so every output of the row is NaN, as in the float product
      // (max drops NaNs, and an infinity would make x * inv overflow int32). A group too small for 1 / d to be
      // finite (|x| < ~4e-37) rounds to zero codes, as in the twin.
      const bool finite = !(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q));
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const bool usable = finite && std::isfinite(amax);
      const float d = usable ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      float inv = usable && d != 0.0f ? 1.0f / d : 0.0f;
      if (!std::isfinite(inv)) inv = 0.0f;
      const __m512 invv = _mm512_set1_ps(inv);
      // round half to even, as torch.round, whatever the MXCSR mode; |x * inv| <= 127 up to rounding
      constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      alignas(64) int32_t q[32];
      _mm512_store_si512(q, _mm512_cvt_roundps_epi32(_mm512_mul_ps(a, invv), nearest));
      _mm512_store_si512(q + 16, _mm512_cvt_roundps_epi32(_mm512_mul_ps(b, invv), nearest));
      int8_t* row = out.q.data() + t * K;
      int32_t sum = 0;
      for (int j = 0; j < 32; j++) sum += q[j];
      const bool paired = g / 2 * 2 + 1 < G;
      if (!int4_order) {
        for (int j = 0; j < 32; j++) row[g * 32 + j] = static_cast<int8_t>(q[j]);
      } else {
        int8_t* pair = row + (g / 2) * 64;
        const int64_t even = paired ? (g % 2) * 16 : 0, odd = paired ? 32 + (g % 2) * 16 : 16;
        for (int j = 0; j < 16; j++) {
          pair[even + j] = static_cast<int8_t>(q[2 * j]);
          pair[odd + j] = static_cast<int8_t>(q[2 * j + 1]);
        }
      }
      // the lanes of a pair's products that hold this group's: int4 lanes 4-7 and 12-15 for the second
      // group (its even and odd halves), int8 lanes 8-15; an unpaired last group: all 16
      float* s16 = out.scale16.data() + (t * P + g / 2) * 16;
      for (int lane = 0; lane < 16; lane++) {
        const int64_t lane_group = int4_order ? (lane / 4) % 2 : lane / 8;
        if (!paired || lane_group == g % 2) s16[lane] = d;
      }
      if (!int4_order) {  // 128 * each lane's own 4 codes (the lane vpdpbusd sums them into): exact per lane
        int32_t* offsets = out.offset16.data() + (t * P + g / 2) * 16;
        if (paired)
          for (int lane = 0; lane < 8; lane++)
            offsets[(g % 2) * 8 + lane] = 128 * (q[4 * lane] + q[4 * lane + 1] + q[4 * lane + 2] + q[4 * lane + 3]);
        else
          offsets[0] = 128 * sum;  // the unpaired last group is summed across lanes first
      }
      out.sums[t * G + g] = d * static_cast<float>(sum);
    }
  return out;
}

// The weight's per-group scales: int4's d and m in float16 (GGUF's own Q4_1 storage: half the bytes of float32,
// and at one stream the layers are bound by the bytes they read), the int8 head's d in float32.
TTC_AVX512_VNNI inline __m128 load2(const float* p) {
  return _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
TTC_AVX512_VNNI inline __m128 load2(const at::Half* p) {
  int32_t bits;
  std::memcpy(&bits, p, 4);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
}
TTC_AVX512_VNNI inline __m512 load16(__mmask16 live, const float* p) { return _mm512_maskz_loadu_ps(live, p); }
TTC_AVX512_VNNI inline __m512 load16(__mmask16 live, const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, p));
}
TTC_AVX512_VNNI inline float scalar(const float* p) { return *p; }
TTC_AVX512_VNNI inline float scalar(const at::Half* p) { return static_cast<float>(*p); }

// NW weight rows from n against R rows of quantized x. int4: `codes` (N, K/2) nibbles, m_w added; int8: `codes`
// (N, K) uint8 (q + 128), m_w null. y (R, N) row-major with stride N. NW = 2 gives two independent accumulator
// chains per x row and reads each x vector once for both weight rows (one row alone waits on its FMA chain).
template <int NW, int R, bool INT4, typename S>
TTC_AVX512_VNNI inline void weight_rows(const int8_t* xq, const float* scale16, const float* sums,
                                        const int32_t* offset16, int64_t K, const uint8_t* codes, const S* dw,
                                        const S* mw, float* y, int64_t N, int64_t n) {
  const int64_t G = K / 32, P = G / 2, PS = (G + 1) / 2;  // P full pairs; PS scale16 entries per row
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m512i pair_lanes = INT4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
                                  : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const int64_t row_bytes = INT4 ? K / 2 : K;
  // The codes PREFETCH_ROWS weight rows ahead (int4_cpu.h), and the scales (float16: a line covers several
  // rows). Past n1 is another thread's share: still the same matrix; past its end nothing is prefetched.
  if (n + NW + PREFETCH_ROWS <= N) {
    prefetch_bytes(codes + (n + PREFETCH_ROWS) * row_bytes, NW * row_bytes);
    prefetch_bytes(dw + (n + PREFETCH_ROWS) * G, 1);
    if (INT4) prefetch_bytes(mw + (n + PREFETCH_ROWS) * G, 1);
  }
  __m512 acc[NW][R];
  for (int w = 0; w < NW; w++)
    for (int r = 0; r < R; r++) acc[w][r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; p++) {
    __m512i c[NW];
    __m512 dwv[NW];
    for (int w = 0; w < NW; w++) {
      const uint8_t* row = codes + (n + w) * row_bytes;
      if (INT4) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + p * 32));
        c[w] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, low4)),
                                  _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), 1);
      } else {
        c[w] = _mm512_loadu_si512(row + p * 64);
      }
      dwv[w] = _mm512_permutexvar_ps(pair_lanes, _mm512_castps128_ps512(load2(dw + (n + w) * G + 2 * p)));
    }
    for (int r = 0; r < R; r++) {
      const __m512i x = _mm512_loadu_si512(xq + r * K + p * 64);
      const __m512 sc = _mm512_loadu_ps(scale16 + (r * PS + p) * 16);
      for (int w = 0; w < NW; w++) {
        __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[w], x);
        if (!INT4) sum = _mm512_sub_epi32(sum, _mm512_loadu_si512(offset16 + (r * PS + p) * 16));  // exact
        acc[w][r] = _mm512_fmadd_ps(dwv[w], _mm512_mul_ps(_mm512_cvtepi32_ps(sum), sc), acc[w][r]);
      }
    }
  }
  for (int w = 0; w < NW; w++) {
    const uint8_t* row = codes + (n + w) * row_bytes;
    for (int r = 0; r < R; r++) {
      float tail = 0.f;
      if (G % 2) {  // the last, unpaired group: 32 codes in 256 bits
        const int64_t g = G - 1;
        __m256i c;
        if (INT4) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16));
          c = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1), low4);
        } else {
          c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + g * 32));
        }
        const __m256i sum = _mm256_dpbusd_epi32(
            _mm256_setzero_si256(), c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + g * 32)));
        int32_t total = hsum_epi32(sum);
        if (!INT4) total -= offset16[(r * PS + P) * 16];
        tail = scalar(dw + (n + w) * G + g) * scale16[(r * PS + P) * 16] * static_cast<float>(total);
      }
      __m512 a = acc[w][r];
      if (INT4)  // the second term, m_w * (d * sum q) per group, into the same lanes' sum
        for (int64_t g = 0; g < G; g += 16) {
          const __mmask16 live = G - g >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - g)) - 1);
          a = _mm512_fmadd_ps(load16(live, mw + (n + w) * G + g), _mm512_maskz_loadu_ps(live, sums + r * G + g), a);
        }
      y[r * N + n + w] = _mm512_reduce_add_ps(a) + tail;
    }
  }
}

template <int R, bool INT4, typename S>
TTC_AVX512_VNNI void tile(const int8_t* xq, const float* scale16, const float* sums, const int32_t* offset16,
                          int64_t K, const uint8_t* codes, const S* dw, const S* mw, float* y, int64_t N,
                          int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) weight_rows<2, R, INT4, S>(xq, scale16, sums, offset16, K, codes, dw, mw, y, N, n);
  if (n < n1) weight_rows<1, R, INT4, S>(xq, scale16, sums, offset16, K, codes, dw, mw, y, N, n);
}

template <bool INT4, typename S>
torch::Tensor w4a8_matmul(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& d,
                          const torch::Tensor* m) {
  const int64_t T = x.size(0), K = x.size(1), N = codes.size(0), G = K / 32, PS = (G + 1) / 2;
  auto xc = x.contiguous();
  const QuantizedRows xq = quantize(xc.data_ptr<float>(), T, K, INT4);
  auto y = torch::empty({T, N}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const S* dp = d.data_ptr<S>();
  const S* mp = m ? m->data_ptr<S>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    // rows of x in tiles of ROWS, then one tile of the 1-7 left (each row's arithmetic is the same in any tile)
    auto run = [&](auto rows, int64_t t) {
      tile<decltype(rows)::value, INT4, S>(xq.q.data() + t * K, xq.scale16.data() + t * PS * 16,
                                           xq.sums.data() + t * G, xq.offset16.data() + t * PS * 16, K, cp, dp, mp,
                                           yp + t * N, N, n0, n1);
    };
    int64_t t = 0;
    for (; t + ROWS <= T; t += ROWS) run(std::integral_constant<int, ROWS>{}, t);
    switch (T - t) {
      case 7: run(std::integral_constant<int, 7>{}, t); break;
      case 6: run(std::integral_constant<int, 6>{}, t); break;
      case 5: run(std::integral_constant<int, 5>{}, t); break;
      case 4: run(std::integral_constant<int, 4>{}, t); break;
      case 3: run(std::integral_constant<int, 3>{}, t); break;
      case 2: run(std::integral_constant<int, 2>{}, t); break;
      case 1: run(std::integral_constant<int, 1>{}, t); break;
      default: break;
    }
  });
  return y;
}

}  // namespace

bool w4a8_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

torch::Tensor int4_q8_linear(const torch::Tensor& x, const torch::Tensor& nibbles, const torch::Tensor& d,
                             const torch::Tensor& m) {
  TORCH_CHECK(w4a8_supported(), "int4_q8_linear: needs AVX512-VNNI, which this CPU lacks");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "int4_q8_linear: x must be (T, K) float32");
  TORCH_CHECK(nibbles.scalar_type() == torch::kUInt8 && nibbles.is_contiguous(), "int4_q8_linear: nibbles (N, K/2) uint8");
  const int64_t K = x.size(1), N = nibbles.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0 && nibbles.size(1) == K / 2, "int4_q8_linear: K must be a multiple of 32 and match the nibbles");
  TORCH_CHECK(d.is_contiguous() && m.is_contiguous() && d.scalar_type() == torch::kHalf &&
              m.scalar_type() == torch::kHalf && d.size(0) == N && d.size(1) == G && m.sizes() == d.sizes(),
              "int4_q8_linear: d and m must be (N, K/32) float16");
  return w4a8_matmul<true, at::Half>(x, nibbles, d, &m);
}

torch::Tensor int8_q8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& d) {
  TORCH_CHECK(w4a8_supported(), "int8_q8_linear: needs AVX512-VNNI, which this CPU lacks");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "int8_q8_linear: x must be (T, K) float32");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous(), "int8_q8_linear: codes (N, K) uint8 (q + 128)");
  const int64_t K = x.size(1), N = codes.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0 && codes.size(1) == K, "int8_q8_linear: K must be a multiple of 32 and match the codes");
  TORCH_CHECK(d.is_contiguous() && d.scalar_type() == torch::kFloat32 && d.size(0) == N && d.size(1) == G,
              "int8_q8_linear: d must be (N, K/32) float32");
  return w4a8_matmul<false, float>(x, codes, d, nullptr);
}

TORCH_LIBRARY_FRAGMENT(ttc_cpu, lib) {
  lib.def("int4_q8_linear(Tensor x, Tensor nibbles, Tensor d, Tensor m) -> Tensor");
  lib.def("int8_q8_linear(Tensor x, Tensor codes, Tensor d) -> Tensor");
}
TORCH_LIBRARY_IMPL(ttc_cpu, CPU, lib) {
  lib.impl("int4_q8_linear", &int4_q8_linear);
  lib.impl("int8_q8_linear", &int8_q8_linear);
}
