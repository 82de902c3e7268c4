// Host-side helpers of the checkpoint loader, called through ctypes from its copy threads
// (grok/kernels/cpu/host.py; ctypes releases the GIL, so the threads run in parallel):
//
// grok_copy_checked: rows of raw bytes copied, counting the elements that are not finite on the
// way (their bits without the sign at or above a threshold: exponent all ones), one pass where
// numpy took two (the copy, then the check over the copied bytes in chunks).
//
// grok_dequantize_fp8: a rectangle of float8_e4m3fn codes times its scales (per tensor, per
// row, or 128 x 128 tiles: one scale per block_rows x block_cols of the whole tensor) into
// float32 or bfloat16 (rounded to nearest even, as numpy's integer rounding in
// grok/checkpoint/units.py), counting the values that are not finite (NaN codes, overflow).
// The codes become float32 by the same vpermi2b table lookup as the quantised products
// (quant.cc), one multiply per 16 values: one pass over the bytes where numpy took four
// (a lookup, a multiply, the rounding, the check).
#include "common.h"

namespace {

inline float e4m3_to_float(uint8_t c) {  // float8_e4m3fn: bias 7, S.1111.111 NaN
  const int e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return std::nanf("");
  const float mag = e ? std::ldexp(1.0f + m / 8.0f, e - 7) : std::ldexp(m / 8.0f, -6);
  return (c & 0x80) ? -mag : mag;
}

inline uint16_t round_bf16(float f) {  // nearest even, as units._to_bfloat16
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512VBMI__)
// float32 bits of every e4m3 magnitude, as four byte planes of 128 entries (2 registers each).
struct F32Table {
  alignas(64) uint8_t plane[4][128];
};

const F32Table& f32_table() {
  static const F32Table t = [] {
    F32Table t;
    for (int c = 0; c < 128; ++c) {
      const float f = e4m3_to_float(uint8_t(c));
      uint32_t u;
      std::memcpy(&u, &f, sizeof u);
      for (int b = 0; b < 4; ++b) t.plane[b][c] = uint8_t(u >> (8 * b));
    }
    return t;
  }();
  return t;
}

// 16 codes (the low 16 bytes of c) as float32.
struct CodesToF32 {
  __m512i plane[4][2];
  CodesToF32() {
    const F32Table& t = f32_table();
    for (int b = 0; b < 4; ++b) {
      plane[b][0] = _mm512_load_si512(t.plane[b]);
      plane[b][1] = _mm512_load_si512(t.plane[b] + 64);
    }
  }
  // Codes c (64 bytes); out[q] = the float32 values of codes 16q .. 16q + 15.
  void convert(__m512i c, __m512 (&out)[4]) const {
    __m512i p[4];
    for (int b = 0; b < 4; ++b) p[b] = _mm512_permutex2var_epi8(plane[b][0], c, plane[b][1]);
    // Sign: bit 7 of each code into bit 7 of the top plane.
    p[3] = _mm512_ternarylogic_epi32(p[3], c, _mm512_set1_epi8(char(0x80)), 0xF8);
    // Byte planes -> 32-bit words: interleave planes 0/1 and 2/3 into 16-bit halves, then
    // the halves into words. Per 128-bit lane the order is fixed; undone below.
    const __m512i lo01 = _mm512_unpacklo_epi8(p[0], p[1]), hi01 = _mm512_unpackhi_epi8(p[0], p[1]);
    const __m512i lo23 = _mm512_unpacklo_epi8(p[2], p[3]), hi23 = _mm512_unpackhi_epi8(p[2], p[3]);
    // Lane L of w0 holds codes 16L + 0..3, w1 16L + 4..7, w2 16L + 8..11, w3 16L + 12..15.
    const __m512i w0 = _mm512_unpacklo_epi16(lo01, lo23), w1 = _mm512_unpackhi_epi16(lo01, lo23);
    const __m512i w2 = _mm512_unpacklo_epi16(hi01, hi23), w3 = _mm512_unpackhi_epi16(hi01, hi23);
    // Codes 16q .. 16q + 15 are lane q of w0, w1, w2, w3: a 4 x 4 transpose of 128-bit lanes.
    const __m512i a = _mm512_shuffle_i32x4(w0, w1, 0x44), b = _mm512_shuffle_i32x4(w0, w1, 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(w2, w3, 0x44), d = _mm512_shuffle_i32x4(w2, w3, 0xEE);
    out[0] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(a, c2, 0x88));
    out[1] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(a, c2, 0xDD));
    out[2] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(b, d, 0x88));
    out[3] = _mm512_castsi512_ps(_mm512_shuffle_i32x4(b, d, 0xDD));
  }
};

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// Counts non-finite lanes of v under m (exponent all ones).
inline int64_t non_finite(__m512 v, __mmask16 m) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i exp = _mm512_and_si512(bits, _mm512_set1_epi32(0x7F800000));
  return __builtin_popcount(_mm512_mask_cmpeq_epi32_mask(m, exp, _mm512_set1_epi32(0x7F800000)));
}

inline void store_bf16(uint16_t* dst, __m512 v, __mmask16 m) {  // nearest even, integer ops
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  _mm256_mask_storeu_epi16(dst, m, _mm512_cvtepi32_epi16(r));
}
#endif

}  // namespace

// dst rows [rows, row_bytes] (rows `dst_stride` bytes apart) = src rows (`src_stride` apart);
// returns how many elements of `itemsize` bytes (1, 2, 4 or 8) have their bits without the
// sign >= `threshold` (0: no check).
extern "C" int64_t grok_copy_checked(const uint8_t* src, int64_t src_stride, uint8_t* dst,
                                     int64_t dst_stride, int64_t rows, int64_t row_bytes,
                                     int32_t itemsize, uint64_t threshold) {
  int64_t bad = 0;
  const uint64_t no_sign = itemsize >= 8 ? ~(uint64_t(1) << 63) : (uint64_t(1) << (8 * itemsize - 1)) - 1;
#if defined(__AVX512BW__)
  const bool check = threshold != 0;
  const __m512i sign_off = _mm512_set1_epi64(int64_t(
      itemsize == 1 ? 0x7F7F7F7F7F7F7F7FULL
      : itemsize == 2 ? 0x7FFF7FFF7FFF7FFFULL
      : itemsize == 4 ? 0x7FFFFFFF7FFFFFFFULL
                      : 0x7FFFFFFFFFFFFFFFULL));
  const __m512i thr = itemsize == 1   ? _mm512_set1_epi8(char(threshold))
                      : itemsize == 2 ? _mm512_set1_epi16(short(threshold))
                      : itemsize == 4 ? _mm512_set1_epi32(int(threshold))
                                      : _mm512_set1_epi64(int64_t(threshold));
  auto count = [&](__m512i v, __mmask64 m) -> int64_t {
    const __m512i mag = _mm512_and_si512(v, sign_off);
    switch (itemsize) {
      case 1: return __builtin_popcountll(_mm512_mask_cmpge_epu8_mask(m, mag, thr));
      case 2: return __builtin_popcount(_mm512_mask_cmpge_epu16_mask(__mmask32(m), mag, thr));
      case 4: return __builtin_popcount(_mm512_mask_cmpge_epu32_mask(__mmask16(m), mag, thr));
      default: return __builtin_popcount(_mm512_mask_cmpge_epu64_mask(__mmask8(m), mag, thr));
    }
  };
  // The lanes of an element-aligned tail of n bytes, as a mask of the element size's lanes.
  auto tail_mask = [&](int64_t n) -> __mmask64 {
    const int64_t k = n / itemsize;
    return k >= 64 ? ~__mmask64(0) : (__mmask64(1) << k) - 1;
  };
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* s = src + r * src_stride;
    uint8_t* d = dst + r * dst_stride;
    int64_t b = 0;
    for (; b + 64 <= row_bytes; b += 64) {
      const __m512i v = _mm512_loadu_si512(s + b);
      _mm512_storeu_si512(d + b, v);
      if (check) bad += count(v, ~__mmask64(0));
    }
    if (b < row_bytes) {
      const int64_t n = row_bytes - b;
      const __mmask64 bytes = (__mmask64(1) << n) - 1;
      const __m512i v = _mm512_maskz_loadu_epi8(bytes, s + b);
      _mm512_mask_storeu_epi8(d + b, bytes, v);
      if (check) bad += count(v, tail_mask(n));
    }
  }
#else
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * dst_stride, src + r * src_stride, row_bytes);
    if (threshold == 0) continue;
    for (int64_t b = 0; b < row_bytes; b += itemsize) {
      uint64_t bits = 0;
      std::memcpy(&bits, dst + r * dst_stride + b, itemsize);
      bad += (bits & no_sign) >= threshold;
    }
  }
#endif
  (void)no_sign;
  return bad;
}

// out[r, c] = value(codes[r, c]) * scale[(row0 + r) / block_rows, (col0 + c) / block_cols] for
// r < rows, c < cols; codes and out rows `code_stride` / `out_stride` elements apart, scale
// rows `scale_stride` apart; out float32 (out_bf16 0) or bfloat16 bits (1). Returns how many
// values are not finite.
extern "C" int64_t grok_dequantize_fp8(const uint8_t* codes, int64_t code_stride, int64_t rows,
                                       int64_t cols, const float* scale, int64_t scale_stride,
                                       int64_t row0, int64_t col0, int64_t block_rows,
                                       int64_t block_cols, void* out, int64_t out_stride,
                                       int32_t out_bf16) {
  int64_t bad = 0;
#if defined(__AVX512F__) && defined(__AVX512VBMI__)
  const CodesToF32 table;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* src = codes + r * code_stride;
    const float* srow = scale + ((row0 + r) / block_rows) * scale_stride;
    for (int64_t c0 = 0; c0 < cols;) {
      // A run of columns under one scale, in steps of 64 codes.
      const int64_t col = col0 + c0;
      const int64_t run_end = std::min(cols, (col / block_cols + 1) * block_cols - col0);
      const __m512 s = _mm512_set1_ps(srow[col / block_cols]);
      for (int64_t c = c0; c < run_end; c += 64) {
        const int64_t n = std::min<int64_t>(64, run_end - c);
        const __mmask64 m = n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
        __m512 v[4];
        table.convert(_mm512_maskz_loadu_epi8(m, src + c), v);
        for (int q = 0; q < 4 && 16 * q < n; ++q) {
          const __mmask16 k = lanes(n - 16 * q);
          const __m512 x = _mm512_mul_ps(v[q], s);
          bad += non_finite(x, k);
          if (out_bf16)
            store_bf16(static_cast<uint16_t*>(out) + r * out_stride + c + 16 * q, x, k);
          else
            _mm512_mask_storeu_ps(static_cast<float*>(out) + r * out_stride + c + 16 * q, k, x);
        }
      }
      c0 = run_end;
    }
  }
#else
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float s = scale[((row0 + r) / block_rows) * scale_stride + (col0 + c) / block_cols];
      const float x = e4m3_to_float(codes[r * code_stride + c]) * s;
      bad += !std::isfinite(x);
      if (out_bf16)
        static_cast<uint16_t*>(out)[r * out_stride + c] = round_bf16(x);
      else
        static_cast<float*>(out)[r * out_stride + c] = x;
    }
#endif
  return bad;
}
