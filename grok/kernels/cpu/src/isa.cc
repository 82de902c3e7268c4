// Which kernels this build of the library has: bit 1 float32 (AVX-512), bit 2 bfloat16
// (AVX512-BF16). grok/kernels/cpu/build.py asks before registering the FFI targets.
#include "common.h"

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
