// grok_matvec: y[R, O] (float32) = x[R, I] . W[O, I]^T for a few rows R (decode), where W is
// one [O, I] matrix inside a stacked weight w[*lead, O, I], picked by the int32 indices
// `index[len(lead)]` and read where it lies.
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
// reports no kernels (grok_native_isa() == 0) and the library keeps XLA's dot.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

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

inline float bf16_to_float(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX512F__)

// Output rows [o0, o1) for R activation rows, OB output rows at a time: every weight cache
// line is loaded once and used for all R rows.
template <int R, int OB>
void rows_f32(const float* x, const float* w, float* y, int64_t I, int64_t O, int64_t o0,
              int64_t o1) {
  const int64_t I16 = I & ~int64_t(15);
  int64_t o = o0;
  for (; o + OB <= o1; o += OB) {
    __m512 acc[OB][R];
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < I16; i += 16) {
      __m512 wv[OB];
      for (int j = 0; j < OB; ++j) wv[j] = _mm512_loadu_ps(w + (o + j) * I + i);
      for (int r = 0; r < R; ++r) {
        const __m512 xv = _mm512_loadu_ps(x + r * I + i);
        for (int j = 0; j < OB; ++j) acc[j][r] = _mm512_fmadd_ps(wv[j], xv, acc[j][r]);
      }
    }
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(acc[j][r]);
        for (int64_t i = I16; i < I; ++i) s += w[(o + j) * I + i] * x[r * I + i];
        y[r * O + o + j] = s;
      }
  }
  if constexpr (OB > 1) {
    if (o < o1) rows_f32<R, 1>(x, w, y, I, O, o, o1);
  }
}

#if defined(__AVX512BF16__)
// bfloat16 (as its uint16 bits): vdpbf16ps multiplies pairs exactly and adds in float32.
template <int R, int OB>
void rows_bf16(const uint16_t* x, const uint16_t* w, float* y, int64_t I, int64_t O,
               int64_t o0, int64_t o1) {
  const int64_t I32 = I & ~int64_t(31);
  int64_t o = o0;
  for (; o + OB <= o1; o += OB) {
    __m512 acc[OB][R];
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < I32; i += 32) {
      __m512i wv[OB];
      for (int j = 0; j < OB; ++j)
        wv[j] = _mm512_loadu_si512(static_cast<const void*>(w + (o + j) * I + i));
      for (int r = 0; r < R; ++r) {
        const __m512i xv = _mm512_loadu_si512(static_cast<const void*>(x + r * I + i));
        for (int j = 0; j < OB; ++j)
          acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)wv[j], (__m512bh)xv);
      }
    }
    for (int j = 0; j < OB; ++j)
      for (int r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(acc[j][r]);
        for (int64_t i = I32; i < I; ++i)
          s += bf16_to_float(w[(o + j) * I + i]) * bf16_to_float(x[r * I + i]);
        y[r * O + o + j] = s;
      }
  }
  if constexpr (OB > 1) {
    if (o < o1) rows_bf16<R, 1>(x, w, y, I, O, o, o1);
  }
}
#endif  // __AVX512BF16__

template <typename T>
using RowsFn = void (*)(const T*, const T*, float*, int64_t, int64_t, int64_t, int64_t);

// Output rows per block: 4 for up to 4 activation rows, 2 above (16 accumulators at most,
// within the 32 vector registers with the loads).
RowsFn<float> pick_f32(int64_t r) {
  switch (r) {
    case 1: return rows_f32<1, 4>;
    case 2: return rows_f32<2, 4>;
    case 3: return rows_f32<3, 4>;
    case 4: return rows_f32<4, 4>;
    case 5: return rows_f32<5, 2>;
    case 6: return rows_f32<6, 2>;
    case 7: return rows_f32<7, 2>;
    default: return rows_f32<8, 2>;
  }
}

#if defined(__AVX512BF16__)
RowsFn<uint16_t> pick_bf16(int64_t r) {
  switch (r) {
    case 1: return rows_bf16<1, 4>;
    case 2: return rows_bf16<2, 4>;
    case 3: return rows_bf16<3, 4>;
    case 4: return rows_bf16<4, 4>;
    case 5: return rows_bf16<5, 2>;
    case 6: return rows_bf16<6, 2>;
    case 7: return rows_bf16<7, 2>;
    default: return rows_bf16<8, 2>;
  }
}
#endif

// Chunks of output rows, claimed through an atomic counter by the calling thread and by
// helpers on XLA's intra-op pool. The caller waits for chunks, not for helpers: a helper that
// starts late finds nothing left and only touches this shared state.
struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
};

template <typename T>
void run(ffi::ThreadPool& pool, const T* x, const T* w, float* y, int64_t R, int64_t I,
         int64_t O, RowsFn<T> (*pick)(int64_t)) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunk = std::max<int64_t>(16, O / (threads * 8));
  chunk = (chunk + 3) & ~int64_t(3);
  auto state = std::make_shared<Chunks>();
  state->count = (O + chunk - 1) / chunk;
  auto work = [state, x, w, y, R, I, O, chunk, pick]() {
    for (;;) {
      const int64_t c = state->next.fetch_add(1);
      if (c >= state->count) return;
      const int64_t o0 = c * chunk, o1 = std::min(O, o0 + chunk);
      for (int64_t r0 = 0; r0 < R; r0 += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, R - r0);
        pick(rows)(x + r0 * I, w, y + r0 * O, I, O, o0, o1);
      }
      state->done.fetch_add(1);
    }
  };
  // Below about 64K weights a helper costs more than it saves.
  if (O * I >= (int64_t(1) << 16)) {
    const int64_t helpers = std::min(threads, state->count) - 1;
    for (int64_t h = 0; h < helpers; ++h) {
      auto task = work;
      pool.Schedule(std::move(task));
    }
  }
  work();
  while (state->done.load() < state->count) std::this_thread::yield();
}

#endif  // __AVX512F__

ffi::Error Matvec(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                  ffi::Buffer<ffi::S32> index, ffi::Result<ffi::Buffer<ffi::F32>> y) {
#if defined(__AVX512F__)
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  const int64_t rank = wd.size();
  if (rank < 2 || xd.size() != 2)
    return ffi::Error::InvalidArgument("grok_matvec: x must be [R, I] and w [..., O, I]");
  const int64_t O = wd[rank - 2], I = wd[rank - 1], R = xd[0];
  if (xd[1] != I) return ffi::Error::InvalidArgument("grok_matvec: x and w widths differ");
  if (index.element_count() != size_t(rank - 2))
    return ffi::Error::InvalidArgument("grok_matvec: one index per leading axis of w");
  if (w.element_type() != x.element_type())
    return ffi::Error::InvalidArgument("grok_matvec: x and w dtypes differ");
  // The leading indices, clamped into range as lax.dynamic_slice does.
  int64_t offset = 0, stride = O * I;
  for (int64_t k = rank - 3; k >= 0; --k) {
    const int64_t at = std::clamp<int64_t>(index.typed_data()[k], 0, wd[k] - 1);
    offset += at * stride;
    stride *= wd[k];
  }
  float* out = y->typed_data();
  switch (w.element_type()) {
    case ffi::DataType::F32:
      run<float>(pool, static_cast<const float*>(x.untyped_data()),
                 static_cast<const float*>(w.untyped_data()) + offset, out, R, I, O, pick_f32);
      return ffi::Error::Success();
#if defined(__AVX512BF16__)
    case ffi::DataType::BF16:
    case ffi::DataType::U16:  // bfloat16 bits (grok.layers.as_bits)
      run<uint16_t>(pool, static_cast<const uint16_t*>(x.untyped_data()),
                    static_cast<const uint16_t*>(w.untyped_data()) + offset, out, R, I, O,
                    pick_bf16);
      return ffi::Error::Success();
#endif
    default:
      return ffi::Error::InvalidArgument("grok_matvec: no kernel for this dtype");
  }
#else
  return ffi::Error::Unimplemented("grok_matvec: built without AVX-512");
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
