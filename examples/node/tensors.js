'use strict';
// Tensor messages -> typed arrays, following the contract in protos/qwen25vl_embed/v1/embed.proto:
// parts of one tensor arrive as consecutive Tensor messages with the same name; their bytes are
// concatenated in arrival order, then read as little-endian, row-major values of `dtype`.

const ITEM_SIZE = {
  DTYPE_FLOAT32: 4,
  DTYPE_FLOAT16: 2,
  DTYPE_BFLOAT16: 2,
  DTYPE_INT64: 8,
  DTYPE_INT8: 1, // retrieval vectors, VECTOR_ENCODING_INT8: value = v / 127
  DTYPE_UINT8: 1, // retrieval vectors, VECTOR_ENCODING_BINARY: packed bits, first component in the MSB
};

/** The float32 bit pattern of an IEEE binary16 bit pattern (exact: every half is a float). */
function halfBitsToFloatBits(h) {
  const sign = (h & 0x8000) << 16;
  const exponent = (h >> 10) & 0x1f;
  let mantissa = h & 0x3ff;
  if (exponent === 0x1f) return sign | 0x7f800000 | (mantissa << 13); // inf, nan (payload kept)
  if (exponent !== 0) return sign | ((exponent + 112) << 23) | (mantissa << 13); // rebias 15 -> 127
  if (mantissa === 0) return sign; // +-0
  // Subnormal half (mantissa * 2^-24): a normal float32 once the leading 1 is shifted into place.
  let shift = 0;
  while ((mantissa & 0x400) === 0) {
    mantissa <<= 1;
    shift += 1;
  }
  return sign | ((113 - shift) << 23) | ((mantissa & 0x3ff) << 13);
}

/**
 * Decodes little-endian bytes to a typed array: Float32Array for the float dtypes (float16 and
 * bfloat16 widened exactly; Node 20 has no Float16Array), BigInt64Array for DTYPE_INT64,
 * Int8Array / Uint8Array for DTYPE_INT8 / DTYPE_UINT8 (the int8 and binary retrieval vectors).
 * DataView reads keep this correct on any host byte order and any Buffer alignment.
 */
function decodeBytes(bytes, dtype) {
  const itemSize = ITEM_SIZE[dtype];
  if (itemSize === undefined) throw new Error(`unknown dtype ${dtype}`);
  if (bytes.length % itemSize !== 0) throw new Error(`${bytes.length} bytes is not a whole number of ${dtype}`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  const count = bytes.length / itemSize;
  if (dtype === 'DTYPE_INT8') return Int8Array.from(new Int8Array(bytes.buffer, bytes.byteOffset, count));
  if (dtype === 'DTYPE_UINT8') return Uint8Array.from(bytes);
  if (dtype === 'DTYPE_INT64') {
    const out = new BigInt64Array(count);
    for (let i = 0; i < count; i++) out[i] = view.getBigInt64(i * 8, true);
    return out;
  }
  const out = new Float32Array(count);
  if (dtype === 'DTYPE_FLOAT32') {
    for (let i = 0; i < count; i++) out[i] = view.getFloat32(i * 4, true);
    return out;
  }
  // Write bit patterns through an integer view of the same memory, so NaN payloads survive.
  const bits = new Uint32Array(out.buffer);
  if (dtype === 'DTYPE_BFLOAT16') {
    for (let i = 0; i < count; i++) bits[i] = view.getUint16(i * 2, true) << 16;
  } else {
    for (let i = 0; i < count; i++) bits[i] = halfBitsToFloatBits(view.getUint16(i * 2, true));
  }
  return out;
}

/**
 * Rebuilds tensors from the Tensor messages of an Extract stream (proto-loader objects with
 * keepCase, enums as strings, int64 as numbers). `add` each part in arrival order; `finish`
 * returns a Map name -> {shape, dtype, parts, values} in arrival order.
 */
class TensorAssembler {
  constructor() {
    this.pending = new Map();
    this.done = new Map();
  }

  add(tensor) {
    const { name, shape, dtype, data, offset } = tensor;
    if (this.done.has(name)) throw new Error(`tensor ${name}: received twice`);
    let entry = this.pending.get(name);
    if (entry === undefined) {
      if (ITEM_SIZE[dtype] === undefined) throw new Error(`tensor ${name}: unknown dtype ${dtype}`);
      const expected = shape.reduce((a, b) => a * b, 1) * ITEM_SIZE[dtype];
      entry = { shape, dtype, expected, chunks: [], received: 0 };
      this.pending.set(name, entry);
    } else if (dtype !== entry.dtype || shape.join(',') !== entry.shape.join(',')) {
      throw new Error(`tensor ${name}: a part's shape or dtype differs from its first part's`);
    }
    // Offsets must run on without gaps: a mismatch means a part was lost or reordered.
    if (offset !== entry.received) throw new Error(`tensor ${name}: part at byte ${offset}, expected ${entry.received}`);
    entry.chunks.push(data);
    entry.received += data.length;
    if (entry.received > entry.expected) throw new Error(`tensor ${name}: more bytes than its shape holds`);
    if (entry.received === entry.expected) {
      const bytes = Buffer.concat(entry.chunks, entry.received);
      this.done.set(name, { shape, dtype, parts: entry.chunks.length, values: decodeBytes(bytes, dtype) });
      this.pending.delete(name);
    }
  }

  finish() {
    if (this.pending.size > 0) {
      throw new Error(`stream ended before these tensors were complete: ${[...this.pending.keys()].join(', ')}`);
    }
    return this.done;
  }
}

module.exports = { TensorAssembler, decodeBytes, halfBitsToFloatBits };
