// grok_attention: the attention kernel (attention.h) over a dense KV cache: keys and values
// [*lead, B, S, K, H], read in place at a lead index (a layer of the stacked cache).
#include "attention.h"

namespace {

// out [B, T, K, G, H] = attention of q [B, T, K, G, H] over k, v [*lead, B, S, K, H] at
// lead index `index` (read in place), with tau [B, T] float32, positions [B, T] and lengths
// [B] int32 (see the top of this file). q, k, v and out share one dtype (uint16: bf16 bits).
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
  const ffi::Error checked = check_attention_inputs("grok_attention", sh, q, k, v, tau, pos, lens,
                                                    out->element_type());
  if (checked.failure()) return checked;
#if defined(__AVX512F__)
  const int64_t offset =
      lead_offset(kd, index.typed_data(), n_lead, sh.B * sh.S * sh.Kh * sh.H);
  const auto source_of = [&](auto k0, auto v0) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(k0)>>;
    return [=, &sh](int64_t b, int64_t kh) {
      const int64_t at = (b * sh.S * sh.Kh + kh) * sh.H;
      return DenseKV<T>{k0 + at, v0 + at, sh.Kh * sh.H};
    };
  };
  return run_attention("grok_attention", pool, sh, q, k, v, offset, tau, pos, lens, out,
                       source_of);
#else
  return ffi::Error::Internal("grok_attention: built without AVX-512");
#endif
}

}  // namespace

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
