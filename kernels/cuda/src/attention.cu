// Attention::run of int8.rs: each pixel's softmax-weighted mean of one head's value planes, the
// logits exact integer dot products, the exponentials from the plan's table.

#define KESTREL_MAX_KEY_DIM 256
#define KESTREL_MAX_HEAD_DIM 256

extern "C" __global__ void kestrel_attention(AttentionArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    long long item = (long long)blockIdx.y * a.batch_stride;
    int head = i / a.plane, n = i % a.plane;
    long long plane = a.plane;
    const signed char* queries = a.input + item + (long long)head * (2 * a.key_dim + a.head_dim) * plane;
    const signed char* keys = queries + a.key_dim * plane;
    const signed char* values = keys + a.key_dim * plane;
    int query[KESTREL_MAX_KEY_DIM];
    for (int c = 0; c < a.key_dim; ++c) query[c] = queries[c * plane + n] - a.input_zero_point;
    int largest = -2147483647 - 1;
    for (int m = 0; m < a.plane; ++m) {
        int logit = 0;
        for (int c = 0; c < a.key_dim; ++c) logit += query[c] * (keys[c * plane + m] - a.input_zero_point);
        largest = logit > largest ? logit : largest;
    }
    long long sums[KESTREL_MAX_HEAD_DIM];
    for (int d = 0; d < a.head_dim; ++d) sums[d] = 0;
    long long total = 0;
    for (int m = 0; m < a.plane; ++m) {
        int logit = 0;
        for (int c = 0; c < a.key_dim; ++c) logit += query[c] * (keys[c * plane + m] - a.input_zero_point);
        long long index = kestrel_apply(largest - logit, a.index_multiplier, a.index_shift);
        long long weight = index >= 0 && index < a.table_len ? a.exp_table[index] : 0;
        total += weight;
        for (int d = 0; d < a.head_dim; ++d)
            sums[d] += (long long)(values[d * plane + m] - a.input_zero_point) * weight;
    }
    signed char* out = a.output + item + (long long)head * a.head_dim * plane + n;
    for (int d = 0; d < a.head_dim; ++d) {
        int mean = total > 0 ? (int)(sums[d] * 65536 / total) : 0;
        out[d * plane] = kestrel_requantize(mean, a.output_multiplier, a.output_shift,
                                            a.output_zero_point, a.min, a.max);
    }
}
