// grok_matvec: y[R, O] (float32) = x[R, I] . W[O, I]^T, where W is one [O, I] matrix inside a
// stacked weight w[*lead, O, I], picked by the int32 indices `index[len(lead)]` and read where
// it lies; grok_grouped_matvec, the MoE's ragged product of the same kind. Few rows take the
// row kernels, many the packed panels (common.h).
#include "common.h"

namespace {

constexpr int kMaxRows = 8;  // rows per pass over the weights; more rows take more passes

#if defined(__AVX512F__)

// From this many rows of a product on, the panel path; below it the row kernels, which stream
// weights from memory with prefetches (and keep a unit's slice in L2 for their later passes).
// With the weights in cache the panels win from 16 rows (bf16 D 512 x Fe 1024, one thread: 394
// against 248 GFLOPS at 32 rows), but a prefill reads every layer's weights from memory, and
// there, 8 experts x 32 rows, two threads, the row kernels took 0.48 ms against 0.66.
constexpr int64_t kGemmRows = 64;
// Rows per pass over the packed panels: the rows' inputs stay in L2 while the panels change.
constexpr int64_t kRowChunk = 256;

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

#endif  // __AVX512F__

// A product in buffer coordinates: `rows` rows of x from row `row` (and of y likewise) times
// the [O, I] matrix `w_elem` elements into w.
struct Part {
  int64_t row;
  int64_t w_elem;
  int64_t rows;
};

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
