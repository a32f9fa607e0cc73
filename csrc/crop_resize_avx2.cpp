// The crop-resize kernel built for AVX2 + FMA (GCC on x86-64); crop_resize.cpp calls it
// only where the CPU has both. Standard headers come before the target pragma, so only the
// kernel's own functions are built for AVX2.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cxrdicom.h"

#if CXR_CROP_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define CXR_CROP_WORKER crop_worker_avx2
#include "crop_resize_kernel.h"
#pragma GCC pop_options
#endif
