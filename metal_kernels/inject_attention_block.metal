// inject_attention for blocks of query rows, the prompt (kernel body for
// mx.fast.metal_kernel; helpers in tree_common.metal).
//
// out = softmax(q K^T * scale) V over all N tree entries: no mask, GQA, dequantized on
// the fly. The rows are the (query head, token) pairs of the H / KV heads that share
// one kv head: R = (H / KV) * L rows. A threadgroup of BQ SIMD groups takes BQ rows,
// one per SIMD group (each lane holding D / 32 values), and reads the tree in tiles
// of BK entries that all its threads dequantize once into threadgroup memory.
constexpr int PL = D / 32;
constexpr uint G = H / KV;
constexpr uint R = G * L;
constexpr uint THREADS = BQ * 32;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint tid = thread_index_in_threadgroup;
const uint b = threadgroup_position_in_grid.y / KV;
const uint kv_head = threadgroup_position_in_grid.y % KV;
const uint first_row = kv_head * N;
const uint r = threadgroup_position_in_grid.x * BQ + sg;  // this SIMD group's row
const bool active = r < R;
const uint q_row = ((b * H + kv_head * G + r / L) * L + r % L) * D;
const uint first = lane * PL;
#if TREE_QUANT
const auto keys = quant_rows<D, BITS, GS>(k_w, k_s, k_b);
const auto vals = quant_rows<D, BITS, GS>(v_w, v_s, v_b);
#else
const auto keys = float_rows<D>(k);
const auto vals = float_rows<D>(v);
#endif

float q[PL];
float o[PL];
for (int i = 0; i < PL; ++i) {
  const float scaled = active ? static_cast<float>(queries[q_row + first + i]) * scale : 0.0f;
  q[i] = static_cast<float>(static_cast<T>(scaled));  // rounded as the ops path rounds
  o[i] = 0.0f;
}
float m = -FLT_MAX;
float l = 0.0f;

threadgroup float tile_k[BK * D];
threadgroup float tile_v[BK * D];
for (uint start = 0; start < N; start += BK) {
  const uint count = metal::min(uint(BK), N - start);
  for (uint i = tid; i < count * D; i += THREADS) {
    tile_k[i] = keys(first_row + start + i / D, i % D);
    tile_v[i] = vals(first_row + start + i / D, i % D);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (active) {
    for (uint e = 0; e < count; ++e) {
      float s = 0.0f;
      float vrow[PL];
      for (int i = 0; i < PL; ++i) {
        s += q[i] * tile_k[e * D + first + i];
        vrow[i] = tile_v[e * D + first + i];
      }
      softmax_step<PL>(simd_sum(s), vrow, m, l, o);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

if (active) {
  for (int i = 0; i < PL; ++i) {
    out[q_row + first + i] = static_cast<T>(o[i] / l);
  }
}
