// The Kestrel CUDA kernels compiled as plain C++ and run one thread at a time on the CPU, so that
// their arithmetic and indexing are tested bit for bit without a GPU (feature `cuda-emulator`).
// The kernels use no shared memory, warp functions or barriers (atomics only to append to a
// list), so running threads in sequence computes what the GPU computes, up to the order of
// such a list. This proves nothing about speed, races or the driver.
#include <math.h>

struct Dim3 {
    unsigned x, y, z;
};
// Per OS thread: tests emulate kernels on several threads at once.
static thread_local Dim3 blockIdx, threadIdx, blockDim;

#define __global__
#define __device__
#define __forceinline__ inline

// The two device intrinsics the kernels use, as PTX defines them: dp4a.s32.s32 (four signed
// byte products added to c, modulo 2^32) and a 32-bit atomic add returning the old value.
static int __dp4a(int a, int b, int c) {
    unsigned sum = (unsigned)c;
    for (int k = 0; k < 4; ++k)
        sum += (unsigned)((int)(signed char)(a >> (8 * k)) * (int)(signed char)(b >> (8 * k)));
    return (int)sum;
}

static int atomicAdd(int* address, int value) {
    int old = *address;
    *address = (int)((unsigned)old + (unsigned)value);
    return old;
}

#include "kestrel.cuh"
#include "conv.cu"
#include "elementwise.cu"
#include "pool.cu"
#include "resize.cu"
#include "preprocess.cu"
#include "decode.cu"
#include "attention.cu"

template <typename Args>
static void run_grid(void (*kernel)(Args), unsigned grid_x, unsigned grid_y, unsigned block,
                     const Args* args) {
    blockDim = Dim3{block, 1, 1};
    for (unsigned y = 0; y < grid_y; ++y)
        for (unsigned x = 0; x < grid_x; ++x)
            for (unsigned t = 0; t < block; ++t) {
                blockIdx = Dim3{x, y, 0};
                threadIdx = Dim3{t, 0, 0};
                kernel(*args);
            }
}

#define EMULATE(name, Args)                                                                    \
    extern "C" void name##_emulated(unsigned grid_x, unsigned grid_y, unsigned block,          \
                                    const Args* args) {                                        \
        run_grid(name, grid_x, grid_y, block, args);                                           \
    }

EMULATE(kestrel_conv, ConvArgs)
EMULATE(kestrel_conv_dp4a, ConvArgs)
EMULATE(kestrel_add, ElementwiseArgs)
EMULATE(kestrel_mul, ElementwiseArgs)
EMULATE(kestrel_rescale, ElementwiseArgs)
EMULATE(kestrel_lut, ElementwiseArgs)
EMULATE(kestrel_gather, ElementwiseArgs)
EMULATE(kestrel_max_pool, PoolArgs)
EMULATE(kestrel_average_pool, PoolArgs)
EMULATE(kestrel_global_average_pool, PoolArgs)
EMULATE(kestrel_resize, ResizeArgs)
EMULATE(kestrel_preprocess, PreprocessArgs)
EMULATE(kestrel_decode, DecodeArgs)
EMULATE(kestrel_attention, AttentionArgs)
EMULATE(kestrel_conv16, ConvArgs)
EMULATE(kestrel_add16, ElementwiseArgs)
EMULATE(kestrel_mul16, ElementwiseArgs)
EMULATE(kestrel_global_average_pool16, PoolArgs)
EMULATE(kestrel_function16, ElementwiseArgs)

// Sizes of the argument structs, checked against the Rust mirrors.
extern "C" unsigned long kestrel_args_sizes(unsigned which) {
    switch (which) {
        case 0: return sizeof(ConvArgs);
        case 1: return sizeof(ElementwiseArgs);
        case 2: return sizeof(PoolArgs);
        case 3: return sizeof(ResizeArgs);
        case 4: return sizeof(PreprocessArgs);
        case 5: return sizeof(DecodeArgs);
        case 6: return sizeof(AttentionArgs);
        default: return 0;
    }
}
