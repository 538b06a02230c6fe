// Shared by every Kestrel CUDA kernel: the argument structs (mirrored field for field by the
// `#[repr(C)]` structs in launch.rs) and the fixed-point arithmetic of quant.rs and int8.rs.
//
// Every kernel runs one thread per output value of one batch item: `blockIdx.y` is the batch
// item, whose arena starts `batch_stride` bytes after the previous one. Integer arithmetic that
// Rust does with wrapping goes through `unsigned`, so it wraps the same way here (signed overflow
// is undefined in C++). No standard headers: NVRTC has none.

struct ConvArgs {
    const signed char* input;
    signed char* output;
    const signed char* weights;
    const int* bias;
    const int* multiplier;
    const signed char* shift;
    const int* packed;       // kestrel_conv_dp4a: filters packed by launch.rs's `pack_dp4a`
    const int* packed_bias;  // kestrel_conv_dp4a: bias - input zero point * sum of the filter
    const short* wide;       // kestrel_conv with wide_input: the input's WideTable
    long long batch_stride;
    int count;
    int channels, height, width;
    int out_channels, out_height, out_width;
    int kernel_h, kernel_w, stride_y, stride_x, pad_y, pad_x, dilation_y, dilation_x, group;
    int input_zero_point, output_zero_point, min, max;
    int wide_input;  // read the input through `wide` rather than minus input_zero_point
    int input_bytes, output_bytes;  // kestrel_conv16: 1 (int8) or 2 (int16) per value
};

// Add, Mul, Rescale, Lut and Gather: one output value from one value of `a` (and of `b`).
struct ElementwiseArgs {
    const signed char* a;
    const signed char* b;
    signed char* output;
    const signed char* table;
    const short* wide_a;  // Mul: the WideTable of `a`, where wide_inputs has bit 0
    const short* wide_b;  // Mul: the WideTable of `b`, where wide_inputs has bit 1
    long long batch_stride;
    int count;
    int plane;  // Mul: values of `a` that share one value of `b`; Gather: values per plane
    int zero_a, zero_b;
    int multiplier_a, shift_a, multiplier_b, shift_b;
    int output_zero_point, min, max;
    int wide_inputs;
    int output_bytes;  // the 16-bit kernels: 1 (int8) or 2 (int16) per output value
};

// MaxPool, AveragePool and GlobalAveragePool (a window the size of the plane).
struct PoolArgs {
    const signed char* input;
    signed char* output;
    const short* wide;  // GlobalAveragePool with wide_input: the input's WideTable
    long long batch_stride;
    int count;
    int channels, height, width, out_height, out_width;
    int kernel_h, kernel_w, stride_y, stride_x, pad_y, pad_x;
    int count_include_pad;
    int input_zero_point, multiplier, shift, output_zero_point, min, max;
    int wide_input;  // read the input through `wide` rather than minus input_zero_point
    int output_bytes;  // kestrel_global_average_pool16: 1 (int8) or 2 (int16) per output value
};

struct ResizeArgs {
    const signed char* input;
    signed char* output;
    long long batch_stride;
    int count;
    int channels, height, width, out_height, out_width;
    int bilinear;
};

// Attention over the pixels of one tensor (int8.rs's Attention): one thread per head and pixel.
struct AttentionArgs {
    const signed char* input;
    signed char* output;
    const int* exp_table;
    long long batch_stride;
    int count;  // heads * plane
    int key_dim, head_dim, plane, table_len;
    int input_zero_point;
    int index_multiplier, index_shift;
    int output_multiplier, output_shift;
    int output_zero_point, min, max;
};

// A detector head's peaks, found on its int8 codes: one thread per heatmap cell.
struct DecodeArgs {
    const signed char* head;
    int* candidates;  // per batch item, `capacity` triples (index, score code, box codes)
    int* counts;      // per batch item: peaks found, which may exceed `capacity`
    long long batch_stride;
    int count;        // heatmap cells: classes * height * width
    int classes, height, width;
    int threshold;    // the smallest code whose value reaches the score threshold (128: none)
    int capacity;
};

// A u8 HWC frame to int8 NCHW model inputs, one per batch item, each cut at its own origin.
struct PreprocessArgs {
    const unsigned char* frame;
    const int* origins;  // (x, y) per batch item
    signed char* output;
    long long batch_stride;
    int count;
    int frame_width, frame_height, bands;
    int width, height;  // the model input
    float mean[16];
    float std_dev[16];
    float inverse_scale;
    int zero_point;
};

// The lower bound, then the upper, as the CPU kernels clamp: a range a corrupt plan inverted
// (lo > hi) gives hi on every executor.
__device__ __forceinline__ int kestrel_clamp(long long v, int lo, int hi) {
    long long raised = v < lo ? lo : v;
    return raised > hi ? hi : (int)raised;
}

// Requant::apply: round(acc * multiplier * 2^(shift - 31)), ties up, saturated to int32.
__device__ __forceinline__ long long kestrel_apply(int acc, int multiplier, int shift) {
    int s = shift < -31 ? -31 : (shift > 30 ? 30 : shift);
    int right = 31 - s;
    long long product = (long long)acc * (long long)multiplier;
    long long rounded = (product + (1LL << (right - 1))) >> right;
    return rounded < -2147483648LL ? -2147483648LL
                                   : (rounded > 2147483647LL ? 2147483647LL : rounded);
}

// requantize_i8: apply, add the zero point, clamp to the activation range.
__device__ __forceinline__ signed char kestrel_requantize(int acc, int multiplier, int shift,
                                                          int zero_point, int min, int max) {
    return (signed char)kestrel_clamp(kestrel_apply(acc, multiplier, shift) + zero_point, min, max);
}

__device__ __forceinline__ int kestrel_wrapping_sub(int a, int b) {
    return (int)((unsigned)a - (unsigned)b);
}

// Channel, row and column of value `i` of a CHW tensor `width` wide and `height` high.
// An input value as int8.rs's kernels read it: minus the zero point, or, for a function the
// compiler widened, its WideTable entry (`wide_value`).
__device__ __forceinline__ int kestrel_input_value(signed char code, int zero_point, int wide_input,
                                                   const short* wide) {
    return wide_input ? (int)wide[(unsigned char)code] : kestrel_wrapping_sub(code, zero_point);
}

struct KestrelPosition {
    int c, y, x;
};

__device__ __forceinline__ KestrelPosition kestrel_position(int i, int width, int height) {
    KestrelPosition p;
    p.x = i % width;
    p.y = (i / width) % height;
    p.c = i / (width * height);
    return p;
}

// The thread's output index within its batch item, or -1 past the end.
__device__ __forceinline__ int kestrel_index(int count) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    return i < count ? (int)i : -1;
}

// Value i of a tensor of `bytes`-wide codes (int16.rs's Width::load): 1, int8; 2, little-endian
// int16.
__device__ __forceinline__ int kestrel_load(const signed char* t, long long i, int bytes) {
    if (bytes == 2) {
        unsigned lo = (unsigned char)t[2 * i], hi = (unsigned char)t[2 * i + 1];
        return (int)(short)(unsigned short)(lo | (hi << 8));
    }
    return t[i];
}

// WideOutput::store: `steps` plus the zero point (saturated to int32), clamped to [min, max]
// (lower bound first), then to the width's range, written as value i.
__device__ __forceinline__ void kestrel_store_wide(signed char* t, long long i, int bytes,
                                                   long long steps, int zero_point, int min,
                                                   int max) {
    long long v = steps + zero_point;
    v = v < -2147483648LL ? -2147483648LL : (v > 2147483647LL ? 2147483647LL : v);
    int code = kestrel_clamp(v, min, max);
    if (bytes == 2) {
        code = code < -32767 ? -32767 : (code > 32767 ? 32767 : code);
        t[2 * i] = (signed char)(code & 0xff);
        t[2 * i + 1] = (signed char)((code >> 8) & 0xff);
    } else {
        t[i] = (signed char)(code < -128 ? -128 : (code > 127 ? 127 : code));
    }
}

// WideOutput::write: a 64-bit sum saturated to int32, requantised, stored.
__device__ __forceinline__ void kestrel_write_wide(signed char* t, long long i, int bytes,
                                                   long long acc, int multiplier, int shift,
                                                   int zero_point, int min, int max) {
    int sum = (int)(acc < -2147483648LL ? -2147483648LL : (acc > 2147483647LL ? 2147483647LL : acc));
    kestrel_store_wide(t, i, bytes, kestrel_apply(sum, multiplier, shift), zero_point, min, max);
}
