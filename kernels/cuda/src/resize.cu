// Resize::run of int8.rs: nearest (asymmetric, floor) or bilinear (half pixel) with 10 fraction
// bits, per channel plane.

__device__ __forceinline__ void kestrel_resize_source(int bilinear, int dst, int size_in,
                                                      int size_out, int* i0, int* i1,
                                                      long long* fraction) {
    unsigned long long d = dst, n_in = size_in, n_out = size_out;
    if (!bilinear) {
        *i0 = *i1 = (int)(d * n_in / n_out);
        *fraction = 0;
        return;
    }
    unsigned long long src = (((2 * d + 1) * n_in) << 10) / (2 * n_out);
    src = src > 512 ? src - 512 : 0;
    unsigned long long whole = src >> 10;
    *i0 = whole < (unsigned long long)(size_in - 1) ? (int)whole : size_in - 1;
    *i1 = *i0 + 1 < size_in - 1 ? *i0 + 1 : size_in - 1;
    *fraction = (long long)(src & 1023);
}

extern "C" __global__ void kestrel_resize(ResizeArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    KestrelPosition at = kestrel_position(i, a.out_width, a.out_height);
    int c = at.c, oy = at.y, ox = at.x;
    int y0, y1, x0, x1;
    long long fy, fx;
    kestrel_resize_source(a.bilinear, oy, a.height, a.out_height, &y0, &y1, &fy);
    kestrel_resize_source(a.bilinear, ox, a.width, a.out_width, &x0, &x1, &fx);
    const signed char* src = a.input + item + (long long)c * a.height * a.width;
    const long long one = 1 << 10;
    long long top = src[y0 * a.width + x0] * (one - fx) + src[y0 * a.width + x1] * fx;
    long long bottom = src[y1 * a.width + x0] * (one - fx) + src[y1 * a.width + x1] * fx;
    long long acc = top * (one - fy) + bottom * fy;
    a.output[item + i] = (signed char)kestrel_clamp((acc + (1LL << 19)) >> 20, -128, 127);
}
