// CUDA translation unit for the fedgate HE kernels (compiled at run time by NVRTC via CuPy).
// All arithmetic lives in montgomery.h, which also compiles as plain C for CI.
#include "montgomery.h"
