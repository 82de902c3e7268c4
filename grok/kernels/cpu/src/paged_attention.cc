// grok_paged_attention: the attention kernel (attention.h) over a paged KV cache: keys and
// values in a pool of pages [*lead, M, Z, K, H] (read in place at a lead index: a layer of the
// stacked pool), each batch row's positions found through its page table [B, W]: position s
// of row b sits in page pages[b, s / Z] at offset s % Z (S = W Z positions per row). The
// arithmetic is the dense kernel's (attention.h), so a paged cache gives the dense cache's
// numbers; only the addresses of the key and value rows differ.
#include "attention.h"

namespace {

constexpr int64_t kPageMultiple = 16;  // Z % 16 == 0: a packed half panel lies in one page

#if defined(__AVX512F__)

// The KV source of one (batch row, kv head) in a paged pool: the rows' element offsets,
// computed once per unit for the keys it reads (an entry outside [0, M) is clamped into it;
// only masked keys read such entries).
template <typename T>
struct PagedKV {
  const T* k;  // the pool at this kv head: page m, offset z at (m Z + z) K H
  const T* v;
  const int32_t* table;  // the row's page table [W]
  int64_t W, M, Z, stride;  // stride: K H
  const int64_t* at = nullptr;  // at[j]: key j's offset (elements)

  void prepare(int64_t n) {
    thread_local std::vector<int64_t> offsets;
    offsets.resize(std::max<int64_t>(n, 1));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t page = std::clamp<int64_t>(table[std::min(j / Z, W - 1)], 0, M - 1);
      offsets[j] = (page * Z + j % Z) * stride;
    }
    at = offsets.data();
  }
  const T* key(int64_t j) const { return k + at[j]; }
  const T* value(int64_t j) const { return v + at[j]; }
};

#endif  // __AVX512F__

// out [B, T, K, G, H] = attention of q [B, T, K, G, H] over the pools k, v [*lead, M, Z, K, H]
// at lead index `index`, through page tables [B, W] int32, with tau [B, T] float32, positions
// [B, T] and lengths [B] int32. q, k, v and out share one dtype (uint16: bf16 bits).
ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                          ffi::AnyBuffer v, ffi::Buffer<ffi::S32> index,
                          ffi::Buffer<ffi::S32> pages, ffi::Buffer<ffi::F32> tau,
                          ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> lens,
                          ffi::Result<ffi::AnyBuffer> out, float scale, float cap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const auto pd = pages.dimensions();
  const int64_t n_lead = index.element_count();
  if (qd.size() != 5 || int64_t(kd.size()) != 4 + n_lead || kd.size() != vd.size() ||
      pd.size() != 2)
    return ffi::Error::InvalidArgument(
        "grok_paged_attention: q [B, T, K, G, H], k and v [*lead, M, Z, K, H], one index per "
        "lead, pages [B, W]");
  for (size_t i = 0; i < kd.size(); ++i)
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("grok_paged_attention: k and v differ");
  const int64_t M = kd[n_lead], Z = kd[n_lead + 1], W = pd[1];
  const AttnShape sh{qd[0], qd[1], W * Z, qd[2], qd[3], qd[4], scale, cap};
  if (pd[0] != sh.B || kd[n_lead + 2] != sh.Kh || kd[n_lead + 3] != sh.H || sh.H % 2 != 0 ||
      M < 1 || W < 1)
    return ffi::Error::InvalidArgument(
        "grok_paged_attention: k or pages do not match q (or H is odd, or nothing to read)");
  if (Z % kPageMultiple != 0)
    return ffi::Error::InvalidArgument("grok_paged_attention: page size not a multiple of 16");
  const ffi::Error checked = check_attention_inputs("grok_paged_attention", sh, q, k, v, tau, pos,
                                                    lens, out->element_type());
  if (checked.failure()) return checked;
#if defined(__AVX512F__)
  const int64_t offset = lead_offset(kd, index.typed_data(), n_lead, M * Z * sh.Kh * sh.H);
  const int32_t* table = pages.typed_data();
  const auto source_of = [&](auto k0, auto v0) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(k0)>>;
    return [=, &sh](int64_t b, int64_t kh) {
      return PagedKV<T>{k0 + kh * sh.H, v0 + kh * sh.H, table + b * W, W, M, Z, sh.Kh * sh.H};
    };
  };
  return run_attention("grok_paged_attention", pool, sh, q, k, v, offset, tau, pos, lens, out,
                       source_of);
#else
  return ffi::Error::Internal("grok_paged_attention: built without AVX-512");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GrokPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()         // q [B, T, K, G, H]
                                  .Arg<ffi::AnyBuffer>()         // k [*lead, M, Z, K, H]
                                  .Arg<ffi::AnyBuffer>()         // v [*lead, M, Z, K, H]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index [len(lead)]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pages [B, W]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tau [B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions [B, T]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lengths [B]
                                  .Ret<ffi::AnyBuffer>()         // out [B, T, K, G, H]
                                  .Attr<float>("scale")
                                  .Attr<float>("cap"));
