// Helpers for the tree-cache kernels, passed to mx.fast.metal_kernel as `header=`
// (after a line `#define TREE_QUANT 0|1` that selects the storage format).
//
// Pointer types are template parameters: MLX passes an input of fewer than 8
// elements in the constant address space and a larger one in the device space.

// Element d of a row rotated by RoPE to `position` (rotate-half over the first `dims`
// values; the rest pass through), as mx.fast.rope computes it: the pair (i, i + dims/2)
// turns by position * 2^(-i / (dims/2) * log2_base). `position` is scale * offset.
template <typename P>
float rotated(P row, int d, int dims, float position, float log2_base) {
  const float x = static_cast<float>(row[d]);
  if (d >= dims) {
    return x;
  }
  const int half_dims = dims / 2;
  const int i = d < half_dims ? d : d - half_dims;
  const float ratio = static_cast<float>(i) / static_cast<float>(half_dims);
  const float theta = position * metal::exp2(-ratio * log2_base);
  const float c = metal::fast::cos(theta);
  const float s = metal::fast::sin(theta);
  if (d < half_dims) {
    return x * c - static_cast<float>(row[d + half_dims]) * s;
  }
  return static_cast<float>(row[d - half_dims]) * s + x * c;
}

// MLX's affine quantization (mx.quantize on Metal) of the PER values `x` this lane
// holds into one 32-bit word. LANES neighbouring lanes hold one group and share its
// scale and bias. Like MLX's Metal kernel, the group maximum starts at 0.
template <int BITS, int PER, int LANES>
uint32_t quantize_word(const thread float* x, thread float& scale, thread float& bias) {
  constexpr float n_bins = (1 << BITS) - 1;
  float lo = FLT_MAX;
  float hi = 0.0f;
  for (int i = 0; i < PER; ++i) {
    lo = metal::min(lo, x[i]);
    hi = metal::max(hi, x[i]);
  }
  for (ushort offset = 1; offset < LANES; offset <<= 1) {
    lo = metal::min(lo, simd_shuffle_xor(lo, offset));
    hi = metal::max(hi, simd_shuffle_xor(hi, offset));
  }
  scale = metal::max((hi - lo) / n_bins, 1e-7f);
  const bool side = metal::abs(lo) > metal::abs(hi);
  scale = side ? scale : -scale;
  const float edge = side ? lo : hi;
  const float q0 = metal::round(edge / scale);
  const bool at_zero = q0 == 0.0f;
  scale = at_zero ? scale : edge / q0;
  bias = at_zero ? 0.0f : edge;
  uint32_t word = 0;
  for (int i = 0; i < PER; ++i) {
    const float q = metal::clamp(metal::round((x[i] - bias) / scale), 0.0f, n_bins);
    word |= static_cast<uint32_t>(q) << (BITS * i);
  }
  return word;
}

// Reads value d of entry `row` from a float tree buffer (rows of D values).
template <int D, typename P>
struct FloatRows {
  P data;
  float operator()(uint row, uint d) const {
    return static_cast<float>(data[row * D + d]);
  }
};

template <int D, typename P>
FloatRows<D, P> float_rows(P data) {
  return FloatRows<D, P>{data};
}

// Reads value d of entry `row` from an affine quantized tree buffer: packed words,
// and one scale and bias per group of GS values.
template <int D, int BITS, int GS, typename PW, typename PS>
struct QuantRows {
  PW words;
  PS scales;
  PS biases;
  float operator()(uint row, uint d) const {
    constexpr uint per_word = 32 / BITS;
    const uint32_t word = words[row * (D / per_word) + d / per_word];
    const uint q = (word >> (BITS * (d % per_word))) & ((1u << BITS) - 1u);
    const uint g = row * (D / GS) + d / GS;
    return static_cast<float>(scales[g]) * static_cast<float>(q) + static_cast<float>(biases[g]);
  }
};

template <int D, int BITS, int GS, typename PW, typename PS>
QuantRows<D, BITS, GS, PW, PS> quant_rows(PW words, PS scales, PS biases) {
  return QuantRows<D, BITS, GS, PW, PS>{words, scales, biases};
}

// One step of an online softmax: folds score s and this lane's PL values v of its
// entry into the running maximum m, sum l and output o.
template <int PL>
void softmax_step(float s, const thread float* v, thread float& m, thread float& l,
                  thread float* o) {
  const float m_new = metal::max(m, s);
  const float fix = metal::exp(m - m_new);
  const float p = metal::exp(s - m_new);
  l = l * fix + p;
  for (int i = 0; i < PL; ++i) {
    o[i] = o[i] * fix + p * v[i];
  }
  m = m_new;
}
