// Elementwise math for the CPU tile epilogues, written so that a loop calling
// it vectorizes: branch-free selects, no libm calls, no integer/float
// conversions the vectorizer cannot map. float gets polynomial versions (the
// epilogue must keep pace with the tile GEMMs); double, used for checks rather
// than speed, uses libm.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// Builds a function once per x86-64 feature level, picked at load time, so one
// binary runs AVX-512 epilogues where the CPU has them and still runs anywhere.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define PYCLLOSS_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYCLLOSS_VECTOR_CLONES
#endif

namespace pyclloss::cpu {

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// Bounds of exp_approx's float arguments.
constexpr float kExpMinArg = -87.33654f;  // exp(kExpMinArg) >= FLT_MIN
constexpr float kExpMaxArg = 88.37626f;   // keeps n <= 127 below

// exp(x) = 2^n * e^r with n = round(x * log2 e), |r| <= ln2 / 2, and e^r from
// the Cephes expf polynomial (about 1 ulp), for x in [kExpMinArg, kExpMaxArg]
// (NaN stays NaN; other arguments give unspecified values, which callers
// select away).
inline float exp_in_range(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  // Adding 1.5 * 2^23 + 127 rounds to an integer and leaves n + 127, the
  // biased exponent of 2^n, in the low mantissa bits: no float -> int
  // conversion needed.
  constexpr float kRoundShift = 12583039.0f;
  const float shifted = x * kLog2e + kRoundShift;
  const float n = shifted - kRoundShift;
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  const float r2 = r * r;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * r2 + r + 1.0f;
  return exp_r * float_from_bits(float_bits(shifted) << 23);
}

inline double exp_in_range(double x) { return std::exp(x); }

// exp(x) for any x. Results are normal floats or exactly 0 / inf, never
// subnormal (which would cost microcode assists): 0 below log(FLT_MIN), inf
// above 127.5 ln 2 (within a factor 1.42 of FLT_MAX). exp(-inf) = 0,
// exp(inf) = inf, NaN stays NaN.
inline float exp_approx(float x) {
  const float clamped = x < kExpMinArg ? kExpMinArg : (x > kExpMaxArg ? kExpMaxArg : x);
  const float result = exp_in_range(clamped);
  return x < kExpMinArg ? 0.0f
                        : (x > kExpMaxArg ? std::numeric_limits<float>::infinity() : result);
}

inline double exp_approx(double x) { return std::exp(x); }

// exp(x) for x <= 0 (a logit less the max or the log-sum-exp of a set that
// holds it), -inf included: exp_approx without the clamp at the overflow end,
// a few instructions fewer in the hottest loops.
inline float exp_nonpositive(float x) {
  return x < kExpMinArg ? 0.0f : exp_in_range(x);
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// log(1 + u) for u in [0, 1]: with f = u / (2 + u) in [0, 1/3],
// log(1 + u) = 2 atanh(f) = 2f (1 + f^2/3 + f^4/5 + ...); the series is cut
// where its remainder drops below float precision. Accurate for tiny u too.
inline float log1p_unit(float u) {
  const float f = u / (2.0f + u);
  const float f2 = f * f;
  float series = 1.0f / 15.0f;
  series = series * f2 + 1.0f / 13.0f;
  series = series * f2 + 1.0f / 11.0f;
  series = series * f2 + 1.0f / 9.0f;
  series = series * f2 + 1.0f / 7.0f;
  series = series * f2 + 1.0f / 5.0f;
  series = series * f2 + 1.0f / 3.0f;
  return 2.0f * f + 2.0f * f * f2 * series;
}

inline double log1p_unit(double u) { return std::log1p(u); }

// softplus(x) = log(1 + e^x) = max(x, 0) + log(1 + e^-|x|); softplus(-inf) = 0.
template <typename T>
inline T softplus(T x) {
  const T magnitude = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + log1p_unit(exp_approx(-magnitude));
}

// sigmoid(x) = 1 / (1 + e^-x); sigmoid(-inf) = 0, sigmoid(inf) = 1.
template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_approx(-x));
}

// e^(a - b) for two running maxima a <= b, with e^(-inf - (-inf)) taken as 0:
// rescales a running sum that is still empty.
template <typename T>
inline T rescale_factor(T old_max, T new_max) {
  return old_max == kNegInf<T> ? T(0) : exp_nonpositive(old_max - new_max);
}

}  // namespace pyclloss::cpu
