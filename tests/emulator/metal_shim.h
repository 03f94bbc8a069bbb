// The subset of the Metal Shading Language our kernels use, as C++14 for g++.
//
// - Address spaces: `device` and `thread` vanish; `constant` becomes `volatile`, so
//   passing a constant-space pointer where a device pointer is expected fails to
//   compile, as in Metal; `threadgroup` becomes `static`, so an array declared with
//   it in the kernel body is shared by the threads of a group (groups run one after
//   another). Use `threadgroup` only for arrays declared in the kernel body.
// - Types: half / float16_t and bfloat16_t (stored as 16 bits, converted with
//   round-to-nearest-even; arithmetic happens in float), vectors (float4, uint3, ...),
//   uint / ushort / uchar.
// - metal:: math (also metal::fast:: and metal::precise::), numeric_limits.
// - SIMD-group functions: simd_sum, simd_max, simd_min, simd_shuffle,
//   simd_shuffle_xor; threadgroup_barrier. These run through emu_runtime.h.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "emu_runtime.h"

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;

namespace emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half(float value) {
  uint32_t f = float_bits(value);
  uint32_t sign = (f >> 16) & 0x8000u;
  f &= 0x7fffffffu;
  uint32_t h;
  if (f >= 0x47800000u) {  // overflow, inf or nan
    h = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (f < 0x38800000u) {  // subnormal or zero: let the FPU round
    const uint32_t magic = ((127 - 15) + (23 - 10) + 1) << 23;
    h = float_bits(bits_float(f) + bits_float(magic)) - magic;
  } else {
    uint32_t odd = (f >> 13) & 1u;
    f += (uint32_t(15 - 127) << 23) + 0xfffu + odd;
    h = f >> 13;
  }
  return uint16_t(h | sign);
}

inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal
    float f = std::ldexp(float(mant), -24);
    return sign ? -f : f;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t float_to_bfloat(float value) {
  uint32_t u = float_bits(value);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace emu

struct half {
  uint16_t bits;
  half() = default;
  half(float f) : bits(emu::float_to_half(f)) {}
  operator float() const { return emu::half_to_float(bits); }
};

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) : bits(emu::float_to_bfloat(f)) {}
  operator float() const { return emu::bits_float(uint32_t(bits) << 16); }
};

typedef half float16_t;
typedef bfloat16_t bfloat;

template <typename T, int N>
struct vec;

template <typename T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  explicit vec(T s) : x(s), y(s) {}
  vec(T x_, T y_) : x(x_), y(y_) {}
};

template <typename T>
struct vec<T, 3> {
  T x, y, z;
  vec() = default;
  explicit vec(T s) : x(s), y(s), z(s) {}
  vec(T x_, T y_, T z_) : x(x_), y(y_), z(z_) {}
};

template <typename T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  explicit vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T x_, T y_, T z_, T w_) : x(x_), y(y_), z(z_), w(w_) {}
};

template <typename T, int N>
T& at(vec<T, N>& v, int i) {
  return (&v.x)[i];
}

template <typename T, int N>
T at(const vec<T, N>& v, int i) {
  return (&v.x)[i];
}

template <typename T, int N, typename F>
vec<T, N> apply(const vec<T, N>& a, const vec<T, N>& b, F f) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) at(r, i) = f(at(a, i), at(b, i));
  return r;
}

template <typename T, int N>
vec<T, N> operator+(const vec<T, N>& a, const vec<T, N>& b) {
  return apply(a, b, [](T u, T v) { return T(u + v); });
}

template <typename T, int N>
vec<T, N> operator-(const vec<T, N>& a, const vec<T, N>& b) {
  return apply(a, b, [](T u, T v) { return T(u - v); });
}

template <typename T, int N>
vec<T, N> operator*(const vec<T, N>& a, const vec<T, N>& b) {
  return apply(a, b, [](T u, T v) { return T(u * v); });
}

template <typename T, int N>
vec<T, N> operator*(const vec<T, N>& a, T s) {
  return a * vec<T, N>(s);
}

template <typename T, int N>
vec<T, N> operator/(const vec<T, N>& a, const vec<T, N>& b) {
  return apply(a, b, [](T u, T v) { return T(u / v); });
}

#define EMU_VECTORS(T)     \
  typedef vec<T, 2> T##2; \
  typedef vec<T, 3> T##3; \
  typedef vec<T, 4> T##4;
EMU_VECTORS(float)
EMU_VECTORS(half)
EMU_VECTORS(int)
EMU_VECTORS(uint)
#undef EMU_VECTORS

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

namespace metal {

using std::numeric_limits;

#define EMU_UNARY(name, expr) \
  inline float name(float x) { return expr; }
#define EMU_MATH              \
  EMU_UNARY(exp, std::exp(x)) \
  EMU_UNARY(exp2, std::exp2(x)) \
  EMU_UNARY(log, std::log(x)) \
  EMU_UNARY(log2, std::log2(x)) \
  EMU_UNARY(sqrt, std::sqrt(x)) \
  EMU_UNARY(rsqrt, 1.0f / std::sqrt(x)) \
  EMU_UNARY(cos, std::cos(x)) \
  EMU_UNARY(sin, std::sin(x)) \
  EMU_UNARY(tanh, std::tanh(x))
EMU_MATH
namespace fast {
EMU_MATH
}
namespace precise {
EMU_MATH
}
#undef EMU_MATH
#undef EMU_UNARY

inline float abs(float x) { return std::fabs(x); }
inline float fabs(float x) { return std::fabs(x); }
inline float floor(float x) { return std::floor(x); }
inline float ceil(float x) { return std::ceil(x); }
inline float trunc(float x) { return std::trunc(x); }
// Metal's round() rounds halfway cases away from zero; rint() to even.
inline float round(float x) { return std::round(x); }
inline float rint(float x) { return std::nearbyint(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float pow(float a, float b) { return std::pow(a, b); }
inline bool isnan(float x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }

template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}

template <typename T, int N>
T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = 0;
  for (int i = 0; i < N; ++i) s += at(a, i) * at(b, i);
  return s;
}

template <typename T, typename Combine>
void reduce_lanes(emu::Lane** lanes, int n) {
  T acc = emu::lane_value<T>(lanes[0]);
  for (int i = 1; i < n; ++i) acc = Combine()(acc, emu::lane_value<T>(lanes[i]));
  for (int i = 0; i < n; ++i) emu::set_result(lanes[i], acc);
}

struct Sum {
  template <typename T>
  T operator()(T a, T b) const {
    return T(a + b);
  }
};

struct Max {
  template <typename T>
  T operator()(T a, T b) const {
    return max(a, b);
  }
};

struct Min {
  template <typename T>
  T operator()(T a, T b) const {
    return min(a, b);
  }
};

// Lane i receives the value of lane source(i); a missing source lane is an error.
template <typename T, bool Xor>
void shuffle_lanes(emu::Lane** lanes, int n) {
  for (int i = 0; i < n; ++i) {
    unsigned src = Xor ? (unsigned(i) ^ lanes[i]->arg) : lanes[i]->arg;
    if (src >= unsigned(n)) emu::fail("simd_shuffle reads lane " + std::to_string(src) +
                                      ", which does not exist in this SIMD group");
    emu::set_result(lanes[i], emu::lane_value<T>(lanes[src]));
  }
}

template <typename T>
T simd_sum(T x) {
  return emu::collective(x, 0, &reduce_lanes<T, Sum>);
}

template <typename T>
T simd_max(T x) {
  return emu::collective(x, 0, &reduce_lanes<T, Max>);
}

template <typename T>
T simd_min(T x) {
  return emu::collective(x, 0, &reduce_lanes<T, Min>);
}

template <typename T>
T simd_shuffle(T x, ushort lane) {
  return emu::collective(x, lane, &shuffle_lanes<T, false>);
}

template <typename T>
T simd_shuffle_xor(T x, ushort mask) {
  return emu::collective(x, mask, &shuffle_lanes<T, true>);
}

inline void threadgroup_barrier(mem_flags) { emu::active()->wait(emu::State::AtBarrier); }

}  // namespace metal

using namespace metal;

inline uint3 to_uint3(emu::Dim3 d) { return uint3{d.x, d.y, d.z}; }

#define device
#define thread
#define constant volatile
#define threadgroup static
