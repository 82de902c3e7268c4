// The attention kernel shared by the dense and the paged handlers (attention.cc,
// paged_attention.cc): causal grouped-query attention with Grok's logits, for any number of
// queries (prefill, decode): per query row (b, t, kv head k, group member g),
//   s_j = cap * tanh(q . k_j * scale / cap) * tau[b, t]  for keys j < min(pos[b, t] + 1,
//   len[b], S), the rest masked; p = softmax(s); out = p . v,
// with p rounded to v's dtype before the product, as the XLA path (grok/kernels/xla.py) does
// (and, like it, a row that sees no key averages all S values). XLA:CPU spent most of a bf16
// prefill's attention time on layout copies around its two batched products and on elementwise
// passes over the [B, K, G, T, S] scores; here the scores of a tile of query rows live in one
// cache-resident buffer, keys are packed into the GEMM panels (common.h) and the causal mask
// skips the key panels past a tile's last position.
//
// Where a (batch row, kv head)'s keys and values lie is the handler's (a KV source: DenseKV,
// PagedKV below): the arithmetic is one code path, so both give the same numbers.
#pragma once

#include "common.h"

namespace {

// An attention call's sizes (see the top of this file) and its logit scale and cap (0: none).
struct AttnShape {
  int64_t B, T, S, Kh, G, H;
  float scale, cap;  // cap 0: no cap
};

// The checks both handlers make once their KV layouts are read (`name` leads each message):
// tau and positions [B, T] and lengths [B] sized to q, and one dtype for q, k, v and out.
inline ffi::Error check_attention_inputs(const char* name, const AttnShape& sh,
                                         ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                         ffi::Buffer<ffi::F32> tau, ffi::Buffer<ffi::S32> pos,
                                         ffi::Buffer<ffi::S32> lens, ffi::DataType out_dt) {
  if (tau.element_count() != size_t(sh.B * sh.T) || pos.element_count() != size_t(sh.B * sh.T) ||
      lens.element_count() != size_t(sh.B))
    return ffi::Error::InvalidArgument(std::string(name) + ": tau, positions [B, T], lengths [B]");
  const auto dt = q.element_type();
  if (k.element_type() != dt || v.element_type() != dt || out_dt != dt)
    return ffi::Error::InvalidArgument(std::string(name) + ": q, k, v and out dtypes differ");
  return ffi::Error::Success();
}

#if defined(__AVX512F__)

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
// keys a step (step i's values at vrow(i)): float32 value rows, or bfloat16 key pairs
// interleaved (p is 0 past n, its buffer padded to whole pairs).
template <typename D, int RB, typename VRow>
void pv_rows(const typename D::Elem* p, int64_t ps, const VRow& vrow, int64_t n, int64_t H,
             int64_t h0, float* out, int64_t os) {
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
    const typename D::Unit* v = vrow(i);
    for (int c = 0; c < kAttnPvVecs; ++c) vv[c] = D::load_masked(v + h0 + 16 * c, m[c]);
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
  template <int RB, typename KV>
  static void pv(const float* p, int64_t ps, const KV& kv, const uint32_t*, int64_t n,
                 int64_t H, int64_t h0, float* out, int64_t os) {
    pv_rows<DotF32, RB>(p, ps, [&](int64_t j) { return kv.value(j); }, n, H, h0, out, os);
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
  template <int RB, typename KV>
  static void pv(const uint16_t* p, int64_t ps, const KV&, const uint32_t* vp, int64_t n,
                 int64_t H, int64_t h0, float* out, int64_t os) {
    pv_rows<DotBf16, RB>(p, ps, [&](int64_t i) { return vp + i * H; }, n, H, h0, out, os);
  }
};
#endif

// A KV source for one (batch row, kv head): key j's row at key(j), value j's at value(j);
// rows 16 i .. 16 i + 15 lie `stride` elements apart (one run). The dense cache [B, S, K, H]:
template <typename T>
struct DenseKV {
  const T* k;  // key 0 of the row and head
  const T* v;
  int64_t stride;  // K H: elements between consecutive keys
  void prepare(int64_t) {}
  const T* key(int64_t j) const { return k + j * stride; }
  const T* value(int64_t j) const { return v + j * stride; }
};

// One unit: batch row b, kv head kh, query positions [t0, t1), its keys and values from kv
// (prepared for the keys it reads).
template <typename T, typename KV>
void attention_unit(const AttnShape& sh, const T* q, KV& kv, const float* tau, const int32_t* pos,
                    const int32_t* lens, T* out, int64_t b, int64_t kh, int64_t t0, int64_t t1) {
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
  bool blind_rows = false;  // a row that sees no key averages all S values
  for (int64_t t = t0; t < t1; ++t) blind_rows |= visible(t) == 0;
  kv.prepare(blind_rows ? S : key_end);

  thread_local std::vector<Packed> kp_store;
  thread_local std::vector<uint32_t> vp_store;
  thread_local std::vector<T> q_store;
  thread_local std::vector<float> s_store, o_store;
  thread_local std::vector<Prob> p_store;
  kp_store.resize(n_panels * panel + 64);
  Packed* kp = reinterpret_cast<Packed*>((reinterpret_cast<uintptr_t>(kp_store.data()) + 63) &
                                         ~uintptr_t(63));
  for (int64_t i = 0; i < n_panels; ++i) {
    const int64_t on = std::min<int64_t>(kPanelOut, key_end - i * kPanelOut);
    const char* const halves[2] = {
        reinterpret_cast<const char*>(kv.key(i * kPanelOut)),
        reinterpret_cast<const char*>(on > 16 ? kv.key(i * kPanelOut + 16) : nullptr)};
    pack_unit_halves(halves, key_stride * int64_t(sizeof(T)), on, units,
                     reinterpret_cast<uint32_t*>(kp + i * panel));
  }
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    const int64_t pairs = (key_end + 1) / 2;
    vp_store.resize(pairs * H);
    for (int64_t i = 0; i < pairs; ++i)
      pack_value_pair(kv.value(2 * i), 2 * i + 1 < key_end ? kv.value(2 * i + 1) : nullptr, H,
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
    Tr::template pv<RB>(p_store.data() + r0 * width, width, kv, vp_store.data(), pv_end, H, \
                        h0, o + r0 * H, H);                                                \
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
        for (int64_t j = 0; j < S; ++j) acc += w * K::Dot::value(kv.value(j)[h]);
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
// least 48 query rows (each unit packs the keys and values it sees); source(b, kh) gives a
// unit's KV source.
template <typename T, typename Source>
void attention(ffi::ThreadPool& pool, const AttnShape& sh, const T* q, const Source& source,
               const float* tau, const int32_t* pos, const int32_t* lens, T* out) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t bk = sh.B * sh.Kh;
  const int64_t most = std::max<int64_t>(1, sh.T * sh.G / 48);
  const int64_t want = std::clamp<int64_t>((4 * threads + bk - 1) / bk, 1, most);
  const int64_t per = (sh.T + want - 1) / want;
  const int64_t chunks = (sh.T + per - 1) / per;
  for_units(pool, bk * chunks, bk * chunks > 1, [&](int64_t u) {
    const int64_t b = u / (sh.Kh * chunks), kh = (u / chunks) % sh.Kh, c = u % chunks;
    auto kv = source(b, kh);
    attention_unit<T>(sh, q, kv, tau, pos, lens, out, b, kh, c * per,
                      std::min(sh.T, (c + 1) * per));
  });
}

// A handler's run, once its inputs are checked: per dtype, k and v at element `offset` (a lead
// index's layer), and the kernel over the KV source source_of(k, v) gives: a callable (b, kh)
// -> the source of that batch row and kv head.
template <typename SourceOf>
ffi::Error run_attention(const char* name, ffi::ThreadPool& pool, const AttnShape& sh,
                         ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, int64_t offset,
                         ffi::Buffer<ffi::F32> tau, ffi::Buffer<ffi::S32> pos,
                         ffi::Buffer<ffi::S32> lens, ffi::Result<ffi::AnyBuffer>& out,
                         const SourceOf& source_of) {
  return for_dtype(name, q.element_type(), [&](auto kernels) {
    using T = typename decltype(kernels)::Elem;
    const T* k0 = static_cast<const T*>(k.untyped_data()) + offset;
    const T* v0 = static_cast<const T*>(v.untyped_data()) + offset;
    attention<T>(pool, sh, static_cast<const T*>(q.untyped_data()), source_of(k0, v0),
                 tau.typed_data(), pos.typed_data(), lens.typed_data(),
                 static_cast<T*>(out->untyped_data()));
  });
}

#endif  // __AVX512F__

}  // namespace
