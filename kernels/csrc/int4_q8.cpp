// W4A8: int4 (Q4_1-form) and int8 (Q8_0-form) weights times activations quantized to int8 per group of 32, with
// integer dot products (AVX512-VNNI's vpdpbusd): llama.cpp's Q4_1 x Q8_1 scheme, on a layout of ttc's own.
//
// Why: in a one-stream decode step the int4 linears are matrix-vector products whose cost is unpacking the
// codes and multiplying them into float activations (ttc's float32 kernel: ~20 vector ops per 32 weights;
// PyTorch's bfloat16 int4 kernel reads ~13 GB/s on an AMX Xeon, with the whole model in its L3). With int8
// activations one vpdpbusd multiplies and sums 64 code-activation pairs exactly. In a batch the same codes serve
// every row: unpacked once per 16 columns and group, then 8 vpdpbusd and 3 float ops per row (about 300 GMAC/s on
// two AMX Xeon cores, near vpdpbusd's one-per-cycle bound). The price: the activations are rounded to int8 per
// group (llama.cpp's own trade), so this is an opt-in weight format (`dtype=w4a8`), not the float32 int4
// kernel's twin. Its twin is ttc/kernels/quant.py's `w4a8_reference` (the same quantization in PyTorch, then
// exact integer sums), compared in tests/test_int4_q8.py.
//
// Tried and dropped: AMX's tdpbsud for tiles of 16 rows (same sums, same bits), measured no faster at 16 and 64
// rows: with a scale per group of 32 every 16 x 16 tile product needs ~5 vector ops per row to convert and
// scale its sums, as many cycles as the vpdpbusd it replaces.
//
// Weights in column blocks (ttc/kernels/int4_cpu.py's `w4a8_pack_codes` writes them): for each block b of 16
// output columns and group g of 32 inputs, B[k4][c][i] = q[16b + c][32g + 4k4 + i] (k4 < 8, c < 16, i < 4):
// 512 codes in the order vpdpbusd's lanes read them, one output column per 32-bit lane.
//   int4: (N/16, G, 256) uint8, byte j holding B[j] in its low nibble and B[256 + j] in its high one;
//   int8: (N/16, G, 512) uint8, B as q + 128 (vpdpbusd multiplies unsigned by signed bytes).
// Scales likewise (N/16, G, 16): int4's d and m float16 (GGUF's own Q4_1 storage), the int8 head's d float32.
//
// Activations x (T, K) float32, per row t and group g: d = max|x| / 127, q = round-half-even(x * (1/d)) (0 where
// d is 0), as PyTorch's round. Exact per group: isum = sum q_w * q_x (int32; int8: sum (q_w + 128) q_x - 128 sum q_x).
// Then per output, over groups in order, with fused multiply-adds:
//   acc = fma(float(isum), d_w * d, acc);  int4 also: acc = fma(m_w, d * float(sum q_x), acc)
// Every (row, column) is one such chain whatever T: results do not depend on the batch.
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

constexpr int64_t COLS = 16;       // output columns per block: one per 32-bit lane of a 512-bit register
constexpr int ROWS = 8;            // rows of x per pass over a block (8 float accumulators)
constexpr int64_t PREFETCH_GROUPS = 16;  // codes prefetched this many (block, group)s ahead (int4_cpu.h says why)

struct QuantizedRows {  // x (T, K) rounded: codes q (T, K) in x's order; per (row, group) d, d * sum q, 128 * sum q
  std::vector<int8_t> q;
  std::vector<float> d, sums;
  std::vector<int32_t> offsets;  // int8 weights only
};

TTC_AVX512_VNNI QuantizedRows quantize(const float* x, int64_t T, int64_t K, bool offsets) {
  const int64_t G = K / 32;
  QuantizedRows out{std::vector<int8_t>(T * K), std::vector<float>(T * G), std::vector<float>(T * G),
                    std::vector<int32_t>(offsets ? T * G : 0)};
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
      const __m512i qa = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a, invv), nearest);
      const __m512i qb = _mm512_cvt_roundps_epi32(_mm512_mul_ps(b, invv), nearest);
      int8_t* row = out.q.data() + t * K + g * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row), _mm512_cvtepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 16), _mm512_cvtepi32_epi8(qb));
      const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
      out.d[t * G + g] = d;
      out.sums[t * G + g] = d * static_cast<float>(sum);
      if (offsets) out.offsets[t * G + g] = 128 * sum;
    }
  return out;
}

TTC_AVX512_VNNI inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
TTC_AVX512_VNNI inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// One block's codes for group g as B's 8 rows of 64 bytes (16 columns x 4 inputs each).
template <bool INT4>
TTC_AVX512_VNNI inline void load_codes(const uint8_t* block, int64_t g, __m512i c[8]) {
  if (INT4) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; i++) {
      const __m512i raw = _mm512_loadu_si512(block + g * 256 + 64 * i);
      c[i] = _mm512_and_si512(raw, low4);
      c[i + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
    }
  } else {
    for (int i = 0; i < 8; i++) c[i] = _mm512_loadu_si512(block + g * 512 + 64 * i);
  }
}

// The float part: a group's exact integer sums (16 columns) into one row's accumulator.
template <bool INT4>
TTC_AVX512_VNNI inline __m512 accumulate(__m512 acc, __m512i isum, const QuantizedRows& xq, int64_t tg, __m512 dw,
                                         __m512 mw) {
  if (!INT4) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(xq.offsets[tg]));  // exact
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(xq.d[tg])), acc);
  if (INT4) acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(xq.sums[tg]), acc);
  return acc;
}

// Rows t0 .. t0+R-1 of x against one block (16 columns): y's (R, 16) at y + t0 * N.
template <int R, bool INT4, typename S>
TTC_AVX512_VNNI void block_vnni(const QuantizedRows& xq, int64_t t0, int64_t K, const uint8_t* block, const S* dw,
                                const S* mw, float* y, int64_t N) {
  const int64_t G = K / 32, block_bytes = INT4 ? 256 : 512;
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    // codes ahead, in this block or the next (past a thread's share it is still the same matrix; past the
    // tensor's end a prefetch is a hint that never faults)
    prefetch_bytes(block + (g + PREFETCH_GROUPS) * block_bytes, block_bytes);
    __m512i c[8];
    load_codes<INT4>(block, g, c);
    const __m512 dwv = load16(dw + g * COLS), mwv = INT4 ? load16(mw + g * COLS) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
      const int32_t* xw = reinterpret_cast<const int32_t*>(xq.q.data() + (t0 + r) * K + g * 32);
      // two chains of four, summed: exact, and half the dependent latency of one chain of eight
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], _mm512_set1_epi32(xw[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[1], _mm512_set1_epi32(xw[1]));
      for (int i = 2; i < 8; i += 2) {
        s0 = _mm512_dpbusd_epi32(s0, c[i], _mm512_set1_epi32(xw[i]));
        s1 = _mm512_dpbusd_epi32(s1, c[i + 1], _mm512_set1_epi32(xw[i + 1]));
      }
      acc[r] = accumulate<INT4>(acc[r], _mm512_add_epi32(s0, s1), xq, (t0 + r) * G + g, dwv, mwv);
    }
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(y + (t0 + r) * N, acc[r]);
}

template <bool INT4, typename S>
TTC_AVX512_VNNI void rows_vnni(const QuantizedRows& xq, int64_t T, int64_t K, const uint8_t* block, const S* dw,
                               const S* mw, float* y, int64_t N) {
  // rows in tiles of ROWS, then one tile of the 1-7 left (each row's arithmetic is the same in any tile)
  int64_t t = 0;
  auto run = [&](auto rows, int64_t t0) {
    block_vnni<decltype(rows)::value, INT4, S>(xq, t0, K, block, dw, mw, y, N);
  };
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
}

template <bool INT4, typename S>
torch::Tensor w4a8_matmul(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& d,
                          const torch::Tensor* m) {
  const int64_t T = x.size(0), K = x.size(1), blocks = codes.size(0), N = blocks * COLS, G = K / 32;
  auto xc = x.contiguous();
  const QuantizedRows xq = quantize(xc.data_ptr<float>(), T, K, !INT4);
  auto y = torch::empty({T, N}, x.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const S* dp = d.data_ptr<S>();
  const S* mp = m ? m->data_ptr<S>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t block_bytes = (INT4 ? 256 : 512) * G;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++)  // a block's codes stay in L1 across its row tiles
      rows_vnni<INT4, S>(xq, T, K, cp + b * block_bytes, dp + b * G * COLS, INT4 ? mp + b * G * COLS : nullptr,
                         yp + b * COLS, N);
  });
  return y;
}

}  // namespace

bool w4a8_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

torch::Tensor int4_q8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& d,
                             const torch::Tensor& m) {
  TORCH_CHECK(w4a8_supported(), "int4_q8_linear: needs AVX512-VNNI, which this CPU lacks");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "int4_q8_linear: x must be (T, K) float32");
  const int64_t K = x.size(1), G = K / 32;
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() &&
              K % 32 == 0 && packed.size(1) == G && packed.size(2) == 256,
              "int4_q8_linear: packed codes must be (N/16, K/32, 256) uint8 with K a multiple of 32");
  TORCH_CHECK(d.is_contiguous() && m.is_contiguous() && d.scalar_type() == torch::kHalf &&
              m.scalar_type() == torch::kHalf && d.dim() == 3 && d.size(0) == packed.size(0) && d.size(1) == G &&
              d.size(2) == COLS && m.sizes() == d.sizes(),
              "int4_q8_linear: d and m must be (N/16, K/32, 16) float16");
  return w4a8_matmul<true, at::Half>(x, packed, d, &m);
}

torch::Tensor int8_q8_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& d) {
  TORCH_CHECK(w4a8_supported(), "int8_q8_linear: needs AVX512-VNNI, which this CPU lacks");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "int8_q8_linear: x must be (T, K) float32");
  const int64_t K = x.size(1), G = K / 32;
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && K % 32 == 0 &&
              codes.size(1) == G && codes.size(2) == 512,
              "int8_q8_linear: codes must be (N/16, K/32, 512) uint8 (q + 128) with K a multiple of 32");
  TORCH_CHECK(d.is_contiguous() && d.scalar_type() == torch::kFloat32 && d.dim() == 3 &&
              d.size(0) == codes.size(0) && d.size(1) == G && d.size(2) == COLS,
              "int8_q8_linear: d must be (N/16, K/32, 16) float32");
  return w4a8_matmul<false, float>(x, codes, d, nullptr);
}

TORCH_LIBRARY_FRAGMENT(ttc_cpu, lib) {
  lib.def("int4_q8_linear(Tensor x, Tensor packed, Tensor d, Tensor m) -> Tensor");
  lib.def("int8_q8_linear(Tensor x, Tensor codes, Tensor d) -> Tensor");
}
TORCH_LIBRARY_IMPL(ttc_cpu, CPU, lib) {
  lib.impl("int4_q8_linear", &int4_q8_linear);
  lib.impl("int8_q8_linear", &int8_q8_linear);
}
