// Which kernels this build of the library has: bit 1 float32 (AVX-512), bit 2 bfloat16
// (AVX512-BF16), bit 4 8-bit codes with bfloat16 inputs (AVX512-BF16 and AVX512-VBMI, quant.cc). grok/kernels/cpu/build.py asks before registering the FFI targets.
#include "common.h"

extern "C" int grok_native_isa() {
  int isa = 0;
#if defined(__AVX512F__)
  isa |= 1;  // float32 kernels
#if defined(__AVX512BF16__)
  isa |= 2;  // bfloat16 kernels
#if defined(__AVX512VBMI__)
  isa |= 4;  // float8_e4m3fn / int8 weights (quant.cc)
#endif
#endif
#endif
  return isa;
}
