// Shared by ttc's CPU kernels (int4_cpu.cpp: the linears and the norm; decode_layer.cpp: the fused decode layer
// and the paged attention); built together as one extension by ttc/kernels/int4_cpu.py.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

inline float hsum(__m256 v) {  // the sum of 8 floats
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 values of a float32 or bfloat16 row as float32 (bfloat16 is the high half of a float32: a shift, exact).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// Weight rows are prefetched this many rows ahead of the one being multiplied: a thread's share of one layer's
// matrix is too short a stream (tens of KB) for the hardware prefetcher to ramp up before it ends (measured:
// about half of a one-stream step on ttc's float32 int4 kernel, 20-30% on the W4A8 one).
constexpr int64_t PREFETCH_ROWS = 16;
inline void prefetch_bytes(const void* p, int64_t bytes) {  // into L1, one hint per 64-byte line
  for (int64_t byte = 0; byte < bytes; byte += 64) _mm_prefetch(static_cast<const char*>(p) + byte, _MM_HINT_T0);
}

// y = x @ w.T for Q4_1-form int4 weights, float32 (int4_cpu.cpp).
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& nibbles, const torch::Tensor& d,
                          const torch::Tensor& m);
// RMSNorm of x (T, H) float32 or bfloat16 (computed in float32, rounded once), w (H,) float32 (int4_cpu.cpp).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps);
// y = x @ w.T for Q4_1-form int4 weights in W4A8's column blocks with x quantized to int8 per group of 32
// (W4A8, int4_q8.cpp); callers check w4a8_supported() (AVX512-VNNI) first.
bool w4a8_supported();
torch::Tensor int4_q8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& d,
                             const torch::Tensor& m);
