// Token + position embedding, forward and backward.
//
// embedding_forward: one thread per output element, out[b,t,c] = wte[tok,c] + wpe[start + t,c]
// (start > 0 when decoding after cached tokens). The
// host checks token ids before launching; an id outside the table still never reads past it
// (the element becomes NaN instead).
//
// embedding_backward_wpe: one thread per (position, channel) sums dout over the sequences in
// order and adds the sum to dwpe.
//
// embedding_backward_wte: the host groups the positions by token (it keeps a copy of every
// token buffer) and uploads one u32 table:
//   [0, nb)             the token of each group
//   [nb, 2·nb + 1)      where each group starts in `order` (plus the end of the last one)
//   [2·nb + 1, ...)     the positions, sorted by (token, position)
// One thread per (group, channel) sums its group's dout rows in position order and adds the
// sum to dwte[token]. Every row of dwte has one writer, so no atomics are needed and the
// result is the same on every run.

// `n` = batch · seq · channels.
extern "C" __global__ void embedding_forward(
    float* out, const u32* tokens, const float* wte, const float* wpe,
    u32 seq, u32 start, u32 channels, u32 vocab, u64 n) {
    for (u64 i = global_index(); i < n; i += grid_stride()) {
        u64 row = i / channels;
        u32 c = (u32)(i % channels);
        u32 t = start + (u32)(row % seq);
        u32 tok = tokens[row];
        out[i] = tok < vocab ? wte[(u64)tok * channels + c] + wpe[(u64)t * channels + c]
                             : pipit_nan();
    }
}

// dwpe[t, c] += Σ_b dout[b, t, c]; one thread per element of dwpe[0..seq).
extern "C" __global__ void embedding_backward_wpe(
    float* dwpe, const float* dout, u32 batch, u32 seq, u32 channels) {
    u64 plane = (u64)seq * channels;
    for (u64 i = global_index(); i < plane; i += grid_stride()) {
        float s = 0.0f;
        for (u32 b = 0; b < batch; b++) {
            s += dout[(u64)b * plane + i];
        }
        dwpe[i] += s;
    }
}

// dwte[token_g, c] += Σ_{p in group g} dout[p, c]. Grid: groups × ceil(channels / blockDim).
extern "C" __global__ void embedding_backward_wte(
    float* dwte, const float* dout, const u32* table, u32 groups, u32 channels) {
    u32 blocks_per_group = (channels + blockDim.x - 1) / blockDim.x;
    u32 g = blockIdx.x / blocks_per_group;
    u32 c = (blockIdx.x % blocks_per_group) * blockDim.x + threadIdx.x;
    if (g >= groups || c >= channels) {
        return;
    }
    u32 token = table[g];
    u32 start = table[groups + g];
    u32 end = table[groups + g + 1];
    const u32* order = table + 2 * (u64)groups + 1;
    float s = 0.0f;
    for (u32 j = start; j < end; j++) {
        s += dout[(u64)order[j] * channels + c];
    }
    dwte[(u64)token * channels + c] += s;
}
