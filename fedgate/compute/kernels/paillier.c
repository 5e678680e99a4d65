/* Plain-C translation unit of the fedgate HE kernels (CI: cc -O2 -shared -fPIC paillier.c). */
#include "montgomery.h"
