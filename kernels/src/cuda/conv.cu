// Int8 convolution (and Gemm, as a 1x1 convolution of a 1x1 input): Conv::run of int8.rs, one
// output value per thread, int32 accumulation that wraps as Rust's does.
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
                int x = kestrel_wrapping_sub(plane[iy * a.width + ix], a.input_zero_point);
                acc += (unsigned)x * (unsigned)(int)filter[(ic * a.kernel_h + ky) * a.kernel_w + kx];
            }
        }
    }
    a.output[item + i] = kestrel_requantize((int)acc, a.multiplier[oc], a.shift[oc],
                                            a.output_zero_point, a.min, a.max);
}
