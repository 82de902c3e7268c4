// grok_quant_matvec and grok_quant_grouped_matvec: grok_matvec's and grok_grouped_matvec's
// products (matvec.cc) with the weights stored as 8-bit codes, float8_e4m3fn or int8, and
// float32 scales, both read where they lie:
//
//   y[r, o] = sum_g scale[o, g] * sum_{i in group g} value(code[o, i]) * x[r, i]
//
// with the inputs in G groups of kGroup (the last one partial), or G = 1: one scale per output
// row (grok.quant's "fp8" and "int8"; "fp8-block" keeps a 128 x 128-tiled checkpoint's scales
// as one per row and group). x is bfloat16; the sums are float32.
//
// Codes become bfloat16 in registers by table lookup: vpermi2b (AVX512-VBMI) looks 64 codes up
// at once in two 64-byte tables, once for the high bytes of their bfloat16 values and once for
// the low bytes, and two byte interleaves make the 16-bit values. Every e4m3 value (subnormals
// and 448 included) and every int8 is exact in bfloat16, so vdpbf16ps forms the exact products
// of the codes' values and x, as the bf16 kernels do for bf16 weights. Five instructions for 64
// e4m3 codes (the sign is or-ed in; int8, two's complement, takes four tables and a blend): the
// shift tricks (the code's exponent and mantissa moved into place, the bias folded into the
// scale) need a fix-up for e4m3's subnormals that cost more, and vdpbf16ps flushes the
// subnormal bfloat16 a bias-free shift would make.
//
// The interleaves leave a vector's 64 values in a fixed order of 8-element runs (runs 0, 2, 4,
// 6 in the first vector, 1, 3, 5, 7 in the second); the row kernels read x permuted the same
// way (`permute_rows`), made once per call. The panel path (many rows) converts a panel's codes
// to bfloat16 rows in natural order and packs them as the bf16 panels are packed.
#include "common.h"

namespace {

constexpr int64_t kGroup = 128;   // inputs per scale when a row has several (G > 1)
constexpr int64_t kCodes = 64;    // codes per vector
constexpr int kQuantMaxRows = 8;  // rows per pass of the row kernels (as matvec.cc's)
// From this many rows of one product on, the packed panels: converting a unit's codes once
// per panel instead of once per pass of 8 rows. Measured (bench-grok1 experts, 2 threads):
// see the docs (native-kernels.md).
constexpr int64_t kQuantGemmRows = 32;

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)

// bfloat16 bits of every code's value, as high and low bytes.
struct CodeTable {
  alignas(64) uint8_t hi[256];
  alignas(64) uint8_t lo[256];
};

inline uint16_t bf16_bits_of(float f) {  // exact values only (no rounding needed)
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return uint16_t(u >> 16);
}

CodeTable make_table(float (*value)(int)) {
  CodeTable t;
  for (int c = 0; c < 256; ++c) {
    const uint16_t b = bf16_bits_of(value(c));
    t.hi[c] = uint8_t(b >> 8);
    t.lo[c] = uint8_t(b & 0xFF);
  }
  return t;
}

float e4m3_value(int c) {  // float8_e4m3fn: bias 7, no infinities, S.1111.111 NaN
  const int e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return std::nanf("");
  const float mag = e ? std::ldexp(1.0f + m / 8.0f, e - 7) : std::ldexp(m / 8.0f, -6);
  return (c & 0x80) ? -mag : mag;
}

float int8_value(int c) { return float(int8_t(uint8_t(c))); }

// The two 64-code halves of a vector as bfloat16, in the permuted order (see the top).
inline void interleave(__m512i lo, __m512i hi, __m512i& a, __m512i& b) {
  a = _mm512_unpacklo_epi8(lo, hi);
  b = _mm512_unpackhi_epi8(lo, hi);
}

// float8_e4m3fn: sign and magnitude, so 128-entry tables on the low 7 bits and the sign or-ed
// into the high byte.
struct E4m3 {
  struct Regs {
    __m512i hi0, hi1, lo0, lo1, sign;
  };
  static Regs regs() {
    static const CodeTable t = make_table(e4m3_value);
    return {_mm512_load_si512(t.hi), _mm512_load_si512(t.hi + 64), _mm512_load_si512(t.lo),
            _mm512_load_si512(t.lo + 64), _mm512_set1_epi8(char(0x80))};
  }
  static void to_bf16(const Regs& t, __m512i c, __m512i& a, __m512i& b) {
    __m512i hi = _mm512_permutex2var_epi8(t.hi0, c, t.hi1);  // bits 0-6 index, 7 ignored
    hi = _mm512_ternarylogic_epi32(hi, c, t.sign, 0xF8);      // hi | (c & 0x80)
    interleave(_mm512_permutex2var_epi8(t.lo0, c, t.lo1), hi, a, b);
  }
};

// int8: 256-entry tables, the half picked by the code's top bit.
struct Int8 {
  struct Regs {
    __m512i hi[4], lo[4];
  };
  static Regs regs() {
    static const CodeTable t = make_table(int8_value);
    Regs r;
    for (int k = 0; k < 4; ++k) {
      r.hi[k] = _mm512_load_si512(t.hi + 64 * k);
      r.lo[k] = _mm512_load_si512(t.lo + 64 * k);
    }
    return r;
  }
  static void to_bf16(const Regs& t, __m512i c, __m512i& a, __m512i& b) {
    const __mmask64 top = _mm512_movepi8_mask(c);
    const __m512i hi = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t.hi[0], c, t.hi[1]),
                                              _mm512_permutex2var_epi8(t.hi[2], c, t.hi[3]));
    const __m512i lo = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t.lo[0], c, t.lo[1]),
                                              _mm512_permutex2var_epi8(t.lo[2], c, t.lo[3]));
    interleave(lo, hi, a, b);
  }
};

inline __mmask64 code_mask(int64_t n) {  // the first n (0..64, more is all) of 64 lanes
  return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
}

// Rows of bfloat16 x [R, I] (row stride I) into xp [R, Ip] (Ip = I rounded up to kCodes), each
// block of 64 inputs in the order the codes' conversion leaves them, zeros past I.
void permute_rows(const uint16_t* x, int64_t R, int64_t I, uint16_t* xp) {
  const int64_t Ip = (I + kCodes - 1) / kCodes * kCodes;
  for (int64_t r = 0; r < R; ++r) {
    const uint16_t* src = x + r * I;
    uint16_t* dst = xp + r * Ip;
    for (int64_t i0 = 0; i0 < Ip; i0 += kCodes)
      for (int64_t k = 0; k < kCodes; ++k) {
        // Vector half h = run & 1, lane L = run >> 1, element e: position 32 h + 8 L + e.
        const int64_t run = k >> 3, at = 32 * (run & 1) + 8 * (run >> 1) + (k & 7);
        dst[i0 + at] = i0 + k < I ? src[i0 + k] : 0;
      }
  }
}

// Output rows [o0, o1) for R rows of permuted x, OB output rows at a time (each code loaded and
// converted once for all R rows). kGroups: G > 1 scales per row, each group's sum scaled into a
// second set of accumulators; else one scale per row, applied to the whole sum.
template <typename C, int R, int OB, bool kGroups>
void quant_rows(const typename C::Regs& t, const uint16_t* xp, int64_t Ip, const uint8_t* w,
                int64_t I, const float* s, int64_t G, float* y, int64_t O, int64_t o0,
                int64_t o1) {
  const int64_t width = kGroups ? kGroup : I;  // inputs per scale
  int64_t o = o0;
  for (; o + OB <= o1; o += OB) {
    __m512 acc[OB][R], tot[kGroups ? OB : 1][kGroups ? R : 1];
    if constexpr (kGroups)
      for (int j = 0; j < OB; ++j)
        for (int r = 0; r < R; ++r) tot[j][r] = _mm512_setzero_ps();
    for (int64_t g0 = 0, g = 0; g0 < I; g0 += width, ++g) {
      for (int j = 0; j < OB; ++j)
        for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
      const int64_t g1 = std::min(I, g0 + width);
      for (int64_t i = g0; i < g1; i += kCodes) {
        const __mmask64 m = code_mask(I - i);  // codes past I read as 0 (x is 0 there too)
        // One output row's codes at a time, converted, then every row of x: the live
        // registers are the accumulators, one row's two converted vectors and the tables.
        for (int j = 0; j < OB; ++j) {
          const uint8_t* row = w + (o + j) * I + i;
          __m512i a, b;
          C::to_bf16(t, _mm512_maskz_loadu_epi8(m, row), a, b);
          // The line four blocks of rows ahead at the same offset, as rows_dot (common.h)
          // does from two rows up; here for one row too: the conversion leaves fewer loads
          // in flight than the bf16 kernel's, and without it one row read the head of
          // bench-grok1 (32000 x 512 codes, one thread) at half the bf16 kernel's bytes/s
          // (3.3 against 3.4 ms); with it in 1.8 against 3.2 ms.
          _mm_prefetch(reinterpret_cast<const char*>(row + 4 * OB * I), _MM_HINT_T0);
          for (int r = 0; r < R; ++r) {
            const __m512i xa = _mm512_loadu_si512(xp + r * Ip + i);
            const __m512i xb = _mm512_loadu_si512(xp + r * Ip + i + 32);
            acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)a, (__m512bh)xa);
            acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)b, (__m512bh)xb);
          }
        }
      }
      if constexpr (kGroups)
        for (int j = 0; j < OB; ++j) {
          const __m512 sj = _mm512_set1_ps(s[(o + j) * G + g]);
          for (int r = 0; r < R; ++r) tot[j][r] = _mm512_fmadd_ps(acc[j][r], sj, tot[j][r]);
        }
    }
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < R; ++r) {
        if constexpr (kGroups)
          y[r * O + o + j] = _mm512_reduce_add_ps(tot[j][r]);
        else
          y[r * O + o + j] = _mm512_reduce_add_ps(acc[j][r]) * s[o + j];
      }
  }
  if constexpr (OB > 1) {
    if (o < o1) quant_rows<C, R, 1, kGroups>(t, xp, Ip, w, I, s, G, y, O, o, o1);
  }
}

template <typename C>
using QuantRowsFn = void (*)(const typename C::Regs&, const uint16_t*, int64_t, const uint8_t*,
                             int64_t, const float*, int64_t, float*, int64_t, int64_t, int64_t);

// Output rows per block: 16 accumulators at most (32 with groups' second set), within the 32
// vector registers beside the tables and the converted codes.
template <typename C, bool kGroups>
QuantRowsFn<C> pick_quant_rows(int64_t r) {
  constexpr int kWide = kGroups ? 2 : 4, kNarrow = kGroups ? 1 : 2;
  switch (r) {
    case 1: return quant_rows<C, 1, 4, kGroups>;
    case 2: return quant_rows<C, 2, kWide, kGroups>;
    case 3: return quant_rows<C, 3, kWide, kGroups>;
    case 4: return quant_rows<C, 4, kWide, kGroups>;
    case 5: return quant_rows<C, 5, kNarrow, kGroups>;
    case 6: return quant_rows<C, 6, kNarrow, kGroups>;
    case 7: return quant_rows<C, 7, kNarrow, kGroups>;
    default: return quant_rows<C, 8, kNarrow, kGroups>;
  }
}

// The panel path: the codes of outputs [ob, ob + on) x inputs [k0, k0 + kn) (kn <= 256) as
// bfloat16 rows in natural order in `rows` (row stride kPanelInBf16), then packed as a bf16
// panel (pack_bf16, common.h).
template <typename C>
void pack_codes(const typename C::Regs& t, const uint8_t* w, int64_t I, int64_t ob, int64_t on,
                int64_t k0, int64_t kn, uint16_t* rows, uint32_t* P) {
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);  // runs 0..3 in order
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t o = 0; o < on; ++o) {
    const uint8_t* src = w + (ob + o) * I + k0;
    uint16_t* dst = rows + o * kPanelInBf16;
    for (int64_t k = 0; k < kn; k += kCodes) {
      __m512i a, b;
      C::to_bf16(t, _mm512_maskz_loadu_epi8(code_mask(kn - k), src + k), a, b);
      _mm512_storeu_si512(dst + k, _mm512_permutex2var_epi64(a, first, b));
      _mm512_storeu_si512(dst + k + 32, _mm512_permutex2var_epi64(a, second, b));
    }
  }
  pack_bf16(rows, kPanelInBf16, 0, on, 0, kn, P);
}

// The panel path for one unit (outputs [o0, o1), all R rows of natural-order x): for each
// panel (one group's inputs, or 256 with one scale per row), every row block's product into a
// small tile, then y (+)= tile * the panel's scales.
template <typename C>
void quant_gemm(const typename C::Regs& t, const uint16_t* x, const uint8_t* w, const float* s,
                int64_t G, float* y, int64_t R, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  const PanelFn<KernelsBf16>* fns = panel_rows<KernelsBf16>();
  const int64_t k_step = G > 1 ? kGroup : kPanelInBf16;
  thread_local std::vector<uint32_t> storage;
  thread_local std::vector<uint16_t> rows;
  storage.resize((kPanelInBf16 / 2) * kPanelOut + 16);
  rows.resize(kPanelOut * kPanelInBf16 + 32);
  uint32_t* P = reinterpret_cast<uint32_t*>(
      (reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));  // 64-byte aligned
  alignas(64) float tile[kRowBlock * kPanelOut] = {};
  alignas(64) float scale[kPanelOut];
  constexpr int64_t kChunk = 256;  // rows per pass over the panels (as matvec.cc's kRowChunk)
  for (int64_t c0 = 0; c0 < R; c0 += kChunk) {
    const int64_t chunk = std::min(kChunk, R - c0);
    for (int64_t ob = o0; ob < o1; ob += kPanelOut) {
      const int64_t on = std::min<int64_t>(kPanelOut, o1 - ob);
      __mmask16 m0, m1;
      masks(on, m0, m1);
      for (int64_t k0 = 0; k0 < I; k0 += k_step) {
        const int64_t kn = std::min<int64_t>(k_step, I - k0);
        pack_codes<C>(t, w, I, ob, on, k0, kn, rows.data(), P);
        const int64_t g = G > 1 ? k0 / kGroup : 0;
        for (int64_t o = 0; o < kPanelOut; ++o) scale[o] = o < on ? s[(ob + o) * G + g] : 0.0f;
        const __m512 s0 = _mm512_load_ps(scale), s1 = _mm512_load_ps(scale + 16);
        for (int64_t r0 = 0; r0 < chunk; r0 += kRowBlock) {
          const int64_t rn = std::min<int64_t>(kRowBlock, chunk - r0);
          const int64_t r = c0 + r0;
          fns[rn](x + r * I + k0, I, P, kn, tile, kPanelOut, on, true);
          for (int64_t q = 0; q < rn; ++q) {
            float* yr = y + (r + q) * O + ob;
            const __m512 t0 = _mm512_load_ps(tile + q * kPanelOut);
            const __m512 t1 = _mm512_load_ps(tile + q * kPanelOut + 16);
            const __m512 y0 = k0 ? _mm512_maskz_loadu_ps(m0, yr) : _mm512_setzero_ps();
            const __m512 y1 = k0 ? _mm512_maskz_loadu_ps(m1, yr + 16) : _mm512_setzero_ps();
            _mm512_mask_storeu_ps(yr, m0, _mm512_fmadd_ps(t0, s0, y0));
            _mm512_mask_storeu_ps(yr + 16, m1, _mm512_fmadd_ps(t1, s1, y1));
          }
        }
      }
    }
  }
}

// One product of the call: `rows` rows of x from `row` (natural order at x, permuted at xp)
// times the codes at w with their scales at s, into y (row stride O).
struct QuantJob {
  const uint16_t* x;
  const uint16_t* xp;
  const uint8_t* w;
  const float* s;
  float* y;
  int64_t rows;
};

template <typename C>
void run_quant(ffi::ThreadPool& pool, const std::vector<QuantJob>& jobs, int64_t I, int64_t Ip,
               int64_t O, int64_t G) {
  if (jobs.empty()) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t n_jobs = jobs.size();
  bool panels = false;
  for (const QuantJob& job : jobs) panels = panels || job.rows >= kQuantGemmRows;
  // Units as matvec.cc's run(): about 8 per thread, each unit's codes (at most 64 KB) kept in
  // L2 for its later passes of 8 rows.
  const int64_t align = panels ? kPanelOut : 4;
  const int64_t cached = std::max<int64_t>(16, (int64_t(64) << 10) / I);
  int64_t chunk = std::clamp<int64_t>(O * n_jobs / (threads * 8), 16, cached);
  chunk = std::min<int64_t>((chunk + align - 1) / align * align, O);
  const int64_t per_job = (O + chunk - 1) / chunk;
  for_units(pool, per_job * n_jobs, O * I * n_jobs >= (int64_t(1) << 16), [&](int64_t u) {
    const QuantJob& job = jobs[u / per_job];
    const int64_t o0 = (u % per_job) * chunk, o1 = std::min(O, o0 + chunk);
    const typename C::Regs t = C::regs();
    if (job.rows >= kQuantGemmRows) {
      quant_gemm<C>(t, job.x, job.w, job.s, G, job.y, job.rows, I, O, o0, o1);
      return;
    }
    for (int64_t r0 = 0; r0 < job.rows; r0 += kQuantMaxRows) {
      const int64_t rows = std::min<int64_t>(kQuantMaxRows, job.rows - r0);
      const QuantRowsFn<C> fn =
          G > 1 ? pick_quant_rows<C, true>(rows) : pick_quant_rows<C, false>(rows);
      fn(t, job.xp + r0 * Ip, Ip, job.w, I, job.s, G, job.y + r0 * O, O, o0, o1);
    }
  });
}

#endif  // __AVX512BF16__ && __AVX512VBMI__

// A product in buffer coordinates: `rows` rows of x from row `row` (and of y likewise) times
// the codes from element `w_elem` of w and the scales from element `s_elem` of the scales.
struct QuantPart {
  int64_t row;
  int64_t w_elem;
  int64_t s_elem;
  int64_t rows;
};

// Runs `parts` for x [R, I] (bfloat16 or its uint16 bits) and codes w (e4m3 or int8).
ffi::Error quant_dispatch(const char* name, ffi::ThreadPool& pool, ffi::AnyBuffer x,
                          ffi::AnyBuffer w, const float* s, float* y,
                          const std::vector<QuantPart>& parts, int64_t R, int64_t I, int64_t O,
                          int64_t G) {
  const auto xt = x.element_type(), wt = w.element_type();
  if (xt != ffi::DataType::BF16 && xt != ffi::DataType::U16)
    return ffi::Error::InvalidArgument(std::string(name) + ": x must be bfloat16");
  if (wt != ffi::DataType::F8E4M3FN && wt != ffi::DataType::S8)
    return ffi::Error::InvalidArgument(std::string(name) + ": w must be float8_e4m3fn or int8");
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
  const uint16_t* xv = static_cast<const uint16_t*>(x.untyped_data());
  const uint8_t* wv = static_cast<const uint8_t*>(w.untyped_data());
  const int64_t Ip = (I + kCodes - 1) / kCodes * kCodes;
  bool few = false;  // whether some part takes the row kernels (which read x permuted)
  for (const QuantPart& p : parts) few = few || p.rows < kQuantGemmRows;
  std::vector<uint16_t> xp(few ? R * Ip : 0);
  if (few) permute_rows(xv, R, I, xp.data());
  std::vector<QuantJob> jobs;
  for (const QuantPart& p : parts)
    jobs.push_back({xv + p.row * I, few ? xp.data() + p.row * Ip : nullptr, wv + p.w_elem,
                    s + p.s_elem, y + p.row * O, p.rows});
  if (wt == ffi::DataType::F8E4M3FN)
    run_quant<E4m3>(pool, jobs, I, Ip, O, G);
  else
    run_quant<Int8>(pool, jobs, I, Ip, O, G);
  return ffi::Error::Success();
#else
  return ffi::Error::Internal(std::string(name) + ": built without AVX512-BF16 and AVX512-VBMI");
#endif
}

// Checks the scales' shape [*lead, (groups,) O, G] against w [*lead, (groups,) O, I]: G is 1,
// or ceil(I / kGroup).
bool scales_fit(ffi::AnyBuffer::Dimensions wd, ffi::AnyBuffer::Dimensions sd) {
  const size_t rank = wd.size();
  if (sd.size() != rank) return false;
  for (size_t k = 0; k + 1 < rank; ++k)
    if (sd[k] != wd[k]) return false;
  const int64_t G = sd[rank - 1], I = wd[rank - 1];
  return G == 1 || G == (I + kGroup - 1) / kGroup;
}

// y [R, O] = x [R, I] times the codes w[index] ([*lead, O, I]) with scales s[index]
// ([*lead, O, G]).
ffi::Error QuantMatvec(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                       ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::S32> index,
                       ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto wd = w.dimensions(), xd = x.dimensions();
  const int64_t rank = wd.size();
  if (rank < 2 || xd.size() != 2 || xd[1] != wd[rank - 1] || !scales_fit(wd, s.dimensions()))
    return ffi::Error::InvalidArgument(
        "grok_quant_matvec: x [R, I], w [..., O, I] and scales [..., O, 1 or ceil(I/128)]");
  if (index.element_count() != size_t(rank - 2))
    return ffi::Error::InvalidArgument("grok_quant_matvec: one index per leading axis of w");
  const int64_t O = wd[rank - 2], I = wd[rank - 1], R = xd[0], G = s.dimensions()[rank - 1];
  const int64_t w_at = lead_offset(wd, index.typed_data(), rank - 2, O * I);
  const int64_t s_at = lead_offset(s.dimensions(), index.typed_data(), rank - 2, O * G);
  return quant_dispatch("grok_quant_matvec", pool, x, w, s.typed_data(), y->typed_data(),
                        {{0, w_at, s_at, R}}, R, I, O, G);
}

// y [A, O] = rows of x [A, I], sorted by group, each times its group's codes
// w[index..., g] ([*lead, E, O, I]) and scales s[index..., g] ([*lead, E, O, G]); sizes [E] rows
// per group. Rows past sum(sizes) are 0.
ffi::Error QuantGroupedMatvec(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                              ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::S32> index,
                              ffi::Buffer<ffi::S32> sizes, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto wd = w.dimensions(), xd = x.dimensions();
  const int64_t rank = wd.size();
  if (rank < 3 || xd.size() != 2 || xd[1] != wd[rank - 1] || !scales_fit(wd, s.dimensions()))
    return ffi::Error::InvalidArgument(
        "grok_quant_grouped_matvec: x [A, I], w [..., E, O, I], scales [..., E, O, G]");
  const int64_t E = wd[rank - 3], O = wd[rank - 2], I = wd[rank - 1], A = xd[0];
  const int64_t G = s.dimensions()[rank - 1];
  if (index.element_count() != size_t(rank - 3) || sizes.element_count() != size_t(E))
    return ffi::Error::InvalidArgument("grok_quant_grouped_matvec: index or sizes length");
  const int64_t w_at = lead_offset(wd, index.typed_data(), rank - 3, E * O * I);
  const int64_t s_at = lead_offset(s.dimensions(), index.typed_data(), rank - 3, E * O * G);
  std::vector<QuantPart> parts;
  int64_t start = 0;
  for (int64_t e = 0; e < E && start < A; ++e) {
    const int64_t n = std::min<int64_t>(std::max<int32_t>(sizes.typed_data()[e], 0), A - start);
    if (n > 0) parts.push_back({start, w_at + e * O * I, s_at + e * O * G, n});
    start += n;
  }
  float* out = y->typed_data();
  std::fill(out + start * O, out + A * O, 0.0f);
  return quant_dispatch("grok_quant_grouped_matvec", pool, x, w, s.typed_data(), out, parts, A,
                        I, O, G);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokQuantMatvec, QuantMatvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [R, I] bfloat16
                                  .Arg<ffi::AnyBuffer>()           // w [*lead, O, I] codes
                                  .Arg<ffi::Buffer<ffi::F32>>()    // scales [*lead, O, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // index [len(lead)]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [R, O]

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokQuantGroupedMatvec, QuantGroupedMatvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()           // x [A, I] bfloat16
                                  .Arg<ffi::AnyBuffer>()           // w [*lead, E, O, I] codes
                                  .Arg<ffi::Buffer<ffi::F32>>()    // scales [*lead, E, O, G]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // index [len(lead)]
                                  .Arg<ffi::Buffer<ffi::S32>>()    // sizes [E]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [A, O]
