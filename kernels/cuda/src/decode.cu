// The detector's decoding, on head codes: runtime::detect::decode's peak rule for one heatmap
// cell per thread. Dequantisation is strictly increasing (the host checks), so comparing codes
// decides as comparing values does: a cell at or above the threshold code is a peak when no
// neighbour in its 3x3 window scores higher, nor the same before it in raster order. Peaks go
// to the batch item's list in whatever order threads finish; the host sorts them.
extern "C" __global__ void kestrel_decode(DecodeArgs a) {
    int i = kestrel_index(a.count);
    if (i < 0) return;
    const signed char* head = a.head + (long long)blockIdx.y * a.batch_stride;
    int score = head[i];
    if (score < a.threshold) return;
    int plane = a.height * a.width;
    int cell = i % plane;
    int y = cell / a.width, x = cell % a.width;
    const signed char* heatmap = head + (i - cell);
    for (int ny = y > 0 ? y - 1 : 0; ny <= y + 1 && ny < a.height; ++ny) {
        for (int nx = x > 0 ? x - 1 : 0; nx <= x + 1 && nx < a.width; ++nx) {
            int other = heatmap[ny * a.width + nx];
            bool before = ny < y || (ny == y && nx < x);
            if (other > score || (other == score && before)) return;
        }
    }
    int* count = a.counts + blockIdx.y;
    int slot = atomicAdd(count, 1);
    if (slot >= a.capacity) return;
    const signed char* box = head + (long long)a.classes * plane + cell;
    unsigned codes = 0;
    for (int k = 0; k < 4; ++k) codes |= (unsigned)(unsigned char)box[k * plane] << (8 * k);
    int* out = a.candidates + ((long long)blockIdx.y * a.capacity + slot) * 3;
    out[0] = i;
    out[1] = score;
    out[2] = (int)codes;
}
