// Int8 convolution (and Gemm, as a 1x1 convolution of a 1x1 input): Conv::run of int8.rs (or
// Conv::run_wide, with wide_input), one output value per thread, int32 accumulation that wraps
// as Rust's does.
extern "C" __global__ void kestrel_conv(ConvArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    const signed char* input = a.input + item;
    KestrelPosition at = kestrel_position(i, a.out_width, a.out_height);
    int oc = at.c, oy = at.y, ox = at.x;
    int icg = a.channels / a.group;
    int ocg = a.out_channels / a.group;
    int first_channel = (oc / ocg) * icg;
    const signed char* filter = a.weights + (long long)oc * icg * a.kernel_h * a.kernel_w;
    unsigned acc = (unsigned)a.bias[oc];
    for (int ic = 0; ic < icg; ++ic) {
        const signed char* plane = input + (long long)(first_channel + ic) * a.height * a.width;
        for (int ky = 0; ky < a.kernel_h; ++ky) {
            int iy = oy * a.stride_y + ky * a.dilation_y - a.pad_y;
            if (iy < 0 || iy >= a.height) continue;
            for (int kx = 0; kx < a.kernel_w; ++kx) {
                int ix = ox * a.stride_x + kx * a.dilation_x - a.pad_x;
                if (ix < 0 || ix >= a.width) continue;
                int x = kestrel_input_value(plane[iy * a.width + ix], a.input_zero_point,
                                            a.wide_input, a.wide);
                acc += (unsigned)x * (unsigned)(int)filter[(ic * a.kernel_h + ky) * a.kernel_w + kx];
            }
        }
    }
    a.output[item + i] = kestrel_requantize((int)acc, a.multiplier[oc], a.shift[oc],
                                            a.output_zero_point, a.min, a.max);
}

// Dense convolution (group 1) and Gemm with DP4A, four input channels per instruction: each
// thread computes KESTREL_CONV_TILE output channels at one output position, so each input word
// it packs serves all of them. The filters are packed by launch.rs's `pack_dp4a`: per tile of
// output channels, per quad of input channels, per tap (ky, kx), one word of four weights for
// each channel of the tile (zero past the last channel). A tap outside the input reads the
// input zero point, and `packed_bias` already holds `bias - zero_point * sum(filter)`, so
// the sum equals Conv::run's sum of `(x - zero_point) * w` over the taps inside, modulo 2^32.
#define KESTREL_CONV_TILE 8
extern "C" __global__ void kestrel_conv_dp4a(ConvArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    const signed char* input = a.input + item;
    int out_plane = a.out_height * a.out_width;
    int tile = i / out_plane;
    int pixel = i - tile * out_plane;
    int oy = pixel / a.out_width, ox = pixel - oy * a.out_width;
    int plane = a.height * a.width;
    int taps = a.kernel_h * a.kernel_w;
    int quads = (a.channels + 3) / 4;
    const int* filter = a.packed + (long long)tile * quads * taps * KESTREL_CONV_TILE;
    unsigned acc[KESTREL_CONV_TILE];
    for (int t = 0; t < KESTREL_CONV_TILE; ++t)
        acc[t] = (unsigned)a.packed_bias[tile * KESTREL_CONV_TILE + t];
    unsigned zero = (unsigned)(a.input_zero_point & 0xff);
    for (int q = 0; q < quads; ++q) {
        const signed char* channel = input + (long long)q * 4 * plane;
        int lanes = a.channels - q * 4;  // input channels in this quad, 1 to 4 (or more)
        for (int ky = 0; ky < a.kernel_h; ++ky) {
            int iy = oy * a.stride_y + ky * a.dilation_y - a.pad_y;
            for (int kx = 0; kx < a.kernel_w; ++kx) {
                int ix = ox * a.stride_x + kx * a.dilation_x - a.pad_x;
                bool inside = iy >= 0 && iy < a.height && ix >= 0 && ix < a.width;
                int at = iy * a.width + ix;
                unsigned word = 0;
                for (int lane = 0; lane < 4; ++lane) {
                    // Lanes past the last channel meet zero weights: any value will do.
                    unsigned byte = zero;
                    if (inside && lane < lanes)
                        byte = (unsigned char)channel[(long long)lane * plane + at];
                    word |= byte << (8 * lane);
                }
                const int* w = filter + (q * taps + ky * a.kernel_w + kx) * KESTREL_CONV_TILE;
                for (int t = 0; t < KESTREL_CONV_TILE; ++t)
                    acc[t] = (unsigned)__dp4a((int)word, w[t], (int)acc[t]);
            }
        }
    }
    for (int t = 0; t < KESTREL_CONV_TILE; ++t) {
        int oc = tile * KESTREL_CONV_TILE + t;
        if (oc >= a.out_channels) break;
        a.output[item + (long long)oc * out_plane + pixel] = kestrel_requantize(
            (int)acc[t], a.multiplier[oc], a.shift[oc], a.output_zero_point, a.min, a.max);
    }
}

// Conv16::run of int16.rs: a convolution (or a Gemm) with an int8 or int16 input and output,
// one output value per thread, the sum in 64 bits (exact), saturated to int32 to requantise.
extern "C" __global__ void kestrel_conv16(ConvArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    const signed char* input = a.input + item;
    KestrelPosition at = kestrel_position(i, a.out_width, a.out_height);
    int oc = at.c, oy = at.y, ox = at.x;
    int icg = a.channels / a.group;
    int ocg = a.out_channels / a.group;
    int first_channel = (oc / ocg) * icg;
    const signed char* filter = a.weights + (long long)oc * icg * a.kernel_h * a.kernel_w;
    long long acc = a.bias[oc];
    for (int ic = 0; ic < icg; ++ic) {
        long long plane = (long long)(first_channel + ic) * a.height * a.width;
        for (int ky = 0; ky < a.kernel_h; ++ky) {
            int iy = oy * a.stride_y + ky * a.dilation_y - a.pad_y;
            if (iy < 0 || iy >= a.height) continue;
            for (int kx = 0; kx < a.kernel_w; ++kx) {
                int ix = ox * a.stride_x + kx * a.dilation_x - a.pad_x;
                if (ix < 0 || ix >= a.width) continue;
                int x = kestrel_load(input, plane + iy * a.width + ix, a.input_bytes) -
                        a.input_zero_point;
                acc += (long long)x * filter[(ic * a.kernel_h + ky) * a.kernel_w + kx];
            }
        }
    }
    kestrel_write_wide(a.output + item, i, a.output_bytes, acc, a.multiplier[oc], a.shift[oc],
                       a.output_zero_point, a.min, a.max);
}
