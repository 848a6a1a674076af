// The chat page: an exported guppy model running in the browser with onnxruntime-web (WASM, single thread).
//
// The folder `guppy export` writes holds model.onnx, tokenizer.json, persona.json, config.json and runtime.json.
// runtime.json says where onnxruntime-web comes from: a pinned CDN version, or ort/ beside this page
// (`guppy export --runtime-dir`), with a subresource-integrity hash for each of its three files. The script is
// loaded with its hash; the WASM binary and its JS loader are fetched with theirs and handed to the runtime, so no
// byte of the runtime runs unchecked.
//
// Single-threaded WASM: threads need SharedArrayBuffer, which browsers give only to cross-origin-isolated pages
// (COOP/COEP headers that CDNs, model hubs and `python -m http.server` do not send); a 9M-parameter model decodes a
// token in milliseconds on one thread anyway.
//
// Generation uses the graph's KV cache (guppy/export.py): one call on the prompt, then one call per new token with
// the cache fed back, so each new token costs one position. Sampling mirrors guppy/model.py: sample (temperature,
// then top-k, then top-p; temperature 0 is greedy), and prompts are built and cut as guppy/chat.py builds them.
//
// Before "ready" the folder is checked as `guppy chat` checks it (guppy/onnx_chat.py): config.json against the shape
// model.onnx records in its metadata (guppy_config), and tokenizer.json against the sha256 recorded there
// (guppy_tokenizer_sha256). A tokenizer from another dataset with the same vocabulary size runs without an error and
// answers in garbage: only its hash tells. The metadata is read from the file's bytes (onnxMetadata: a few lines of
// protobuf, no library), and the hash is computed here (sha256Hex), not by crypto.subtle, which a page served over
// plain http from another machine (`guppy serve --host`) does not have.
//
// The page is never silent: each way it can fail to start (the runtime offline or blocked, a file of the export
// missing, the server gone, the model refused, a model.onnx that config.json or tokenizer.json does not belong to)
// is a Problem, which index.html's problem() shows in the chat area with the command that fixes it, and the status
// line never says "ready" then. A failure while replying is shown the same way. (A page opened from file:// never
// gets here: index.html says that one itself.)
import { ByteLevelBPE, IM_END_ID, IM_START_ID } from "./tokenizer.js";

const $ = (id) => document.getElementById(id);
const REEXPORT = "guppy export --checkpoint RUN --out DIR --force";
const INPUTS = ["input_ids", "past_keys", "past_values"], OUTPUTS = ["logits", "present_keys", "present_values"];

const firstLine = (e) => String((e && e.message) || e).split("\n")[0].slice(0, 200);

class Problem extends Error {
  constructor(what, fix, after) {
    super(what);
    this.fix = fix;
    this.after = after;
  }
}

async function getBytes(url) {
  let r;
  try {
    r = await fetch(url);
    if (r.ok) return new Uint8Array(await r.arrayBuffer());
  } catch (e) {
    throw new Problem(`Could not fetch ${url} (${e.message}): the server that served this page has stopped. `
                      + "Start it again with", "guppy serve DIR");
  }
  throw new Problem(`${url} is not here (HTTP ${r.status}): this folder is not a complete guppy export. `
                    + "Export it again with", REEXPORT);
}

function parseJSON(url, bytes) {
  try {
    return JSON.parse(new TextDecoder().decode(bytes));   // UTF-8, a byte-order mark dropped, as Response.json()
  } catch (e) {
    throw new Problem(`${url} is damaged (${e.message}). Export the folder again with`, REEXPORT);
  }
}

const getJSON = async (url) => parseJSON(url, await getBytes(url));

// The runtime did not load: from the CDN (offline, or blocked), or from ort/ in the folder (a file missing or
// changed). Either way the fix is the runtime inside the folder, from the .tgz `npm pack` writes.
function runtimeProblem(runtime, cause) {
  const version = /^\d/.test(runtime.version) ? runtime.version : "";
  const tgz = version ? `onnxruntime-web-${version}.tgz` : "onnxruntime-web-VERSION.tgz";
  const fix = `${REEXPORT} --runtime-dir ${tgz}`;
  const after = `(${tgz} is the file \`npm pack onnxruntime-web${version && "@" + version}\` writes. `
                + "The folder then holds the runtime, and the page needs no CDN.)";
  const base = new URL(runtime.base, location.href);
  if (base.origin !== location.origin) {
    return new Problem(`Could not load onnxruntime-web ${runtime.version} from ${base.host}: this computer is `
                       + `offline, or something blocks ${base.host} (a firewall, an ad blocker, the web host's `
                       + "Content-Security-Policy). Put the runtime into the folder: export it again with", fix, after);
  }
  return new Problem(`Could not load onnxruntime-web from ${runtime.base} in this folder (${cause}): a file is `
                     + "missing, or changed since the export. Export it again with", fix, after);
}

function loadScript(src, integrity) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src;
    s.integrity = integrity;
    s.crossOrigin = "anonymous";
    s.onload = resolve;
    s.onerror = () => reject(new Error(`could not load ${src} (offline, or its integrity hash did not match)`));
    document.head.appendChild(s);
  });
}

async function fetchChecked(url, integrity) {
  const r = await fetch(url, { integrity, mode: "cors" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r;
}

async function loadRuntime(runtime) {
  const url = (name) => new URL(name, new URL(runtime.base, location.href)).href;
  const f = runtime.files;
  let loader, binary;
  try {
    await loadScript(url("ort.wasm.min.js"), f["ort.wasm.min.js"]);
    [loader, binary] = await Promise.all([
      fetchChecked(url("ort-wasm-simd-threaded.mjs"), f["ort-wasm-simd-threaded.mjs"]).then((r) => r.text()),
      fetchChecked(url("ort-wasm-simd-threaded.wasm"), f["ort-wasm-simd-threaded.wasm"]).then((r) => r.arrayBuffer()),
    ]);
  } catch (e) {
    throw runtimeProblem(runtime, e.message);
  }
  ort.env.wasm.numThreads = 1;
  ort.env.wasm.wasmBinary = binary;
  ort.env.wasm.wasmPaths = { mjs: URL.createObjectURL(new Blob([loader], { type: "text/javascript" })) };
}

// One token id from the last position's logits: guppy.model.sample, with Math.random as the generator.
export function sample(logits, temperature, topK, topP) {
  const V = logits.length;
  let best = 0;
  for (let i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;   // the first maximum, as torch.argmax
  if (!(temperature > 0)) return best;
  const x = Float64Array.from(logits, (v) => v / temperature);
  if (topK > 0 && topK < V) {
    const kth = Float64Array.from(x).sort().reverse()[topK - 1];
    for (let i = 0; i < V; i++) if (x[i] < kth) x[i] = -Infinity;
  }
  const order = Array.from(x.keys()).sort((a, b) => x[b] - x[a]);
  const probs = softmax(order.map((i) => x[i]));
  if (topP > 0 && topP < 1) {   // keep the smallest prefix of the sorted tokens whose mass reaches top_p
    let cum = 0;
    for (let j = 0; j < V; j++) {
      if (cum >= topP) x[order[j]] = -Infinity;
      cum += probs[j];
    }
  }
  const p = softmax(Array.from(x));
  let r = Math.random(), i = 0;
  for (; i < V - 1; i++) { r -= p[i]; if (r < 0) break; }
  return i;
}

function softmax(values) {
  const m = Math.max(...values.filter((v) => v !== -Infinity));
  const e = values.map((v) => (v === -Infinity ? 0 : Math.exp(v - m)));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

class Model {
  constructor(session, config) {
    this.session = session;
    this.config = config;
    this.headDim = config.d_model / config.n_heads;
  }

  emptyPast() {
    const c = this.config;
    return new ort.Tensor("float32", new Float32Array(0), [c.n_layers, 1, c.n_heads, 0, this.headDim]);
  }

  // New token ids after the prompt, up to and including <|im_end|>; onToken(ids so far) after each.
  async generate(prompt, { maxNewTokens, temperature, topK, topP }, onToken) {
    const V = this.config.vocab_size, out = [];
    let step = prompt, pastK = this.emptyPast(), pastV = this.emptyPast();
    while (out.length < maxNewTokens && prompt.length + out.length < this.config.max_seq_len) {
      const ids = new ort.Tensor("int64", BigInt64Array.from(step, BigInt), [1, step.length]);
      const r = await this.session.run({ input_ids: ids, past_keys: pastK, past_values: pastV });
      const next = sample(r.logits.data.subarray((step.length - 1) * V, step.length * V), temperature, topK, topP);
      pastK = r.present_keys;
      pastV = r.present_values;
      out.push(next);
      if (next === IM_END_ID) break;
      onToken(out);
      step = [next];
    }
    return out;
  }
}

// The fields of a protobuf message in bytes[start, end): {field, wire, body} with body the bytes of a length-delimited
// field (wire type 2); varints (0) and fixed 64/32-bit values (1, 5) are skipped. Enough to walk an ONNX ModelProto.
function* protobufFields(bytes, start = 0, end = bytes.length) {
  let pos = start;
  const varint = () => {
    let value = 0, scale = 1, b;
    do {
      if (pos >= end) throw new Error("the file ends inside a field");
      b = bytes[pos++];
      value += (b & 0x7f) * scale;
      scale *= 128;
    } while (b & 0x80);
    return value;
  };
  while (pos < end) {
    const tag = varint(), field = Math.floor(tag / 8), wire = tag % 8;
    let body = null;
    if (wire === 0) varint();
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      const n = varint();
      body = bytes.subarray(pos, pos + n);
      pos += n;
    } else throw new Error(`wire type ${wire} at byte ${pos}: not a protobuf message`);
    if (pos > end) throw new Error("the file ends inside a field");
    yield { field, wire, body };
  }
}

// model.onnx's metadata_props (ModelProto field 14, each a StringStringEntryProto {key = 1, value = 2}) -> {key: value}:
// what guppy.export.write_metadata stored, and onnxruntime.InferenceSession.get_modelmeta() reads in Python.
export function onnxMetadata(bytes) {
  const utf8 = new TextDecoder(), meta = {};
  for (const f of protobufFields(bytes)) {
    if (f.field !== 14 || f.wire !== 2) continue;
    const entry = { 1: "", 2: "" };
    for (const g of protobufFields(f.body)) if (g.wire === 2 && g.field in entry) entry[g.field] = utf8.decode(g.body);
    meta[entry[1]] = entry[2];
  }
  return meta;
}

// SHA-256 (FIPS 180-4) of bytes, as lowercase hex. K: the first 32 bits of the fractional parts of the cube roots of
// the first 64 primes; the initial hash: the same of the square roots of the first 8. Sums are taken mod 2^32 by the
// Uint32Arrays they are stored in, or by >>> 0.
const SHA256_K = Uint32Array.of(
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
  0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
  0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
  0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
  0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
  0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
  0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
  0xc67178f2);

export function sha256Hex(bytes) {
  const n = bytes.length, padded = new Uint8Array(Math.ceil((n + 9) / 64) * 64);
  padded.set(bytes);
  padded[n] = 0x80;   // a 1 bit after the message, zeros, then its length in bits as a 64-bit big-endian integer
  const view = new DataView(padded.buffer);
  view.setUint32(padded.length - 8, Math.floor(n / 2 ** 29));
  view.setUint32(padded.length - 4, (n * 8) >>> 0);
  const hash = Uint32Array.of(0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                              0x5be0cd19);
  const w = new Uint32Array(64), rotr = (x, r) => (x >>> r) | (x << (32 - r));
  for (let block = 0; block < padded.length; block += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getUint32(block + 4 * i);
    for (let i = 16; i < 64; i++) {
      const s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >>> 3);
      const s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >>> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    let [a, b, c, d, e, f, g, h] = hash;
    for (let i = 0; i < 64; i++) {
      const t1 = (h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + SHA256_K[i] + w[i]) >>> 0;
      const t2 = ((rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) >>> 0;
      [h, g, f, e, d, c, b, a] = [g, f, e, (d + t1) >>> 0, c, b, a, (t1 + t2) >>> 0];
    }
    [a, b, c, d, e, f, g, h].forEach((v, i) => { hash[i] += v; });
  }
  return Array.from(hash, (x) => x.toString(16).padStart(8, "0")).join("");
}

const SHAPE = ["vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "ffn_hidden"];   // guppy/onnx_chat.py's

// config.json and tokenizer.json are the ones model.onnx was exported with, by what its metadata records: the checks
// of guppy/onnx_chat.py (check_config_json, check_export_tokenizer). An export made before guppy recorded them is
// checked by checkModel alone.
function checkExport(modelBytes, config, tokenizerBytes) {
  let meta, recorded;
  try {
    meta = onnxMetadata(modelBytes);
    recorded = meta.guppy_config ? JSON.parse(meta.guppy_config) : null;
  } catch (e) {
    throw new Problem(`model.onnx is damaged (${firstLine(e)}). Export the folder again with`, REEXPORT);
  }
  for (const key of recorded ? SHAPE : []) {
    if (config[key] !== recorded[key]) {
      throw new Problem(`config.json is not this model's: it says ${key} ${JSON.stringify(config[key])}, but `
                        + `model.onnx has ${recorded[key]} (the folder mixes two exports, or it was edited). `
                        + "Export it again with", REEXPORT);
    }
  }
  const want = meta.guppy_tokenizer_sha256;
  if (want && sha256Hex(tokenizerBytes) !== want) {
    throw new Problem("tokenizer.json is not the tokenizer model.onnx was exported with (its sha256 differs from the "
                      + "one in the model's metadata): the folder mixes two exports, or tokenizer.json was replaced, "
                      + "and the replies would be garbage. Export it again with", REEXPORT);
  }
}

// model.onnx, config.json and tokenizer.json belong together (not two exports mixed, nor a config.json edited by
// hand): the graph's input and output names are guppy's, the tokenizer's ids fit the vocabulary, and one call on one
// token, with the cache shapes config.json gives, returns the shapes config.json gives. Checked before "ready":
// otherwise the first reply would fail inside onnxruntime, with only the console saying so.
async function checkModel(session, config, tokenizer) {
  const sorted = (names) => [...names].sort().join(", ");
  if (sorted(session.inputNames) !== sorted(INPUTS) || sorted(session.outputNames) !== sorted(OUTPUTS)) {
    throw new Problem(`model.onnx is not the graph of a guppy export: it takes ${session.inputNames.join(", ")} and `
                      + `gives ${session.outputNames.join(", ")}. Export the folder again with`, REEXPORT);
  }
  const maxId = Math.max(...tokenizer.vocab.values());
  if (!(maxId < config.vocab_size)) {
    throw new Problem(`tokenizer.json has token ids up to ${maxId}, but config.json says the model knows `
                      + `${config.vocab_size} tokens: the folder mixes two exports. Export it again with`, REEXPORT);
  }
  const model = new Model(session, config);
  let r;
  try {
    const ids = new ort.Tensor("int64", BigInt64Array.from([BigInt(IM_START_ID)]), [1, 1]);
    r = await session.run({ input_ids: ids, past_keys: model.emptyPast(), past_values: model.emptyPast() });
  } catch (e) {
    throw new Problem(`model.onnx does not run with the shapes config.json gives (${firstLine(e)}): config.json is `
                      + "not this model's (the folder mixes two exports, or it was edited). Export it again with",
                      REEXPORT);
  }
  const want = { logits: [1, 1, config.vocab_size],
                 present_keys: [config.n_layers, 1, config.n_heads, 1, model.headDim] };
  for (const [name, dims] of Object.entries(want)) {
    if (r[name].dims.join() !== dims.join()) {
      throw new Problem(`model.onnx gives ${name} of shape [${r[name].dims.join(", ")}], but config.json says `
                        + `[${dims.join(", ")}]: config.json is not this model's (the folder mixes two exports, or `
                        + "it was edited). Export it again with", REEXPORT);
    }
  }
  return model;
}

function addMessage(who, text) {
  const div = document.createElement("div");
  div.className = `msg ${who}`;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function settings() {
  return {
    temperature: Number($("temperature").value), topK: Math.trunc(Number($("top-k").value)),
    topP: Number($("top-p").value), maxNewTokens: Math.trunc(Number($("max-new-tokens").value)),
  };
}

async function main() {
  if (document.body.dataset.error) return;   // index.html found the page cannot run here (file://) and said so
  const status = $("status");
  try {
    status.textContent = "loading…";
    const [persona, config, runtime, tokenizerBytes] = await Promise.all(
      [...["persona.json", "config.json", "runtime.json"].map(getJSON), getBytes("tokenizer.json")]);
    const tokenizerJson = parseJSON("tokenizer.json", tokenizerBytes);
    document.title = `${persona.name} · guppy`;
    $("name").textContent = persona.name;
    $("description").textContent = persona.description || "";
    const tokenizer = new ByteLevelBPE(tokenizerJson);
    window.guppy = { tokenizer, persona, config, sha256Hex, onnxMetadata };   // for the console, tests/test_web.py
    status.textContent = `loading onnxruntime-web ${runtime.version}…`;
    await loadRuntime(runtime);
    status.textContent = "loading the model…";
    const modelBytes = await getBytes("model.onnx");
    checkExport(modelBytes, config, tokenizerBytes);
    let session;
    try {
      session = await ort.InferenceSession.create(modelBytes, { executionProviders: ["wasm"] });
    } catch (e) {
      throw new Problem(`onnxruntime-web ${runtime.version} could not load model.onnx (${e.message || e}). `
                        + "Export the folder again with", REEXPORT);
    }
    status.textContent = "checking the model…";
    const model = await checkModel(session, config, tokenizer);
    // what the prompt may use of the context after room for a reply (guppy/chat.py: Chat.max_prompt)
    const maxPrompt = (s) => config.max_seq_len - Math.min(s.maxNewTokens, Math.floor(config.max_seq_len / 2));

    let busy = false;
    async function send(text) {
      text = text.trim();
      if (busy || !text) return;
      busy = true;
      $("send").disabled = true;
      addMessage("you", text);
      const s = settings();
      let ids = tokenizer.encodePrompt(persona.lowercase ? text.toLowerCase() : text);
      if (ids.length > maxPrompt(s)) {
        ids = ids.slice(ids.length - maxPrompt(s));
        addMessage("note", `(your message is longer than the context; only its last ${ids.length} tokens are used)`);
      }
      const bubble = addMessage("bot", "…");
      const t0 = performance.now();
      let out;
      try {
        out = await model.generate(ids, s, (sofar) => { bubble.textContent = tokenizer.decode(sofar); });
      } catch (e) {   // shown in the chat area, the form disabled, the status no longer "ready" (problem())
        bubble.textContent = "(no reply)";
        problem(`The model failed while replying (${firstLine(e)}). Reload the page; if it fails again, export the `
                + "folder again with", REEXPORT);
        return;
      }
      const reply = tokenizer.decode(out.filter((t) => t !== IM_END_ID)).trim();
      bubble.textContent = reply || "(no reply)";
      bubble.dataset.ids = JSON.stringify(out);   // the token ids, for tests/test_web.py
      bubble.dataset.done = "1";
      const ms = performance.now() - t0;
      status.textContent = `${out.length} tokens in ${ms.toFixed(0)} ms (${(ms / Math.max(1, out.length)).toFixed(1)} ms/token)`;
      busy = false;
      $("send").disabled = false;
    }

    for (const p of persona.sample_prompts || []) {
      const b = document.createElement("button");
      b.textContent = p;
      b.onclick = () => send(p);
      $("samples").appendChild(b);
    }
    $("form").onsubmit = (e) => { e.preventDefault(); const t = $("input").value; $("input").value = ""; send(t); };
    $("send").disabled = false;
    status.textContent = `ready: onnxruntime-web ${runtime.version}, WASM`;
    document.body.dataset.ready = "1";
  } catch (e) {
    if (e instanceof Problem) problem(e.message, e.fix, e.after);   // problem(): index.html
    else problem(`The page stopped while starting: ${e.message}. Reload it; if that fails too, export again with`,
                 REEXPORT);
    throw e;
  }
}

main();
