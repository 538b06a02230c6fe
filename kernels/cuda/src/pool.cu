// Pooling of int8.rs: MaxPool, AveragePool and GlobalAveragePool. Windows are clipped to the
// input as pool_window does; the plan's checks guarantee each holds at least one position.

__device__ __forceinline__ void kestrel_window(int o, int stride, int pad, int kernel, int size,
                                               int* lo, int* hi) {
    int start = o * stride;
    int end = start + kernel < size + pad ? start + kernel : size + pad;
    *lo = (start > pad ? start : pad) - pad;
    *hi = end - pad;
}

// The input rows [y0, y1) and columns [x0, x1) pooled into output position `at`.
struct KestrelWindow {
    int y0, y1, x0, x1;
};

__device__ __forceinline__ KestrelWindow kestrel_pool_window(const PoolArgs& a, KestrelPosition at) {
    KestrelWindow w;
    kestrel_window(at.y, a.stride_y, a.pad_y, a.kernel_h, a.height, &w.y0, &w.y1);
    kestrel_window(at.x, a.stride_x, a.pad_x, a.kernel_w, a.width, &w.x0, &w.x1);
    return w;
}

extern "C" __global__ void kestrel_max_pool(PoolArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    KestrelPosition at = kestrel_position(i, a.out_width, a.out_height);
    KestrelWindow w = kestrel_pool_window(a, at);
    const signed char* plane = a.input + item + (long long)at.c * a.height * a.width;
    int best = -128;
    for (int y = w.y0; y < w.y1; ++y)
        for (int x = w.x0; x < w.x1; ++x) best = plane[y * a.width + x] > best ? plane[y * a.width + x] : best;
    a.output[item + i] = (signed char)best;
}

// AveragePool::run: the window sum with 8 extra fraction bits, divided rounding half up.
extern "C" __global__ void kestrel_average_pool(PoolArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    KestrelPosition at = kestrel_position(i, a.out_width, a.out_height);
    KestrelWindow w = kestrel_pool_window(a, at);
    const signed char* plane = a.input + item + (long long)at.c * a.height * a.width;
    unsigned sum = 0;
    long long valid = 0;
    for (int y = w.y0; y < w.y1; ++y)
        for (int x = w.x0; x < w.x1; ++x) {
            sum += (unsigned)kestrel_wrapping_sub(plane[y * a.width + x], a.input_zero_point);
            ++valid;
        }
    long long count = a.count_include_pad ? (long long)a.kernel_h * a.kernel_w : valid;
    long long scaled = kestrel_apply((int)(sum << 8), a.multiplier, a.shift);
    long long divisor = (count > 1 ? count : 1) * 256;
    long long n = scaled + divisor / 2;
    long long mean = n / divisor - ((n % divisor != 0 && n < 0) ? 1 : 0);  // floor: div_euclid
    a.output[item + i] = (signed char)kestrel_clamp(mean + a.output_zero_point, a.min, a.max);
}

// GlobalAveragePool::run (run_wide with wide_input): one thread per channel sums its whole plane
// (`height` values).
extern "C" __global__ void kestrel_global_average_pool(PoolArgs a) {
    int c = kestrel_index(a.count);
    if (c < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    const signed char* plane = a.input + item + (long long)c * a.height;
    unsigned sum = 0;
    for (int k = 0; k < a.height; ++k)
        sum += (unsigned)kestrel_input_value(plane[k], a.input_zero_point, a.wide_input, a.wide);
    a.output[item + c] = kestrel_requantize((int)sum, a.multiplier, a.shift, a.output_zero_point,
                                            a.min, a.max);
}

// GlobalAveragePool16::run of int16.rs: one thread per channel sums its int16 plane (`height`
// values) in 64 bits.
extern "C" __global__ void kestrel_global_average_pool16(PoolArgs a) {
    int c = kestrel_index(a.count);
    if (c < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    long long first = (long long)c * a.height;
    long long sum = 0;
    for (int k = 0; k < a.height; ++k) sum += kestrel_load(a.input + item, first + k, 2);
    kestrel_write_wide(a.output + item, c, a.output_bytes, sum, a.multiplier, a.shift,
                       a.output_zero_point, a.min, a.max);
}
