// guppy's tokenizer in the browser: byte-level BPE read from the tokenizer.json that `guppy prepare` trained with
// Hugging Face `tokenizers` (guppy/data.py: train_tokenizer). Same ids as the Python tokenizer (tests/test_web.py
// checks a few hundred strings, unicode and emoji included, in Chromium).
//
// Why written here rather than taken from a package: the one maintained JS port of `tokenizers`
// (@huggingface/transformers) is a multi-megabyte bundle whose tokenizer cannot be loaded without the rest, and it
// would need a build step or a second CDN dependency. guppy's tokenizer is one fixed configuration (no normalizer,
// ByteLevel pre-tokenizer without prefix space, BPE without dropout, unknown token or word suffixes), which is ~100
// lines; the constructor refuses any other configuration rather than encode it wrongly.
//
// Encoding, as `tokenizers` does it for text without special tokens:
//  1. split the text with GPT-2's pattern (contractions, letters, digits, other symbols, whitespace runs; an optional
//     leading space sticks to the word after it),
//  2. map each piece's UTF-8 bytes to printable characters (GPT-2's bytes_to_unicode table),
//  3. apply the learned merges, lowest rank first, to each piece; every remaining symbol is a vocabulary entry.
// `encode` never produces a special token: <|im_start|> and <|im_end|> come from the chat template only
// (`encodePrompt`), so text that a user types cannot forge a turn (as guppy/chat.py: encode_prompt_ids).

// Unicode White_Space, what the Rust regex engine behind `tokenizers` means by \s. JavaScript's \s differs
// (it takes U+FEFF and leaves out U+0085), so the pattern spells the class out.
const WS = "\\t\\n\\v\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const PATTERN = new RegExp(
  `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${WS}\\p{L}\\p{N}]+|[${WS}]+(?![^${WS}])|[${WS}]+`, "gu");

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
function byteTable() {
  const bytes = [];
  for (let b = 0x21; b <= 0x7e; b++) bytes.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bytes.push(b);
  for (let b = 0xae; b <= 0xff; b++) bytes.push(b);
  const chars = bytes.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) { bytes.push(b); chars.push(256 + n); n++; }
  }
  const toChar = new Array(256), toByte = new Map();
  bytes.forEach((b, i) => { toChar[b] = String.fromCharCode(chars[i]); toByte.set(String.fromCharCode(chars[i]), b); });
  return { toChar, toByte };
}
const BYTES = byteTable();

export const IM_START_ID = 1, IM_END_ID = 2;

export class ByteLevelBPE {
  constructor(json) {
    const model = json.model || {};
    const pre = json.pre_tokenizer || {};
    const problems = [];
    if (model.type !== "BPE") problems.push(`model ${model.type}`);
    if (json.normalizer) problems.push("a normalizer");
    if (pre.type !== "ByteLevel" || pre.add_prefix_space || pre.use_regex === false) problems.push("pre-tokenizer");
    if (model.dropout || model.continuing_subword_prefix || model.end_of_word_suffix || model.byte_fallback)
      problems.push("BPE options");
    if (problems.length) throw new Error(`tokenizer.json: not guppy's byte-level BPE (${problems.join(", ")})`);
    this.vocab = new Map(Object.entries(model.vocab));
    this.ignoreMerges = !!model.ignore_merges;
    this.ranks = new Map();
    model.merges.forEach((m, i) => {
      const [a, b] = typeof m === "string" ? m.split(" ") : m;   // "a b" (older files) or ["a", "b"]
      this.ranks.set(a + " " + b, i);
    });
    this.idToToken = new Map();
    for (const [tok, id] of this.vocab) this.idToToken.set(id, tok);
    this.special = new Set();
    for (const t of json.added_tokens || []) {
      this.idToToken.set(t.id, t.content);
      if (t.special) this.special.add(t.id);
    }
    if (this.idToToken.get(IM_START_ID) !== "<|im_start|>" || this.idToToken.get(IM_END_ID) !== "<|im_end|>")
      throw new Error("tokenizer.json: <|im_start|> and <|im_end|> must have ids 1 and 2");
    this.cache = new Map();
  }

  // Apply the merges to one piece (already in byte characters); returns its symbols.
  bpe(word) {
    if (this.cache.has(word)) return this.cache.get(word);
    let symbols = Array.from(word);
    if (!(this.ignoreMerges && this.vocab.has(word))) {
      while (symbols.length > 1) {
        let best = Infinity, pair = null;
        for (let i = 0; i + 1 < symbols.length; i++) {
          const r = this.ranks.get(symbols[i] + " " + symbols[i + 1]);
          if (r !== undefined && r < best) { best = r; pair = [symbols[i], symbols[i + 1]]; }
        }
        if (pair === null) break;
        const merged = [];   // every non-overlapping occurrence of the pair, left to right
        for (let i = 0; i < symbols.length; i++) {
          if (i + 1 < symbols.length && symbols[i] === pair[0] && symbols[i + 1] === pair[1]) {
            merged.push(pair[0] + pair[1]);
            i++;
          } else merged.push(symbols[i]);
        }
        symbols = merged;
      }
    } else symbols = [word];
    this.cache.set(word, symbols);
    return symbols;
  }

  // Plain text -> ids (special-token strings in it are encoded as the characters they are).
  encode(text) {
    const ids = [];
    const utf8 = new TextEncoder();
    for (const match of text.matchAll(PATTERN)) {
      const word = Array.from(utf8.encode(match[0]), (b) => BYTES.toChar[b]).join("");
      for (const sym of this.bpe(word)) {
        const id = this.vocab.get(sym);
        if (id === undefined) throw new Error(`tokenizer: no id for symbol ${JSON.stringify(sym)}`);
        ids.push(id);
      }
    }
    return ids;
  }

  // The ChatML prompt of one user message, as guppy/chat.py: encode_prompt_ids builds it.
  encodePrompt(user) {
    return [IM_START_ID, ...this.encode(`user\n${user}`), IM_END_ID, ...this.encode("\n"), IM_START_ID,
            ...this.encode("assistant\n")];
  }

  // ids -> text; special tokens are skipped and broken UTF-8 becomes U+FFFD, as tokenizers' decode does.
  decode(ids) {
    const bytes = [];
    for (const id of ids) {
      if (this.special.has(id)) continue;
      for (const ch of this.idToToken.get(id) ?? "") {
        const b = BYTES.toByte.get(ch);
        if (b !== undefined) bytes.push(b);
      }
    }
    return new TextDecoder("utf-8").decode(new Uint8Array(bytes));
  }
}
