// The ISA layer of this build, chosen by the compiler flag that kernels/__init__.py passes
// (-DGEMMARUN_ISA_AVX2 and so on); Generic without one. The ISA-free sources use `Isa` only.
#pragma once
#if defined(GEMMARUN_ISA_AVX512)
#include "avx512.h"
namespace gemmarun_isa { using Isa = Avx512; }
#elif defined(GEMMARUN_ISA_AVX2)
#include "avx2.h"
namespace gemmarun_isa { using Isa = Avx2; }
#elif defined(GEMMARUN_ISA_NEON)
#include "neon.h"
namespace gemmarun_isa { using Isa = Neon; }
#else
#include "generic.h"
namespace gemmarun_isa { using Isa = Generic; }
#endif
