// y = x @ w.T for a weight stored as 4-bit codes in groups of 32 inputs: w[n, k] = q[n, k] * d[n, g] + m[n, g],
// g = k / 32 (GGUF's Q4_1 form). Float32 activations and accumulation; AVX2 + FMA.
//
// Why ttc has its own: PyTorch's CPU int4 matmul (_weight_int4pack_mm_for_cpu) takes bfloat16 activations,
// which an AVX2-only CPU emulates, and at one row it reads the weights at ~3 GB/s; a decode step of one
// stream is a matrix-vector product, where unpacking the codes in registers is the whole cost.
//
// Layouts (the ones ttc.kernels.quant.Int4Linear keeps): nibbles (N, K/2) uint8 with input 2j in the low
// nibble of byte j and 2j + 1 in the high one; d and m (N, K/32) float32. x (T, K) float32, contiguous.
// Per (row n, group g): s = sum_i q_i * x_i over the group's 32 inputs (8-wide FMAs), then
// acc += d * s (vector) and m * sum(x over the group) (scalar, the group sums computed once per call).
// Rows of x go in tiles of ROWS so the unpacked codes of a group are reused across them from registers.
// Threads split the N outputs (at::parallel_for): every output's sum is taken in one order, so the result
// does not depend on the thread count, and a row's result does not depend on the other rows up to
// GEMV_ROWS. Past GEMV_ROWS rows the weight is dequantized (exactly, one FMA per weight) and multiplied by
// PyTorch's float32 GEMM, whose rounding may differ from the kernel's: a batch-invariant model probes
// this (kernels/invariant.py) and then runs rows one at a time.
#include "int4_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t ROWS = 4;        // rows of x per pass over a group's unpacked codes (8 spill registers: slower)
// up to this many rows: the unpacking kernel; more: dequantize + GEMM (measured crossover ~32-48)
constexpr int64_t GEMV_ROWS = 32;

// The 8 codes of inputs 8k..8k+7 of a group as floats: dword k of the group's 16 bytes holds them in its
// nibbles 0..7 (input 2j in the low nibble of byte j), so a broadcast of that dword (a load, not a shuffle)
// shifted per lane by 0, 4, ..., 28 and masked gives them in order. No cross-lane shuffle at all: on this
// kind of CPU the shuffle port, not memory, bounded an unpack by byte widening (2.7 codes a cycle).
inline __m256 codes8(const uint8_t* group, int k, __m256i shifts, __m256i low4) {
  int32_t dword;
  std::memcpy(&dword, group + 4 * k, 4);
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(dword), shifts), low4));
}

template <int64_t R>
void tile(const float* x, int64_t K, const float* xsum, int64_t G, const uint8_t* nibbles, const float* d,
          const float* m, float* y, int64_t N, int64_t n0, int64_t n1) {
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  for (int64_t n = n0; n < n1; n++) {
    if (n + PREFETCH_ROWS < N) {  // int4_cpu.h
      prefetch_bytes(nibbles + (n + PREFETCH_ROWS) * (K / 2), K / 2);
      prefetch_bytes(d + (n + PREFETCH_ROWS) * G, 1);
      prefetch_bytes(m + (n + PREFETCH_ROWS) * G, 1);
    }
    __m256 acc[R];
    float macc[R];
    for (int64_t r = 0; r < R; r++) { acc[r] = _mm256_setzero_ps(); macc[r] = 0.f; }
    const uint8_t* row = nibbles + n * (K / 2);
    for (int64_t g = 0; g < G; g++) {
      const uint8_t* group = row + g * 16;
      __m256 w0 = codes8(group, 0, shifts, low4), w1 = codes8(group, 1, shifts, low4);
      __m256 w2 = codes8(group, 2, shifts, low4), w3 = codes8(group, 3, shifts, low4);
      __m256 dv = _mm256_set1_ps(d[n * G + g]);
      float mv = m[n * G + g];
      for (int64_t r = 0; r < R; r++) {
        const float* xg = x + r * K + g * 32;
        __m256 s = _mm256_mul_ps(w0, _mm256_loadu_ps(xg));
        s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xg + 8), s);
        s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xg + 16), s);
        s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xg + 24), s);
        acc[r] = _mm256_fmadd_ps(dv, s, acc[r]);
        macc[r] = std::fma(mv, xsum[r * G + g], macc[r]);  // one rounding, whatever the compiler contracts
      }
    }
    for (int64_t r = 0; r < R; r++) y[r * N + n] = hsum(acc[r]) + macc[r];
  }
}

// The whole weight (N, K) float32, w = q * d + m, in a buffer kept between calls: for more than GEMV_ROWS
// rows a float32 GEMM on the dequantized weight beats unpacking the codes once per tile of rows (measured
// per 3072 x 576 linear, 2 threads: 2.9 against ~3.5 ms at 64 rows, level at 32).
// The buffer is reused (a fresh multi-MB tensor per call costs page faults), so the
// returned tensor is only valid until the next call: callers use it at once. One buffer per thread.
torch::Tensor dequantize(const torch::Tensor& nibbles, const torch::Tensor& d, const torch::Tensor& m, int64_t N,
                         int64_t K) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < N * K) buffer.resize(N * K);
  float* wp = buffer.data();
  const int64_t G = K / 32;
  const uint8_t* qp = nibbles.data_ptr<uint8_t>();
  const float* dp = d.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m256i low4 = _mm256_set1_epi32(0x0F);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    for (int64_t n = n0; n < n1; n++)
      for (int64_t g = 0; g < G; g++) {
        const uint8_t* group = qp + n * (K / 2) + g * 16;
        const __m256 dv = _mm256_set1_ps(dp[n * G + g]), mv = _mm256_set1_ps(mp[n * G + g]);
        float* out = wp + n * K + g * 32;
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(out + 8 * k, _mm256_fmadd_ps(codes8(group, k, shifts, low4), dv, mv));
      }
  });
  return torch::from_blob(wp, {N, K}, torch::TensorOptions().dtype(torch::kFloat32));
}

}  // namespace

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& nibbles, const torch::Tensor& d,
                          const torch::Tensor& m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "int4_linear: x must be (T, K) float32");
  TORCH_CHECK(nibbles.scalar_type() == torch::kUInt8 && nibbles.is_contiguous(), "int4_linear: nibbles (N, K/2) uint8");
  const int64_t T = x.size(0), K = x.size(1), N = nibbles.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0 && nibbles.size(1) == K / 2, "int4_linear: K must be a multiple of 32 and match the nibbles");
  TORCH_CHECK(d.is_contiguous() && m.is_contiguous() && d.scalar_type() == torch::kFloat32 &&
              m.scalar_type() == torch::kFloat32 && d.size(0) == N && d.size(1) == G && m.sizes() == d.sizes(),
              "int4_linear: d and m must be (N, K/32) float32");
  auto xc = x.contiguous();
  if (T > GEMV_ROWS) return at::mm(xc, dequantize(nibbles, d, m, N, K).t());
  auto y = torch::empty({T, N}, x.options());
  // (T, G): the m term's group sums, in a plain loop (a torch op here would cost a dispatch per call)
  std::vector<float> xsum(T * G);
  {
    const float* xr = xc.data_ptr<float>();
    for (int64_t i = 0; i < T * G; i++) {
      __m256 v = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xr + 32 * i), _mm256_loadu_ps(xr + 32 * i + 8)),
                               _mm256_add_ps(_mm256_loadu_ps(xr + 32 * i + 16), _mm256_loadu_ps(xr + 32 * i + 24)));
      xsum[i] = hsum(v);
    }
  }
  const float* xp = xc.data_ptr<float>();
  const float* sp = xsum.data();
  const uint8_t* qp = nibbles.data_ptr<uint8_t>();
  const float* dp = d.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    int64_t t = 0;
    for (; t + ROWS <= T; t += ROWS) tile<ROWS>(xp + t * K, K, sp + t * G, G, qp, dp, mp, yp + t * N, N, n0, n1);
    const int64_t rest = T - t;  // the last 1..3 rows in one pass over the weights
    if (rest == 3) tile<3>(xp + t * K, K, sp + t * G, G, qp, dp, mp, yp + t * N, N, n0, n1);
    if (rest == 2) tile<2>(xp + t * K, K, sp + t * G, G, qp, dp, mp, yp + t * N, N, n0, n1);
    if (rest == 1) tile<1>(xp + t * K, K, sp + t * G, G, qp, dp, mp, yp + t * N, N, n0, n1);
  });
  return y;
}

// y = x @ w.T for w[n, k] = q[n, k] * d[n, k / 32], q int8 (GGUF's Q8_0 form, the embedded model's tied
// head). The same loop as int4's, with the codes sign-extended from bytes. For few rows (HEAD_ROWS): callers
// with more rows hold the float weight and multiply it (the head is tied to the embedding's float copy).
torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "int8_linear: x must be (T, K) float32");
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous(), "int8_linear: q (N, K) int8");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0), G = K / 32;
  TORCH_CHECK(K % 32 == 0 && q.size(1) == K, "int8_linear: K must be a multiple of 32 and match q");
  TORCH_CHECK(d.is_contiguous() && d.scalar_type() == torch::kFloat32 && d.size(0) == N && d.size(1) == G,
              "int8_linear: d must be (N, K/32) float32");
  auto xc = x.contiguous();
  auto y = torch::empty({T, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
      if (n + PREFETCH_ROWS < N) prefetch_bytes(qp + (n + PREFETCH_ROWS) * K, K);  // int4_cpu.h
      for (int64_t t = 0; t < T; t++) {
        const float* xr = xp + t * K;
        const int8_t* row = qp + n * K;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
          const int8_t* c = row + g * 32;
          const float* xg = xr + g * 32;
          __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)))), _mm256_loadu_ps(xg));
          for (int k = 1; k < 4; k++)
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * k)))), _mm256_loadu_ps(xg + 8 * k), s);
          acc = _mm256_fmadd_ps(_mm256_set1_ps(dp[n * G + g]), s, acc);
        }
        yp[t * N + n] = hsum(acc);
      }
    }
  });
  return y;
}

// RMSNorm of float32 or bfloat16 rows, y = x / sqrt(mean(x^2) + eps) * w in float32 (bfloat16 rounded once at
// the end, as PyTorch's float32 norm and .to(bfloat16)), in one pass per row: x (T, H), w (H,) float32.
// Why: PyTorch's CPU rms_norm runs as ~7 element-wise ops (~40 us at decode sizes, 61 per step of the
// embedded model: 12% of an int4 one-stream step). Its sum of squares is taken in another order than
// PyTorch's, so it runs only where ttc's int4 kernels do (float32 or bfloat16), never in a reference mode.
namespace {

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {  // rounded to nearest even, as PyTorch's .to(bfloat16)
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int i = 0; i < 8; i++) p[i] = c10::BFloat16(f[i]);
}

template <typename T>
void rms_norm_rows(const T* xp, const float* wp, T* yp, int64_t T_rows, int64_t H, double eps) {
  at::parallel_for(0, T_rows, 64, [&](int64_t t0, int64_t t1) {  // inline, without a thread launch, below 64 rows
    for (int64_t t = t0; t < t1; t++) {
      const T* xr = xp + t * H;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < H; i += 8) {
        __m256 v = load8(xr + i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      const __m256 scale = _mm256_set1_ps(1.0f / std::sqrt(hsum(acc) / static_cast<float>(H) + static_cast<float>(eps)));
      for (int64_t i = 0; i < H; i += 8)
        store8(yp + t * H + i, _mm256_mul_ps(_mm256_mul_ps(load8(xr + i), scale), _mm256_loadu_ps(wp + i)));
    }
  });
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && (dtype == torch::kFloat32 || dtype == torch::kBFloat16) &&
              w.scalar_type() == torch::kFloat32 && w.dim() == 1 && w.size(0) == x.size(1) && x.size(1) % 8 == 0,
              "rms_norm: x (T, H) float32 or bfloat16 and w (H,) float32 with H a multiple of 8");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = torch::empty({x.size(0), x.size(1)}, x.options());
  if (dtype == torch::kFloat32)
    rms_norm_rows(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), x.size(0), x.size(1), eps);
  else
    rms_norm_rows(xc.data_ptr<c10::BFloat16>(), wc.data_ptr<float>(), y.data_ptr<c10::BFloat16>(), x.size(0),
                  x.size(1), eps);
  return y;
}

// Registered with the dispatcher (not pybind11), so eager calls cost a C++ dispatch and torch.compile sees
// an operator it can call from a compiled graph (its shape function is registered in ttc/kernels/int4_cpu.py).
// decode_layer.cpp adds its operators to the same library (TORCH_LIBRARY_FRAGMENT).
TORCH_LIBRARY(ttc_cpu, lib) {
  lib.def("int4_linear(Tensor x, Tensor nibbles, Tensor d, Tensor m) -> Tensor");
  lib.def("int8_linear(Tensor x, Tensor q, Tensor d) -> Tensor");
  lib.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(ttc_cpu, CPU, lib) {
  lib.impl("int4_linear", &int4_linear);
  lib.impl("int8_linear", &int8_linear);
  lib.impl("rms_norm", &rms_norm);
}
