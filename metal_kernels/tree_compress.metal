// tree_compress (kernel body for mx.fast.metal_kernel; helpers in tree_common.metal).
//
// For one layer and B encoded segments: gathers the kept positions `keep` of keys and
// values (B, KV, L, D), rotates the keys to their chunk position, and writes both in
// the tree cache's storage format as entry (h, b * NT + j) of (KV, B * NT, ...) outputs.
// Grid (D / PER, NT, 2 * B * KV): x = the PER values of a row a thread handles,
// y = kept entry j, z = keys (z < B * KV) or values, then batch row b and kv head h.
// Quantized, PER values fill one 32-bit word and GS / PER lanes share a group.
const uint x = thread_position_in_grid.x;
const uint j = thread_position_in_grid.y;
const uint z = thread_position_in_grid.z;
const bool is_key = z < B * KV;
const uint bh = is_key ? z : z - B * KV;
const uint b = bh / KV;
const uint h = bh % KV;
const auto src = (is_key ? keys : values) + (bh * L + keep[j]) * D;
const uint entry = h * (B * NT) + b * NT + j;
const float position = rope_scale * static_cast<float>(chunk_pos[b]);

// Rounded as the ops path rounds: rotated in the input dtype, then stored as S.
float vals[PER];
for (int i = 0; i < PER; ++i) {
  const int d = x * PER + i;
  const float value = is_key ? rotated(src, d, ROT, position, rope_base)
                             : static_cast<float>(src[d]);
  vals[i] = static_cast<float>(static_cast<S>(static_cast<T>(value)));
}

#if TREE_QUANT
constexpr uint lanes = GS / PER;
float scale;
float bias;
const uint32_t word = quantize_word<BITS, PER, lanes>(vals, scale, bias);
(is_key ? k_w : v_w)[entry * (D / PER) + x] = word;
if (x % lanes == 0) {
  const uint g = entry * (D / GS) + x / lanes;
  (is_key ? k_s : v_s)[g] = static_cast<S>(scale);
  (is_key ? k_b : v_b)[g] = static_cast<S>(bias);
}
#else
for (int i = 0; i < PER; ++i) {
  (is_key ? k : v)[entry * D + x * PER + i] = static_cast<S>(vals[i]);
}
#endif
