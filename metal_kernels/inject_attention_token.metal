// inject_attention for one query token (kernel body for mx.fast.metal_kernel;
// helpers in tree_common.metal).
//
// out = softmax(q K^T * scale) V over all N tree entries: no mask, GQA (H query heads
// share KV kv heads), dequantized on the fly. One threadgroup of NSG SIMD groups per
// (batch, query head); SIMD group g reads entries g, g + NSG, ... with an online
// softmax, each lane holding D / 32 values of a row; threadgroup memory then merges
// the NSG partial results.
constexpr int PL = D / 32;
const uint sg = simdgroup_index_in_threadgroup;
const uint lane = thread_index_in_simdgroup;
const uint bh = threadgroup_position_in_grid.y;
const uint first_row = (bh % H) / (H / KV) * N;
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
  const float scaled = static_cast<float>(queries[bh * D + first + i]) * scale;
  q[i] = static_cast<float>(static_cast<T>(scaled));  // rounded as the ops path rounds
  o[i] = 0.0f;
}
float m = -FLT_MAX;
float l = 0.0f;
for (uint e = sg; e < N; e += NSG) {
  float s = 0.0f;
  float vrow[PL];
  for (int i = 0; i < PL; ++i) {
    s += q[i] * keys(first_row + e, first + i);
    vrow[i] = vals(first_row + e, first + i);
  }
  softmax_step<PL>(simd_sum(s), vrow, m, l, o);
}

threadgroup float part_m[NSG];
threadgroup float part_l[NSG];
threadgroup float part_o[NSG * D];
if (lane == 0) {
  part_m[sg] = m;
  part_l[sg] = l;
}
for (int i = 0; i < PL; ++i) {
  part_o[sg * D + first + i] = o[i];
}
threadgroup_barrier(mem_flags::mem_threadgroup);

if (sg == 0) {
  const float mine = lane < NSG ? part_m[lane] : -FLT_MAX;
  const float top = simd_max(mine);
  const float weight = lane < NSG ? metal::exp(mine - top) : 0.0f;
  const float denom = simd_sum(lane < NSG ? weight * part_l[lane] : 0.0f);
  for (int i = 0; i < PL; ++i) {
    float acc = 0.0f;
    for (uint g = 0; g < NSG; ++g) {
      acc += simd_shuffle(weight, g) * part_o[g * D + first + i];
    }
    out[bh * D + first + i] = static_cast<T>(acc / denom);
  }
}
