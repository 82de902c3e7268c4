// Shared by every kernel family of grok's native CPU library (grok/kernels/cpu): the row
// kernels (a few rows times a matrix, streamed from memory), the packed-panel kernels (many rows,
// register-blocked), the per-dtype structs the families are written over, the thread-pool
// helper, and the FFI helpers (a stacked operand's offset, the one dtype switch).
//
// Why these kernels exist (measured on a 2-core AVX-512 CPU, jaxlib 0.10.2, W [16384, 8192]):
// - XLA:CPU copies a matrix out of a stacked [L, ...] weight before every dot that reads it
//   inside the layer loop (a dynamic-slice cannot feed its matmul kernels), so a decode step
//   moved each weight three times;
// - its bfloat16 matrix-vector product ran at 1.7 GB/s for one row and 22 GB/s from two rows
//   up, its float32 one at 58 GB/s for one row and 19.5 GB/s for two.
// Here: bfloat16 50 GB/s (1 row) / 40 GB/s (2 rows), float32 51 / 47 GB/s, the bandwidth of
// the machine, with no copy.
//
// Every source of the library includes this header and is compiled into one shared library
// (grok/kernels/cpu/build.py) with -march=native; without AVX-512 the kernels compile away and
// grok_native_isa() (isa.cc) reports none, so the library keeps XLA's path.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

inline float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX512F__)

// The row kernels' per-dtype steps: a 64-byte load of weights or inputs, and the product
// that adds it into float32 lanes (FMA; vdpbf16ps multiplies bfloat16 pairs exactly).
struct DotF32 {
  using Elem = float;
  using Vec = __m512;
  static constexpr int64_t kStep = 16;  // elements per load
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 madd(__m512 acc, Vec w, Vec x) { return _mm512_fmadd_ps(w, x, acc); }
  static float value(float v) { return v; }
  // Attention's probabilities times values: a step of kKeys keys, its values (rows of Unit)
  // loaded under a mask and its probabilities broadcast.
  using Unit = float;
  static constexpr int64_t kKeys = 1;
  static Vec load_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
};

#if defined(__AVX512BF16__)
struct DotBf16 {  // bfloat16 as its uint16 bits
  using Elem = uint16_t;
  using Vec = __m512i;
  static constexpr int64_t kStep = 32;
  static Vec load(const uint16_t* p) { return _mm512_loadu_si512(static_cast<const void*>(p)); }
  static __m512 madd(__m512 acc, Vec w, Vec x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
  }
  static float value(uint16_t v) { return bf16_to_float(v); }
  using Unit = uint32_t;  // two keys' values interleaved (pack_value_pair)
  static constexpr int64_t kKeys = 2;
  static Vec load_masked(const uint32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }
  static Vec broadcast(const uint16_t* p) {  // a pair of probabilities
    int32_t pair;
    std::memcpy(&pair, p, sizeof pair);
    return _mm512_set1_epi32(pair);
  }
};
#endif

// Output rows [o0, o1) for R activation rows, OB output rows at a time: every weight cache
// line is loaded once and used for all R rows.
template <typename D, int R, int OB>
void rows_dot(const typename D::Elem* x, const typename D::Elem* w, float* y, int64_t I,
              int64_t O, int64_t o0, int64_t o1) {
  using Vec = typename D::Vec;
  const int64_t I_vec = I & ~(D::kStep - 1);  // whole loads (kStep is a power of two)
  int64_t o = o0;
  for (; o + OB <= o1; o += OB) {
    __m512 acc[OB][R];
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < I_vec; i += D::kStep) {
      Vec wv[OB];
      for (int j = 0; j < OB; ++j) {
        wv[j] = D::load(w + (o + j) * I + i);
        // The line four blocks ahead at the same offset, for two rows and more: the first pass
        // over a unit then streams from memory while it computes (expert GEMMs 300 -> 550
        // GFLOPS; batch-8 decode +12%). One row is bandwidth-bound already: there it cost 10%.
        if constexpr (R > 1)
          _mm_prefetch(reinterpret_cast<const char*>(w + (o + 4 * OB + j) * I + i), _MM_HINT_T0);
      }
      for (int r = 0; r < R; ++r) {
        const Vec xv = D::load(x + r * I + i);
        for (int j = 0; j < OB; ++j) acc[j][r] = D::madd(acc[j][r], wv[j], xv);
      }
    }
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(acc[j][r]);
        for (int64_t i = I_vec; i < I; ++i)
          s += D::value(w[(o + j) * I + i]) * D::value(x[r * I + i]);
        y[r * O + o + j] = s;
      }
  }
  if constexpr (OB > 1) {
    if (o < o1) rows_dot<D, R, 1>(x, w, y, I, O, o, o1);
  }
}

template <typename T>
using RowsFn = void (*)(const T*, const T*, float*, int64_t, int64_t, int64_t, int64_t);

// Many rows (prefill): a register-blocked product over packed panels of W. A panel holds
// kPanelOut outputs x kPanelIn inputs, transposed so that one vector load gives 16 outputs'
// weights at one input (float32) or at one input pair (bfloat16, the pair layout vdpbf16ps
// multiplies); each row's input is broadcast, and no horizontal sums are needed.
constexpr int kPanelOut = 32;   // two vectors of outputs
// Inputs per panel: 16 KB of packed weights either way, so that a panel and a row block's
// inputs stay in L1 (48 KB here) while the rows run over them.
constexpr int kPanelInF32 = 128;
constexpr int kPanelInBf16 = 256;
constexpr int kRowBlock = 12;   // rows per register block: 24 accumulators

inline __mmask16 head_mask(int64_t n) {  // the first n (0..16, more is all) of 16 lanes
  return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

inline void masks(int64_t on, __mmask16& m0, __mmask16& m1) {  // the first on of 32 lanes
  m0 = head_mask(on);
  m1 = on > 16 ? head_mask(on - 16) : __mmask16(0);
}

// A row block's accumulators: 2 vectors (kPanelOut outputs) per row, the first `on` valid;
// zero on the first panel of inputs, else the partial sums so far in y.
template <int RB>
inline void load_acc(__m512 (&acc)[RB][2], const float* y, int64_t O, int64_t on, bool first) {
  __mmask16 m0, m1;
  masks(on, m0, m1);
  for (int r = 0; r < RB; ++r) {
    acc[r][0] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + r * O);
    acc[r][1] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, y + r * O + 16);
  }
}

template <int RB>
inline void store_acc(const __m512 (&acc)[RB][2], float* y, int64_t O, int64_t on) {
  __mmask16 m0, m1;
  masks(on, m0, m1);
  for (int r = 0; r < RB; ++r) {
    _mm512_mask_storeu_ps(y + r * O, m0, acc[r][0]);
    _mm512_mask_storeu_ps(y + r * O + 16, m1, acc[r][1]);
  }
}

// 16 x 16 transpose of 32-bit elements, in registers: row i in r[i], column c out in r[c].
inline void transpose16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {  // 2 x 2 blocks within each 128-bit lane
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + c], lane L: rows 4i..4i+3 at column 4L + c
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i + 0], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i + 0], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of 128-bit lanes
    const __m512i s0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i s2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
  }
}

// Packs a panel: P[u * kPanelOut + o] = the 32-bit unit u (a float32, or a bfloat16 pair) of
// row o, for o < on (0 above) and u < units; rows 16 h .. 16 h + 15 start at halves[h], each
// `row_bytes` after the last (a paged KV cache: each half in its own page). Through 16 x 16
// register transposes: 5-11x faster than one gather per 16 units (W [32, 512] and [32, 8192],
// bf16), which had cost more than the products themselves for 32 rows.
void pack_unit_halves(const char* const (&halves)[2], int64_t row_bytes, int64_t on,
                      int64_t units, uint32_t* P) {
  for (int h = 0; h < kPanelOut / 16; ++h) {
    for (int64_t u0 = 0; u0 < units; u0 += 16) {
      const int64_t un = std::min<int64_t>(16, units - u0);
      const __mmask16 m = head_mask(un);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t o = 16 * h + i;  // masked loads: nothing past the row's units is read
        r[i] = o < on ? _mm512_maskz_loadu_epi32(m, halves[h] + i * row_bytes + 4 * u0)
                      : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int64_t c = 0; c < un; ++c) _mm512_store_si512(P + (u0 + c) * kPanelOut + 16 * h, r[c]);
    }
  }
}

// pack_unit_halves for rows `row_bytes` apart from w (a matrix, a dense cache's keys).
void pack_units(const char* w, int64_t row_bytes, int64_t on, int64_t units, uint32_t* P) {
  const char* const halves[2] = {w, w + 16 * row_bytes};
  pack_unit_halves(halves, row_bytes, on, units, P);
}

template <int RB>
void panel_rows_f32(const float* x, int64_t I, const float* P, int64_t kn, float* y, int64_t O,
                    int64_t on, bool first) {
  __m512 acc[RB][2];
  load_acc<RB>(acc, y, O, on, first);
  for (int64_t k = 0; k < kn; ++k) {
    const __m512 w0 = _mm512_load_ps(P + k * kPanelOut);
    const __m512 w1 = _mm512_load_ps(P + k * kPanelOut + 16);
    for (int r = 0; r < RB; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * I + k]);
      acc[r][0] = _mm512_fmadd_ps(w0, xb, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w1, xb, acc[r][1]);
    }
  }
  store_acc<RB>(acc, y, O, on);
}

// Packs the panel of outputs [ob, ob + on) x inputs [k0, k0 + kn) of w [O, I] into P: one
// 64-byte row of P holds 16 outputs' weights at one input.
void pack_f32(const float* w, int64_t I, int64_t ob, int64_t on, int64_t k0, int64_t kn,
              float* P) {
  pack_units(reinterpret_cast<const char*>(w + ob * I + k0), 4 * I, on, kn,
             reinterpret_cast<uint32_t*>(P));
}

// Each dtype's kernels, for the generic code below: the row kernels (`dot`), and the panel
// path's packing and row blocks.
struct KernelsF32 {
  using Elem = float;
  using Dot = DotF32;  // the row kernels' steps
  using Packed = float;
  static constexpr int64_t kIn = kPanelInF32;
  static constexpr int64_t kPackedRows = kIn;
  static void pack(const float* w, int64_t I, int64_t ob, int64_t on, int64_t k0, int64_t kn,
                   float* P) {
    pack_f32(w, I, ob, on, k0, kn, P);
  }
  template <int RB>
  static void rows(const float* x, int64_t I, const float* P, int64_t kn, float* y, int64_t O,
                   int64_t on, bool first) {
    panel_rows_f32<RB>(x, I, P, kn, y, O, on, first);
  }
  template <int R, int OB>
  static void dot(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t o0,
                  int64_t o1) {
    rows_dot<Dot, R, OB>(x, w, y, I, O, o0, o1);
  }
};

#if defined(__AVX512BF16__)
template <int RB>
void panel_rows_bf16(const uint16_t* x, int64_t I, const uint32_t* P, int64_t kn, float* y,
                     int64_t O, int64_t on, bool first) {
  __m512 acc[RB][2];
  load_acc<RB>(acc, y, O, on, first);
  const int64_t pairs = kn / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512i w0 = _mm512_load_si512(P + p * kPanelOut);
    const __m512i w1 = _mm512_load_si512(P + p * kPanelOut + 16);
    for (int r = 0; r < RB; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * I + 2 * p, sizeof pair);
      const __m512i xb = _mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)w0, (__m512bh)xb);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)w1, (__m512bh)xb);
    }
  }
  if (kn & 1) {  // the last input alone (its pair's other half is 0 in the panel)
    const __m512i w0 = _mm512_load_si512(P + pairs * kPanelOut);
    const __m512i w1 = _mm512_load_si512(P + pairs * kPanelOut + 16);
    for (int r = 0; r < RB; ++r) {
      const __m512i xb = _mm512_set1_epi32(int32_t(x[r * I + kn - 1]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)w0, (__m512bh)xb);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)w1, (__m512bh)xb);
    }
  }
  store_acc<RB>(acc, y, O, on);
}

// The bfloat16 panel: one 64-byte row of P holds 16 outputs' weight pairs at one input pair
// (the pairs need not be 4-byte aligned: an odd I works); an odd last input is read alone, as
// 16 bits (its pair would pass the row).
void pack_bf16(const uint16_t* w, int64_t I, int64_t ob, int64_t on, int64_t k0, int64_t kn,
               uint32_t* P) {
  pack_units(reinterpret_cast<const char*>(w + ob * I + k0), 2 * I, on, kn / 2, P);
  if (kn & 1) {
    const int64_t last = kn / 2;
    for (int64_t o = 0; o < kPanelOut; ++o)
      P[last * kPanelOut + o] = o < on ? w[(ob + o) * I + k0 + kn - 1] : 0;
  }
}

struct KernelsBf16 {
  using Elem = uint16_t;
  using Dot = DotBf16;
  using Packed = uint32_t;
  static constexpr int64_t kIn = kPanelInBf16;
  static constexpr int64_t kPackedRows = kIn / 2;
  static void pack(const uint16_t* w, int64_t I, int64_t ob, int64_t on, int64_t k0, int64_t kn,
                   uint32_t* P) {
    pack_bf16(w, I, ob, on, k0, kn, P);
  }
  template <int RB>
  static void rows(const uint16_t* x, int64_t I, const uint32_t* P, int64_t kn, float* y,
                   int64_t O, int64_t on, bool first) {
    panel_rows_bf16<RB>(x, I, P, kn, y, O, on, first);
  }
  template <int R, int OB>
  static void dot(const uint16_t* x, const uint16_t* w, float* y, int64_t I, int64_t O,
                  int64_t o0, int64_t o1) {
    rows_dot<Dot, R, OB>(x, w, y, I, O, o0, o1);
  }
};
#endif  // __AVX512BF16__

// A panel kernel: rows of x (row stride I) times a packed panel, into rows of y (stride O).
template <typename K>
using PanelFn = void (*)(const typename K::Elem*, int64_t, const typename K::Packed*, int64_t,
                         float*, int64_t, int64_t, bool);

template <typename K, int... RB>
const PanelFn<K>* panel_table(std::integer_sequence<int, RB...>) {
  static const PanelFn<K> fns[] = {nullptr, K::template rows<RB + 1>...};
  return fns;
}

// The panel kernels for 1 .. kRowBlock rows, by row count (entry 0 unused): the GEMM's and
// the attention's scores.
template <typename K>
const PanelFn<K>* panel_rows() {
  return panel_table<K>(std::make_integer_sequence<int, kRowBlock>());
}

// Units of work, claimed through an atomic counter by the calling thread and by helpers on
// XLA's intra-op pool. The caller waits for units, not for helpers: a helper that starts late
// finds nothing left and only touches this shared state (never `f`, whose captures may be gone).
struct Units {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
};

// Runs f(u) for u in [0, count) over the calling thread and, with `helpers`, the pool's.
template <typename F>
void for_units(ffi::ThreadPool& pool, int64_t count, bool helpers, F f) {
  if (count <= 0) return;
  auto state = std::make_shared<Units>();
  state->count = count;
  auto fn = std::make_shared<F>(std::move(f));
  auto work = [state, fn]() {
    for (;;) {
      const int64_t u = state->next.fetch_add(1);
      if (u >= state->count) return;
      (*fn)(u);
      state->done.fetch_add(1);
    }
  };
  if (helpers) {
    const int64_t n = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), count) - 1;
    for (int64_t h = 0; h < n; ++h) {
      auto task = work;
      pool.Schedule(std::move(task));
    }
  }
  work();
  while (state->done.load() < state->count) std::this_thread::yield();
}

#endif  // __AVX512F__

// The offset of w[index] (elements), each index taken as lax.dynamic_slice does (a negative one
// counts from the end, then it is clamped into range),
// for w [*lead, *rest] with rest the last `rest_rank` axes.
int64_t lead_offset(ffi::AnyBuffer::Dimensions wd, const int32_t* index, int64_t n_lead,
                    int64_t rest_elements) {
  int64_t offset = 0, stride = rest_elements;
  for (int64_t k = n_lead - 1; k >= 0; --k) {
    const int64_t i = index[k] < 0 ? int64_t(index[k]) + wd[k] : int64_t(index[k]);
    const int64_t at = std::clamp<int64_t>(i, 0, wd[k] - 1);
    offset += at * stride;
    stride *= wd[k];
  }
  return offset;
}

#if defined(__AVX512F__)
// Calls f(K{}) with the kernels for dtype dt (float32; bfloat16, or its uint16 bits), or says
// that there are none: the one dtype switch of every handler.
template <typename F>
ffi::Error for_dtype(const char* name, ffi::DataType dt, F f) {
  switch (dt) {
    case ffi::DataType::F32:
      f(KernelsF32{});
      return ffi::Error::Success();
#if defined(__AVX512BF16__)
    case ffi::DataType::BF16:
    case ffi::DataType::U16:  // bfloat16 as its uint16 bits (the KV cache's carried form)
      f(KernelsBf16{});
      return ffi::Error::Success();
#endif
    default:
      return ffi::Error::InvalidArgument(std::string(name) + ": no kernel for this dtype");
  }
}
#endif

}  // namespace
