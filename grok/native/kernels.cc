// grok's native CPU kernels, XLA FFI custom calls:
// - grok_matvec: y[R, O] (float32) = x[R, I] . W[O, I]^T, where W is one [O, I] matrix inside
//   a stacked weight w[*lead, O, I], picked by the int32 indices `index[len(lead)]` and read
//   where it lies; grok_grouped_matvec, the MoE's ragged product of the same kind;
// - grok_attention: causal grouped-query attention with Grok's capped, tempered logits
//   (further down).
//
// Why this exists (measured on a 2-core AVX-512 CPU, jaxlib 0.10.2, W [16384, 8192]):
// - XLA:CPU copies a matrix out of a stacked [L, ...] weight before every dot that reads it
//   inside the layer loop (a dynamic-slice cannot feed its matmul kernels), so a decode step
//   moved each weight three times;
// - its bfloat16 matrix-vector product ran at 1.7 GB/s for one row and 22 GB/s from two rows
//   up, its float32 one at 58 GB/s for one row and 19.5 GB/s for two.
// Here: bfloat16 50 GB/s (1 row) / 40 GB/s (2 rows), float32 51 / 47 GB/s, the bandwidth of
// the machine, with no copy.
//
// Built by grok/native/__init__.py on first use with -march=native; without AVX-512 it
// reports no kernels (grok_native_isa() == 0) and the library keeps XLA's path.
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

extern "C" int grok_native_isa() {
  int isa = 0;
#if defined(__AVX512F__)
  isa |= 1;  // float32 kernels
#if defined(__AVX512BF16__)
  isa |= 2;  // bfloat16 kernels
#endif
#endif
  return isa;
}

namespace {

constexpr int kMaxRows = 8;  // rows per pass over the weights; more rows take more passes

// An attention call's sizes (see grok_attention below) and its logit scale and cap (0: none).
struct AttnShape {
  int64_t B, T, S, Kh, G, H;
  float scale, cap;  // cap 0: no cap
};

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
// From this many rows of a product on, the panel path; below it the row kernels, which stream
// weights from memory with prefetches (and keep a unit's slice in L2 for their later passes).
// With the weights in cache the panels win from 16 rows (bf16 D 512 x Fe 1024, one thread: 394
// against 248 GFLOPS at 32 rows), but a prefill reads every layer's weights from memory, and
// there, 8 experts x 32 rows, two threads, the row kernels took 0.48 ms against 0.66.
constexpr int64_t kGemmRows = 64;
// Rows per pass over the packed panels: the rows' inputs stay in L2 while the panels change.
constexpr int64_t kRowChunk = 256;

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
// row o, rows `row_bytes` apart from w, for o < on (0 above) and u < units. Through 16 x 16
// register transposes: 5-11x faster than one gather per 16 units (W [32, 512] and [32, 8192],
// bf16), which had cost more than the products themselves for 32 rows.
void pack_units(const char* w, int64_t row_bytes, int64_t on, int64_t units, uint32_t* P) {
  for (int h = 0; h < kPanelOut / 16; ++h) {
    for (int64_t u0 = 0; u0 < units; u0 += 16) {
      const int64_t un = std::min<int64_t>(16, units - u0);
      const __mmask16 m = head_mask(un);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t o = 16 * h + i;  // masked loads: nothing past the row's units is read
        r[i] = o < on ? _mm512_maskz_loadu_epi32(m, w + o * row_bytes + 4 * u0)
                      : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int64_t c = 0; c < un; ++c) _mm512_store_si512(P + (u0 + c) * kPanelOut + 16 * h, r[c]);
    }
  }
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

// The panel path for one unit (outputs [o0, o1), all R rows): rows in chunks of kRowChunk, and
// for each chunk, panel by panel, every row block of kRowBlock rows over the packed panel.
template <typename K>
void gemm(const typename K::Elem* x, const typename K::Elem* w, float* y, int64_t R, int64_t I,
          int64_t O, int64_t o0, int64_t o1) {
  using Packed = typename K::Packed;
  const PanelFn<K>* fns = panel_rows<K>();
  thread_local std::vector<Packed> storage;
  storage.resize(K::kPackedRows * kPanelOut + 64 / sizeof(Packed));
  Packed* P = reinterpret_cast<Packed*>(
      (reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));  // 64-byte aligned
  for (int64_t c0 = 0; c0 < R; c0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, R - c0);
    for (int64_t ob = o0; ob < o1; ob += kPanelOut) {
      const int64_t on = std::min<int64_t>(kPanelOut, o1 - ob);
      for (int64_t k0 = 0; k0 < I; k0 += K::kIn) {
        const int64_t kn = std::min<int64_t>(K::kIn, I - k0);
        K::pack(w, I, ob, on, k0, kn, P);
        for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
          const int64_t rn = std::min<int64_t>(kRowBlock, rows - r0);
          const int64_t r = c0 + r0;
          fns[rn](x + r * I + k0, I, P, kn, y + r * O + ob, O, on, k0 == 0);
        }
      }
    }
  }
}

// Output rows per block: 4 for up to 4 activation rows, 2 above (16 accumulators at most,
// within the 32 vector registers with the loads).
template <typename K>
RowsFn<typename K::Elem> pick_rows(int64_t r) {
  switch (r) {
    case 1: return K::template dot<1, 4>;
    case 2: return K::template dot<2, 4>;
    case 3: return K::template dot<3, 4>;
    case 4: return K::template dot<4, 4>;
    case 5: return K::template dot<5, 2>;
    case 6: return K::template dot<6, 2>;
    case 7: return K::template dot<7, 2>;
    default: return K::template dot<8, 2>;
  }
}

// One product of the call: `rows` rows of x (row stride I) times the matrix at w, into y (row
// stride O).
template <typename T>
struct Job {
  const T* x;
  const T* w;
  float* y;
  int64_t rows;
};

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

template <typename K>
void run(ffi::ThreadPool& pool, std::vector<Job<typename K::Elem>> jobs, int64_t I, int64_t O) {
  using T = typename K::Elem;
  if (jobs.empty()) return;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t n_jobs = jobs.size();
  // About 8 units per thread over all jobs, at least 16 output rows each (whole panels when
  // some product takes the panel path).
  bool panels = false;
  for (const Job<T>& job : jobs) panels = panels || job.rows >= kGemmRows;
  // A unit's slice of W is re-read by every pass of 8 rows: at most 64 KB of it, so that it
  // stays in L2 (a grouped product of 8 experts first cut units of 512 outputs: 350 GFLOPS,
  // against 640-720 for the same rows through units of 64).
  const int64_t align = panels ? kPanelOut : 4;
  const int64_t cached = std::max<int64_t>(16, (int64_t(64) << 10) / (I * int64_t(sizeof(T))));
  int64_t chunk = std::clamp<int64_t>(O * n_jobs / (threads * 8), 16, cached);
  chunk = std::min<int64_t>((chunk + align - 1) / align * align, O);
  const int64_t per_job = (O + chunk - 1) / chunk;
  // Below about 64K weights in all a helper costs more than it saves.
  for_units(pool, per_job * n_jobs, O * I * n_jobs >= (int64_t(1) << 16), [&](int64_t u) {
    const Job<T>& job = jobs[u / per_job];
    const int64_t o0 = (u % per_job) * chunk, o1 = std::min(O, o0 + chunk);
    if (job.rows >= kGemmRows) {
      gemm<K>(job.x, job.w, job.y, job.rows, I, O, o0, o1);
      return;
    }
    for (int64_t r0 = 0; r0 < job.rows; r0 += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, job.rows - r0);
      pick_rows<K>(rows)(job.x + r0 * I, job.w, job.y + r0 * O, I, O, o0, o1);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// grok_attention: causal grouped-query attention with Grok's logits, for any number of queries
// (prefill, decode) against keys and values [B, S, K, H]: per query row (b, t, kv head k,
// group member g),
//   s_j = cap * tanh(q . k_j * scale / cap) * tau[b, t]  for keys j < min(pos[b, t] + 1,
//   len[b], S), the rest masked; p = softmax(s); out = p . v,
// with p rounded to v's dtype before the product, as grok.attention's XLA path does (and, like
// it, a row that sees no key averages all S values). XLA:CPU spent most of a bf16 prefill's
// attention time on layout copies around its two batched products and on elementwise passes
// over the [B, K, G, T, S] scores; here the scores of a tile of query rows live in one cache-
// resident buffer, keys are packed into the GEMM panels above and the causal mask skips the
// key panels past a tile's last position.

// exp for float32 lanes: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor series to r^7
// (relative error under 2e-7), times 2^n by vscalefps. Inputs are clamped to [-88, 88].
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2, high bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);        // ln 2, the rest
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// tanh(x) = sign(x) (1 - 2 / (exp(2|x|) + 1)): absolute error about 1e-7.
inline __m512 tanh512(__m512 x) {
  const __m512 a = _mm512_abs_ps(x);
  const __m512 e = exp512(_mm512_add_ps(a, a));
  const __m512 t = _mm512_sub_ps(_mm512_set1_ps(1.0f),
                                 _mm512_div_ps(_mm512_set1_ps(2.0f),
                                               _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
  return _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(t),
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int32_t(0x80000000u)))));
}

constexpr int64_t kAttnRows = kRowBlock;  // query rows per score block (the panel kernel's)
constexpr int64_t kAttnPvRows = 6;   // rows per probabilities-times-values block
constexpr int64_t kAttnPvVecs = 4;   // 64 outputs of H per block: 24 accumulators

// out[r, h0 : h0 + 16 * nv] = sum over keys j < n of p[r, j] v[j, h0 ...] for RB rows, D::kKeys
// keys a step: float32 value rows vs apart, or bfloat16 key pairs interleaved (vs = H; p is 0
// past n, its buffer padded to whole pairs).
template <typename D, int RB>
void pv_rows(const typename D::Elem* p, int64_t ps, const typename D::Unit* v, int64_t vs,
             int64_t n, int64_t H, int64_t h0, float* out, int64_t os) {
  const int64_t nv = std::min<int64_t>(kAttnPvVecs, (H - h0 + 15) / 16);
  __m512 acc[RB][kAttnPvVecs];
  __mmask16 m[kAttnPvVecs];
  for (int c = 0; c < kAttnPvVecs; ++c) {
    m[c] = c < nv ? head_mask(H - h0 - 16 * c) : __mmask16(0);
    for (int r = 0; r < RB; ++r) acc[r][c] = _mm512_setzero_ps();
  }
  const int64_t steps = (n + D::kKeys - 1) / D::kKeys;
  for (int64_t i = 0; i < steps; ++i) {
    typename D::Vec vv[kAttnPvVecs];
    for (int c = 0; c < kAttnPvVecs; ++c) vv[c] = D::load_masked(v + i * vs + h0 + 16 * c, m[c]);
    for (int r = 0; r < RB; ++r) {
      const typename D::Vec pb = D::broadcast(p + r * ps + D::kKeys * i);
      for (int c = 0; c < kAttnPvVecs; ++c) acc[r][c] = D::madd(acc[r][c], vv[c], pb);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int c = 0; c < nv; ++c) _mm512_mask_storeu_ps(out + r * os + h0 + 16 * c, m[c], acc[r][c]);
}

#if defined(__AVX512BF16__)
// Value rows j and j + 1 (at v0, v1; v1 null past the keys) interleaved: vp[h] = (v0[h], v1[h]).
void pack_value_pair(const uint16_t* v0, const uint16_t* v1, int64_t H, uint32_t* vp) {
  for (int64_t h = 0; h < H; h += 32) {
    const __mmask32 m = H - h >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (H - h)) - 1);
    const __m512i a = _mm512_maskz_loadu_epi16(m, v0 + h);
    const __m512i b = v1 ? _mm512_maskz_loadu_epi16(m, v1 + h) : _mm512_setzero_si512();
    // 16-bit lanes: lo = a0 b0 a1 b1 ... a15 b15, hi = a16 b16 ... a31 b31.
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9,
                                            40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33,
                                            1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    const int64_t left = H - h;  // 32-bit units of this step: min(32, left), 16 per vector
    _mm512_mask_storeu_epi32(vp + h, head_mask(left), _mm512_permutex2var_epi16(a, lo_idx, b));
    if (left > 16)
      _mm512_mask_storeu_epi32(vp + h + 16, head_mask(left - 16),
                               _mm512_permutex2var_epi16(a, hi_idx, b));
  }
}
#endif

// Per dtype: the products' element, the probabilities' element, and how a tile's rows of
// probabilities times values are summed (float32: one value row per key; bfloat16: key pairs,
// values interleaved by pairs for vdpbf16ps).
template <typename T>
struct AttnTraits;

template <>
struct AttnTraits<float> {
  using K = KernelsF32;
  using Prob = float;
  static void store_probs(float* dst, __m512 p, __mmask16 m) { _mm512_mask_storeu_ps(dst, m, p); }
  static void zero_probs(float* dst, int64_t n) { std::fill(dst, dst + n, 0.0f); }
  static void store_out(float* dst, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(dst, m, v); }
  static float round_prob(float v) { return v; }
  template <int RB>
  static void pv(const float* p, int64_t ps, const float* v, int64_t vs, const uint32_t*,
                 int64_t n, int64_t H, int64_t h0, float* out, int64_t os) {
    pv_rows<DotF32, RB>(p, ps, v, vs, n, H, h0, out, os);
  }
};

#if defined(__AVX512BF16__)
template <>
struct AttnTraits<uint16_t> {
  using K = KernelsBf16;
  using Prob = uint16_t;
  static void store_probs(uint16_t* dst, __m512 p, __mmask16 m) {
    _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(p));
  }
  static void zero_probs(uint16_t* dst, int64_t n) { std::fill(dst, dst + n, uint16_t(0)); }
  static void store_out(uint16_t* dst, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(v));
  }
  static float round_prob(float v) {  // to bfloat16 and back, nearest even (as cvtneps)
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  template <int RB>
  static void pv(const uint16_t* p, int64_t ps, const uint16_t*, int64_t, const uint32_t* vp,
                 int64_t n, int64_t H, int64_t h0, float* out, int64_t os) {
    pv_rows<DotBf16, RB>(p, ps, vp, H, n, H, h0, out, os);
  }
};
#endif

// One unit: batch row b, kv head kh, query positions [t0, t1).
template <typename T>
void attention_unit(const AttnShape& sh, const T* q, const T* k, const T* v, const float* tau,
                    const int32_t* pos, const int32_t* lens, T* out, int64_t b, int64_t kh,
                    int64_t t0, int64_t t1) {
  using Tr = AttnTraits<T>;
  using K = typename Tr::K;
  using Packed = typename K::Packed;
  using Prob = typename Tr::Prob;
  const int64_t S = sh.S, Kh = sh.Kh, G = sh.G, H = sh.H;
  const int64_t len = std::clamp<int64_t>(lens[b], 0, S);
  auto visible = [&](int64_t t) {  // keys j < visible(t) are seen by position t
    return std::clamp<int64_t>(std::min<int64_t>(int64_t(pos[b * sh.T + t]) + 1, len), 0, S);
  };
  int64_t key_end = 0;
  for (int64_t t = t0; t < t1; ++t) key_end = std::max(key_end, visible(t));
  const int64_t units = (H * int64_t(sizeof(T))) / 4;  // 32-bit units of a key row
  const int64_t panel = units * kPanelOut;             // packed elements per 32 keys
  const int64_t n_panels = (key_end + kPanelOut - 1) / kPanelOut;
  const int64_t key_stride = Kh * H;                   // elements between consecutive keys
  const T* kb = k + (b * S * Kh + kh) * H;
  const T* vb = v + (b * S * Kh + kh) * H;

  thread_local std::vector<Packed> kp_store;
  thread_local std::vector<uint32_t> vp_store;
  thread_local std::vector<T> q_store;
  thread_local std::vector<float> s_store, o_store;
  thread_local std::vector<Prob> p_store;
  kp_store.resize(n_panels * panel + 64);
  Packed* kp = reinterpret_cast<Packed*>((reinterpret_cast<uintptr_t>(kp_store.data()) + 63) &
                                         ~uintptr_t(63));
  for (int64_t i = 0; i < n_panels; ++i)
    pack_units(reinterpret_cast<const char*>(kb + i * kPanelOut * key_stride),
               key_stride * int64_t(sizeof(T)), std::min<int64_t>(kPanelOut, key_end - i * kPanelOut),
               units, reinterpret_cast<uint32_t*>(kp + i * panel));
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    const int64_t pairs = (key_end + 1) / 2;
    vp_store.resize(pairs * H);
    for (int64_t i = 0; i < pairs; ++i)
      pack_value_pair(vb + 2 * i * key_stride,
                      2 * i + 1 < key_end ? vb + (2 * i + 1) * key_stride : nullptr, H,
                      vp_store.data() + i * H);
  }
#endif

  // Query tiles: whole positions (their G rows share a mask and a temperature), ~12 rows.
  const int64_t tile_t = std::max<int64_t>(1, kAttnRows / G);
  const int64_t max_rows = tile_t * G;
  const int64_t width = n_panels * kPanelOut + 2;  // score / probability row stride
  q_store.resize(max_rows * H);
  s_store.resize(max_rows * width);
  p_store.resize(max_rows * width);
  o_store.resize(max_rows * H);
  const PanelFn<K>* score_fns = panel_rows<K>();
  for (int64_t ta = t0; ta < t1; ta += tile_t) {
    const int64_t tb = std::min(t1, ta + tile_t);
    const int64_t rows = (tb - ta) * G;
    int64_t tile_end = 0;
    for (int64_t t = ta; t < tb; ++t) tile_end = std::max(tile_end, visible(t));
    // The tile's query rows, contiguous (row (t, g) of q is ((b T + t) Kh + kh) G + g).
    for (int64_t t = ta; t < tb; ++t)
      std::memcpy(q_store.data() + (t - ta) * G * H, q + ((b * sh.T + t) * Kh + kh) * G * H,
                  G * H * sizeof(T));
    // Scores against the key panels the tile sees.
    const int64_t tile_panels = (tile_end + kPanelOut - 1) / kPanelOut;
    for (int64_t i = 0; i < tile_panels; ++i)
      for (int64_t r0 = 0; r0 < rows; r0 += kAttnRows) {
        const int64_t rn = std::min<int64_t>(kAttnRows, rows - r0);
        score_fns[rn](q_store.data() + r0 * H, H, kp + i * panel, H,
                      s_store.data() + r0 * width + i * kPanelOut, width, kPanelOut, true);
      }
    // Logits, mask and softmax, row by row; probabilities rounded to T.
    const __m512 scale = _mm512_set1_ps(sh.scale);
    const __m512 cap = _mm512_set1_ps(sh.cap), inv_cap = _mm512_set1_ps(sh.cap ? 1.0f / sh.cap : 0.0f);
    int64_t pv_end = 0;  // keys the tile's probabilities times values must cover
    std::vector<int64_t> blind;  // rows that see no key
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = ta + r / G;
      const int64_t n = visible(t);
      float* s = s_store.data() + r * width;
      Prob* p = p_store.data() + r * width;
      Tr::zero_probs(p, width);
      if (n == 0) {
        blind.push_back(r);
        continue;
      }
      const __m512 temp = _mm512_set1_ps(tau[b * sh.T + t]);
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = head_mask(n - j);
        __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), scale);
        if (sh.cap) x = _mm512_mul_ps(cap, tanh512(_mm512_mul_ps(x, inv_cap)));
        x = _mm512_mul_ps(x, temp);
        _mm512_mask_storeu_ps(s + j, m, x);
        mx = _mm512_mask_max_ps(mx, m, mx, x);
      }
      const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = head_mask(n - j);
        const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top)));
        _mm512_mask_storeu_ps(s + j, m, e);
        sum = _mm512_add_ps(sum, e);
      }
      const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = head_mask(n - j);
        Tr::store_probs(p + j, _mm512_div_ps(_mm512_maskz_loadu_ps(m, s + j), total), m);
      }
      pv_end = std::max(pv_end, n);
    }
    // Probabilities times values, into float32 rows, then rounded into out.
    float* o = o_store.data();
    for (int64_t r0 = 0; r0 < rows; r0 += kAttnPvRows) {
      const int64_t rn = std::min<int64_t>(kAttnPvRows, rows - r0);
      for (int64_t h0 = 0; h0 < H; h0 += 16 * kAttnPvVecs) {
#define GROK_PV_CASE(RB)                                                                  \
  case RB:                                                                                 \
    Tr::template pv<RB>(p_store.data() + r0 * width, width, vb, key_stride, vp_store.data(), \
                        pv_end, H, h0, o + r0 * H, H);                                     \
    break;
        switch (rn) {
          GROK_PV_CASE(1)
          GROK_PV_CASE(2)
          GROK_PV_CASE(3)
          GROK_PV_CASE(4)
          GROK_PV_CASE(5)
          GROK_PV_CASE(6)
        }
#undef GROK_PV_CASE
      }
    }
    // A row that sees no key: the mean of all S values, each weight 1/S rounded like p.
    for (int64_t r : blind) {
      const float w = Tr::round_prob(1.0f / float(S));
      for (int64_t h = 0; h < H; ++h) {
        float acc = 0.0f;
        for (int64_t j = 0; j < S; ++j) acc += w * K::Dot::value(vb[j * key_stride + h]);
        o[r * H + h] = acc;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = ta + r / G, g = r % G;
      T* dst = out + (((b * sh.T + t) * Kh + kh) * G + g) * H;
      for (int64_t h = 0; h < H; h += 16)
        Tr::store_out(dst + h, _mm512_loadu_ps(o + r * H + h), head_mask(H - h));
    }
  }
}

// Units of (batch row, kv head, chunk of query positions): about 4 per thread, chunks of at
// least 48 query rows (each unit packs the keys and values it sees).
template <typename T>
void attention(ffi::ThreadPool& pool, const AttnShape& sh, const T* q, const T* k, const T* v,
               const float* tau, const int32_t* pos, const int32_t* lens, T* out) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t bk = sh.B * sh.Kh;
  const int64_t most = std::max<int64_t>(1, sh.T * sh.G / 48);
  const int64_t want = std::clamp<int64_t>((4 * threads + bk - 1) / bk, 1, most);
  const int64_t per = (sh.T + want - 1) / want;
  const int64_t chunks = (sh.T + per - 1) / per;
  for_units(pool, bk * chunks, bk * chunks > 1, [&](int64_t u) {
    const int64_t b = u / (sh.Kh * chunks), kh = (u / chunks) % sh.Kh, c = u % chunks;
    attention_unit<T>(sh, q, k, v, tau, pos, lens, out, b, kh, c * per,
                      std::min(sh.T, (c + 1) * per));
  });
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

// A product in buffer coordinates: `rows` rows of x from row `row` (and of y likewise) times
// the [O, I] matrix `w_elem` elements into w.
struct Part {
  int64_t row;
  int64_t w_elem;
  int64_t rows;
};

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
    case ffi::DataType::U16:  // bfloat16 bits (grok.layers.as_bits)
      f(KernelsBf16{});
      return ffi::Error::Success();
#endif
    default:
      return ffi::Error::InvalidArgument(std::string(name) + ": no kernel for this dtype");
  }
}
#endif

// Runs `parts` in the buffers' dtype.
ffi::Error dispatch(ffi::ThreadPool& pool, ffi::AnyBuffer x, ffi::AnyBuffer w, float* y,
                    const std::vector<Part>& parts, int64_t I, int64_t O) {
#if defined(__AVX512F__)
  if (w.element_type() != x.element_type())
    return ffi::Error::InvalidArgument("grok_matvec: x and w dtypes differ");
  return for_dtype("grok_matvec", w.element_type(), [&](auto kernels) {
    using K = decltype(kernels);
    using T = typename K::Elem;
    const T* xp = static_cast<const T*>(x.untyped_data());
    const T* wp = static_cast<const T*>(w.untyped_data());
    std::vector<Job<T>> jobs;
    for (const Part& p : parts)
      jobs.push_back({xp + p.row * I, wp + p.w_elem, y + p.row * O, p.rows});
    run<K>(pool, std::move(jobs), I, O);
  });
#else
  return ffi::Error::Internal("grok_matvec: built without AVX-512");
#endif
}

ffi::Error Matvec(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                  ffi::Buffer<ffi::S32> index, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  const int64_t rank = wd.size();
  if (rank < 2 || xd.size() != 2)
    return ffi::Error::InvalidArgument("grok_matvec: x must be [R, I] and w [..., O, I]");
  const int64_t O = wd[rank - 2], I = wd[rank - 1], R = xd[0];
  if (xd[1] != I) return ffi::Error::InvalidArgument("grok_matvec: x and w widths differ");
  if (index.element_count() != size_t(rank - 2))
    return ffi::Error::InvalidArgument("grok_matvec: one index per leading axis of w");
  const int64_t offset = lead_offset(wd, index.typed_data(), rank - 2, O * I);
  return dispatch(pool, x, w, y->typed_data(), {{0, offset, R}}, I, O);
}

// y[A, O] = rows of x [A, I], sorted by group, each times its group's matrix
// w[index..., g] ([*lead, G, O, I]); sizes [G] rows per group. Rows past sum(sizes) are 0.
ffi::Error GroupedMatvec(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                         ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::S32> sizes,
                         ffi::Result<ffi::Buffer<ffi::F32>> y) {
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  const int64_t rank = wd.size();
  if (rank < 3 || xd.size() != 2)
    return ffi::Error::InvalidArgument("grok_grouped_matvec: x [A, I] and w [..., G, O, I]");
  const int64_t G = wd[rank - 3], O = wd[rank - 2], I = wd[rank - 1], A = xd[0];
  if (xd[1] != I) return ffi::Error::InvalidArgument("grok_grouped_matvec: widths differ");
  if (index.element_count() != size_t(rank - 3) || sizes.element_count() != size_t(G))
    return ffi::Error::InvalidArgument("grok_grouped_matvec: index or sizes length");
  const int64_t offset = lead_offset(wd, index.typed_data(), rank - 3, G * O * I);
  std::vector<Part> parts;
  int64_t start = 0;
  for (int64_t g = 0; g < G && start < A; ++g) {
    const int64_t n = std::min<int64_t>(std::max<int32_t>(sizes.typed_data()[g], 0), A - start);
    if (n > 0) parts.push_back({start, offset + g * O * I, n});
    start += n;
  }
  float* out = y->typed_data();
  std::fill(out + start * O, out + A * O, 0.0f);
  return dispatch(pool, x, w, out, parts, I, O);
}


// out [B, T, K, G, H] = attention of q [B, T, K, G, H] over k, v [*lead, B, S, K, H] at
// lead index `index` (read in place), with tau [B, T] float32, positions [B, T] and lengths
// [B] int32 (see grok_attention above). q, k, v and out share one dtype (uint16: bf16 bits).
ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> tau,
                     ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lens,
                     ffi::Result<ffi::AnyBuffer> out, float scale, float cap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const int64_t n_lead = index.element_count();
  if (qd.size() != 5 || int64_t(kd.size()) != 4 + n_lead || kd.size() != vd.size())
    return ffi::Error::InvalidArgument(
        "grok_attention: q [B, T, K, G, H], k and v [*lead, B, S, K, H], one index per lead");
  for (size_t i = 0; i < kd.size(); ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("grok_attention: k and v differ");
  const AttnShape sh{qd[0], qd[1], kd[n_lead + 1], qd[2], qd[3], qd[4], scale, cap};
  if (kd[n_lead] != sh.B || kd[n_lead + 2] != sh.Kh || kd[n_lead + 3] != sh.H || sh.H % 2 != 0)
    return ffi::Error::InvalidArgument("grok_attention: k does not match q (or H is odd)");
  if (tau.element_count() != size_t(sh.B * sh.T) || pos.element_count() != size_t(sh.B * sh.T) ||
      lens.element_count() != size_t(sh.B))
    return ffi::Error::InvalidArgument("grok_attention: tau, positions [B, T], lengths [B]");
  const auto dt = q.element_type();
  if (k.element_type() != dt || v.element_type() != dt || out->element_type() != dt)
    return ffi::Error::InvalidArgument("grok_attention: q, k, v and out dtypes differ");
#if defined(__AVX512F__)
  const int64_t offset =
      lead_offset(kd, index.typed_data(), n_lead, sh.B * sh.S * sh.Kh * sh.H);
  return for_dtype("grok_attention", dt, [&](auto kernels) {
    using T = typename decltype(kernels)::Elem;
    attention<T>(pool, sh, static_cast<const T*>(q.untyped_data()),
                 static_cast<const T*>(k.untyped_data()) + offset,
                 static_cast<const T*>(v.untyped_data()) + offset, tau.typed_data(),
                 pos.typed_data(), lens.typed_data(), static_cast<T*>(out->untyped_data()));
  });
#else
  return ffi::Error::Internal("grok_attention: built without AVX-512");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokMatvec, Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()      // x [R, I]
                                  .Arg<ffi::AnyBuffer>()      // w [*lead, O, I]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index [len(lead)]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [R, O]

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokGroupedMatvec, GroupedMatvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // x [A, I]
                                  .Arg<ffi::AnyBuffer>()         // w [*lead, G, O, I]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index [len(lead)]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // sizes [G]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [A, O]

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // q [B, T, K, G, H]
                                  .Arg<ffi::AnyBuffer>()         // k [*lead, B, S, K, H]
                                  .Arg<ffi::AnyBuffer>()         // v [*lead, B, S, K, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index [len(lead)]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tau [B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths [B]
                                  .Ret<ffi::AnyBuffer>()         // out [B, T, K, G, H]
                                  .Attr<float>("scale")
                                  .Attr<float>("cap"));
