#!/usr/bin/env node
'use strict';
// Calls qwen25vl_embed.v1.EmbeddingService/Extract from Node.js with the repository's .proto as
// is (no generated code) and prints each returned tensor. See README.md, "Other languages".
//
//   node extract.js cat.png [more images...] [--server host:port] [--outputs a,b] [--dtype float16]
//                   [--prompt TEXT] [--normalize] [--json]
//
// Exit status: 0 on success, 1 when the call fails (the gRPC status name and details go to
// stderr, e.g. "INVALID_ARGUMENT: ..."), 2 for bad command-line arguments.

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { TensorAssembler } = require('./tensors');

const PROTO_ROOT = path.join(__dirname, '..', '..', 'protos');
// The Python SDK's default retry policy (qwen25vl_embed.RetryPolicy), as a gRPC service config:
// every call of the service is idempotent, so grpc-js retries UNAVAILABLE and RESOURCE_EXHAUSTED
// (4 attempts, exponential backoff from 0.2 s up to 5 s) and waits the pause a refusal's
// `grpc-retry-pushback-ms` asks for (a negative one: no retry). A call is not retried once a
// response has arrived, nor when its request is over the per-call retry buffer (8 MiB, below the
// server's 64 MiB receive limit, so a request refused for its size is not sent twice).
const SERVICE_CONFIG = fs.readFileSync(path.join(__dirname, 'service_config.json'), 'utf8');
const CHANNEL_OPTIONS = {
  'grpc.service_config': SERVICE_CONFIG,
  'grpc.enable_retries': 1,
  'grpc.per_rpc_retry_buffer_size': 8 * 1024 * 1024,
};
const DTYPES = { float32: 'DTYPE_FLOAT32', float16: 'DTYPE_FLOAT16', bfloat16: 'DTYPE_BFLOAT16' };
const USAGE =
  'usage: node extract.js [IMAGE...] [--server host:port] [--outputs a,b,c] ' +
  '[--dtype float32|float16|bfloat16] [--prompt TEXT] [--normalize] [--json] [--timeout SECONDS] ' +
  '[--prompt-format chat|raw|query|document] [--dimensions N] [--vector-encoding float|int8|binary]\n' +
  'No image: a text request (needs --prompt).';
const PROMPT_FORMATS = ['chat', 'raw', 'query', 'document'];
const VECTOR_ENCODINGS = ['float', 'int8', 'binary'];

function loadService() {
  const definition = protoLoader.loadSync('qwen25vl_embed/v1/embed.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto (visual_token_lens, not visualTokenLens)
    enums: String, // "DTYPE_FLOAT16" rather than 2
    longs: Number, // shapes, offsets and counts are far below 2^53
    defaults: true, // offset 0 and empty lists are present rather than undefined
  });
  return grpc.loadPackageDefinition(definition).qwen25vl_embed.v1.EmbeddingService;
}

function parseCommandLine(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      server: { type: 'string', default: 'localhost:50051' },
      outputs: { type: 'string', default: '' },
      dtype: { type: 'string', default: 'float32' },
      prompt: { type: 'string' },
      normalize: { type: 'boolean', default: false },
      json: { type: 'boolean', default: false },
      timeout: { type: 'string', default: '300' },
      'prompt-format': { type: 'string', default: 'chat' },
      dimensions: { type: 'string', default: '0' },
      'vector-encoding': { type: 'string', default: 'float' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    process.exit(0);
  }
  if (positionals.length === 0 && values.prompt === undefined) throw new Error('give an image, or --prompt for a text request');
  if (!PROMPT_FORMATS.includes(values['prompt-format'])) throw new Error(`--prompt-format must be one of ${PROMPT_FORMATS.join(', ')}`);
  if (!VECTOR_ENCODINGS.includes(values['vector-encoding'])) throw new Error(`--vector-encoding must be one of ${VECTOR_ENCODINGS.join(', ')}`);
  const dimensions = Number(values.dimensions);
  if (!(Number.isInteger(dimensions) && dimensions >= 0)) throw new Error('--dimensions must be a whole number (0: all)');
  if (!(values.dtype in DTYPES)) throw new Error(`--dtype must be one of ${Object.keys(DTYPES).join(', ')}`);
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) throw new Error('--timeout must be a positive number of seconds');
  return {
    ...values,
    timeout,
    dimensions,
    promptFormat: values['prompt-format'],
    vectorEncoding: values['vector-encoding'],
    images: positionals,
  };
}

/** Runs one Extract call; resolves to {metadata, tensors: Map}, rejects with the gRPC error. */
function extract(client, request, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    const call = client.Extract(request, { deadline: Date.now() + timeoutSeconds * 1000 });
    const assembler = new TensorAssembler();
    let metadata = null;
    call.on('data', (response) => {
      if (response.metadata) metadata = response.metadata; // first response only
      try {
        for (const tensor of response.tensors) assembler.add(tensor);
      } catch (err) {
        call.cancel(); // a malformed stream: stop the server's work too
        reject(err);
      }
    });
    call.on('error', reject); // also fires (CANCELLED) after cancel(); the first reject wins
    call.on('end', () => {
      try {
        resolve({ metadata, tensors: assembler.finish() });
      } catch (err) {
        reject(err);
      }
    });
  });
}

// JSON has no NaN/Infinity and no 64-bit integers: those travel as strings ("NaN", "-Infinity",
// "12345678901234567890") so nothing is silently turned into null or rounded.
function jsonValue(value) {
  if (typeof value === 'bigint') return Number.isSafeInteger(Number(value)) ? Number(value) : value.toString();
  return Number.isFinite(value) ? value : String(value);
}

function toJson({ metadata, tensors }) {
  const out = { metadata: null, tensors: {} };
  if (metadata) {
    out.metadata = {
      visual_token_lens: metadata.visual_token_lens,
      image_grid_thw: metadata.image_grid_thw.map((g) => [g.t, g.h, g.w]),
      sequence_length: metadata.sequence_length,
    };
  }
  for (const [name, t] of tensors) {
    out.tensors[name] = {
      shape: t.shape,
      dtype: t.dtype.replace('DTYPE_', '').toLowerCase(),
      parts: t.parts,
      values: Array.from(t.values, jsonValue),
    };
  }
  return JSON.stringify(out);
}

function toText({ metadata, tensors }) {
  const lines = [];
  if (metadata) {
    const grids = metadata.image_grid_thw.map((g) => `${g.t}x${g.h}x${g.w}`).join(' ');
    lines.push(`visual_token_lens [${metadata.visual_token_lens.join(", ")}]  grids ${grids}  T ${metadata.sequence_length}`);
  }
  for (const [name, t] of tensors) {
    const first = Array.from(t.values.subarray(0, 6), (v) => (typeof v === 'bigint' ? String(v) : v.toFixed(6)));
    const more = t.values.length > first.length ? ', ...' : '';
    const dtype = t.dtype.replace('DTYPE_', '').toLowerCase();
    lines.push(`${name}  [${t.shape.join(', ')}]  ${dtype}  (${t.parts} part(s))  ${first.join(', ')}${more}`);
  }
  return lines.join('\n');
}

async function main() {
  let args;
  let images;
  try {
    args = parseCommandLine(process.argv.slice(2));
    images = args.images.map((file) => ({ data: fs.readFileSync(file) }));
  } catch (err) {
    console.error(`${err.message}\n${USAGE}`);
    return 2;
  }
  const request = {
    images,
    outputs: args.outputs ? args.outputs.split(',').map((s) => s.trim()) : [],
    dtype: DTYPES[args.dtype],
    normalize: args.normalize,
    // Enums by name (proto-loader's enums: String); retrieval settings only matter with a recipe.
    prompt_format: `PROMPT_FORMAT_${args.promptFormat.toUpperCase()}`,
    dimensions: args.dimensions,
    vector_encoding: `VECTOR_ENCODING_${args.vectorEncoding.toUpperCase()}`,
  };
  // `prompt` is `optional` in the proto: leaving it out means the server's default prompt.
  if (args.prompt !== undefined) request.prompt = args.prompt;

  // The retry policy only; the default 4 MiB receive limit suffices because the server sends no
  // message over its chunk size (1 MiB by default).
  const EmbeddingService = loadService();
  const client = new EmbeddingService(args.server, grpc.credentials.createInsecure(), CHANNEL_OPTIONS);
  try {
    const result = await extract(client, request, args.timeout);
    console.log(args.json ? toJson(result) : toText(result));
    return 0;
  } catch (err) {
    // A gRPC error has a numeric code; grpc.status maps it back to its name.
    const status = err.code !== undefined ? grpc.status[err.code] : 'CLIENT_ERROR';
    console.error(`${status}: ${err.details ?? err.message}`);
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => {
  process.exitCode = code;
});
