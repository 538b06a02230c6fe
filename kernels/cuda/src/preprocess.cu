// A u8 HWC frame to the int8 NCHW model input in one pass, for a tile the model's size (no
// resampling): prepare_input's `(sample - mean) / std` in f32, then Program::quantize_input's
// rounding (half away from zero) and clamp. Pixels outside the frame take the band mean, which
// normalises to zero. Compiled with --fmad=false so the float steps round as the CPU's do.
extern "C" __global__ void kestrel_preprocess(PreprocessArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    KestrelPosition at = kestrel_position(i, a.width, a.height);
    int band = at.c, oy = at.y, ox = at.x;
    int x = a.origins[2 * blockIdx.y] + ox;
    int y = a.origins[2 * blockIdx.y + 1] + oy;
    float sample = a.mean[band];
    if (x < a.frame_width && y < a.frame_height)
        sample = (float)a.frame[((long long)y * a.frame_width + x) * a.bands + band];
    float value = (sample - a.mean[band]) / a.std_dev[band];
    float q = roundf(value * a.inverse_scale) + (float)a.zero_point;
    signed char code;
    if (q != q) code = (signed char)a.zero_point;
    else code = (signed char)(q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q));
    a.output[(long long)blockIdx.y * a.batch_stride + i] = code;
}
