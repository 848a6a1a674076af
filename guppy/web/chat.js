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

async function getJSON(url) {
  let r;
  try {
    r = await fetch(url);
  } catch (e) {
    throw new Problem(`Could not fetch ${url} (${e.message}): the server that served this page has stopped. `
                      + "Start it again with", "guppy serve DIR");
  }
  if (!r.ok) {
    throw new Problem(`${url} is not here (HTTP ${r.status}): this folder is not a complete guppy export. `
                      + "Export it again with", REEXPORT);
  }
  try {
    return await r.json();
  } catch (e) {
    throw new Problem(`${url} is damaged (${e.message}). Export the folder again with`, REEXPORT);
  }
}

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
    const [persona, config, tokenizerJson, runtime] = await Promise.all(
      ["persona.json", "config.json", "tokenizer.json", "runtime.json"].map(getJSON));
    document.title = `${persona.name} · guppy`;
    $("name").textContent = persona.name;
    $("description").textContent = persona.description || "";
    const tokenizer = new ByteLevelBPE(tokenizerJson);
    window.guppy = { tokenizer, persona, config };   // for the console, and tests/test_web.py
    status.textContent = `loading onnxruntime-web ${runtime.version}…`;
    await loadRuntime(runtime);
    status.textContent = "loading the model…";
    let session;
    try {
      session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
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
