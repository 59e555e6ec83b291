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

// y = x @ w.T for Q4_1-form int4 weights, float32 (int4_cpu.cpp).
torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& nibbles, const torch::Tensor& d,
                          const torch::Tensor& m);
// RMSNorm of T float32 rows of H into y (int4_cpu.cpp).
void rms_norm_rows(const float* xp, const float* wp, float* yp, int64_t T, int64_t H, double eps);
