// Element-wise ops of int8.rs: Add, Mul (with b broadcast per plane), Rescale, Lut and Gather.

// Add::run: both addends rescaled with 16 fraction bits, summed, rounded half up.
extern "C" __global__ void kestrel_add(ElementwiseArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    int x = (int)((unsigned)kestrel_wrapping_sub(a.a[item + i], a.zero_a) << 16);
    int y = (int)((unsigned)kestrel_wrapping_sub(a.b[item + i], a.zero_b) << 16);
    long long sum = kestrel_apply(x, a.multiplier_a, a.shift_a) +
                    kestrel_apply(y, a.multiplier_b, a.shift_b) + (1LL << 15);
    a.output[item + i] = (signed char)kestrel_clamp((sum >> 16) + a.output_zero_point, a.min, a.max);
}

// Mul::run_wide: a[i] * b[i / plane], one requantisation (Mul::run where wide_inputs is 0).
extern "C" __global__ void kestrel_mul(ElementwiseArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    unsigned x = (unsigned)kestrel_input_value(a.a[item + i], a.zero_a, a.wide_inputs & 1, a.wide_a);
    unsigned y = (unsigned)kestrel_input_value(a.b[item + i / a.plane], a.zero_b,
                                               a.wide_inputs & 2, a.wide_b);
    a.output[item + i] = kestrel_requantize((int)(x * y), a.multiplier_a, a.shift_a,
                                            a.output_zero_point, a.min, a.max);
}

// Rescale::run: one value from one scale and zero point to another (a Concat part).
extern "C" __global__ void kestrel_rescale(ElementwiseArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    int x = kestrel_wrapping_sub(a.a[item + i], a.zero_a);
    a.output[item + i] = kestrel_requantize(x, a.multiplier_a, a.shift_a, a.output_zero_point,
                                            a.min, a.max);
}

// Lut::run: the table entry of the input code's bits.
extern "C" __global__ void kestrel_lut(ElementwiseArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    a.output[item + i] = a.table[(unsigned char)a.a[item + i]];
}

// Gather::run: output plane i / plane is input plane indices[i / plane] (the indices, u32 each,
// are passed as the table and were checked against the input when the plan loaded).
extern "C" __global__ void kestrel_gather(ElementwiseArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    const unsigned* indices = (const unsigned*)a.table;
    long long from = (long long)indices[i / a.plane] * a.plane + i % a.plane;
    a.output[item + i] = a.a[item + from];
}

// Add16::run of int16.rs: two int16 addends rescaled with 15 fraction bits, summed, rounded
// half up.
extern "C" __global__ void kestrel_add16(ElementwiseArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    int x = kestrel_load(a.a + item, i, 2) * 32768;
    int y = kestrel_load(a.b + item, i, 2) * 32768;
    long long sum = kestrel_apply(x, a.multiplier_a, a.shift_a) +
                    kestrel_apply(y, a.multiplier_b, a.shift_b) + (1LL << 14);
    kestrel_store_wide(a.output + item, i, a.output_bytes, sum >> 15, a.output_zero_point, a.min,
                       a.max);
}

// Mul16::run: a[i] * b[i / plane] of int16 codes, one requantisation.
extern "C" __global__ void kestrel_mul16(ElementwiseArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    long long product =
        (long long)kestrel_load(a.a + item, i, 2) * kestrel_load(a.b + item, i / a.plane, 2);
    kestrel_write_wide(a.output + item, i, a.output_bytes, product, a.multiplier_a, a.shift_a,
                       a.output_zero_point, a.min, a.max);
}

// Function16::run: the table's two entries around the int16 code, interpolated over the 64
// codes between them (rounded half up; the shift floors as Rust's does).
extern "C" __global__ void kestrel_function16(ElementwiseArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    const short* table = (const short*)a.table;
    int from_bottom = kestrel_load(a.a + item, i, 2) + 32768;
    int k = from_bottom / 64, fraction = from_bottom % 64;
    int low = table[k], high = table[k + 1];
    int code = low + (((high - low) * fraction + 32) >> 6);
    kestrel_store_wide(a.output + item, i, 2, code, 0, -32767, 32767);
}
