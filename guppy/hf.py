"""A guppy as a Hugging Face transformers model: `guppy export --format hf` writes it, `guppy chat/eval` read it back.

GuppyLM is GPT-2 with two settings changed: the FFN's activation, ReLU (GPT-2: GELU), and its width, 768 for
guppy-9m (GPT-2: 4 x d_model). Everything else is GPT-2's: pre-norm blocks, learned positions, one fused qkv
projection with bias, a final LayerNorm, the LM head tied to the token embedding, attention scaled by
1/sqrt(head_dim) and nothing else. So the folder is a plain `GPT2LMHeadModel`
(`GPT2Config(activation_function="relu", n_inner=ffn_hidden)`) that any tool built on transformers loads with
`AutoModelForCausalLM.from_pretrained(DIR)`, no trust_remote_code, and that gives guppy's logits.

    guppy (guppy/model.py)           transformers GPT2LMHeadModel
    tok_emb.weight                   transformer.wte.weight        (lm_head.weight is tied to it; stored once)
    pos_emb.weight                   transformer.wpe.weight
    blocks.{i}.norm1.{weight,bias}   transformer.h.{i}.ln_1
    blocks.{i}.attn.qkv              transformer.h.{i}.attn.c_attn   q, k, v in the same order: [q | k | v], heads
    blocks.{i}.attn.out              transformer.h.{i}.attn.c_proj   inside each, as guppy's view(B, T, 3, H, D)
    blocks.{i}.norm2                 transformer.h.{i}.ln_2
    blocks.{i}.ffn.up                transformer.h.{i}.mlp.c_fc
    blocks.{i}.ffn.down              transformer.h.{i}.mlp.c_proj
    norm                             transformer.ln_f
GPT-2's projections are `Conv1D`s, which keep their weight as (in, out), the transpose of nn.Linear's (out, in).
Biases and LayerNorms map as they are. The config: n_embd = d_model, n_layer, n_head, n_inner = ffn_hidden,
n_positions = n_ctx = max_seq_len, layer_norm_epsilon, every dropout 0 (inference), and the ids of guppy's
tokenizer: bos <|im_start|> = 1, eos <|im_end|> = 2, pad <pad> = 0.

The folder:
    config.json              GPT2Config
    model.safetensors        float32 weights under GPT-2's names
    generation_config.json   `guppy chat`'s sampling (temperature, top_k, top_p), eos = <|im_end|>; replies of at most
                             half the context, so that prompt + reply stay within the learned positions
    tokenizer.json           the run's byte-level BPE, plus the normalizer below
    tokenizer_config.json    PreTrainedTokenizerFast: special tokens, the ChatML chat template, left truncation
    special_tokens_map.json  for tools that read it instead of tokenizer_config.json
    persona.json             name, description, lowercase rule, sample prompts (as the ONNX export has it)
    README.md                the model card, with hub front matter and a transformers snippet

The chat template gives exactly the ids `guppy chat` feeds the model (guppy.chat.encode_prompt_ids):
`<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n`, the user's text stripped and, where the persona says
so, lowercased (Jinja `trim | lower`). One thing a template cannot do by itself: guppy encodes a typed "<|im_end|>"
in the user's text as the characters it is (so a user cannot forge a turn), while transformers tokenizes the
rendered string with special-token matching on, which would make it the control token. Matching is all or nothing
per call (`split_special_tokens` would split the template's own tokens too), so the template escapes instead: in
every message's content it doubles U+FDD0 and writes U+FDD0 after every "<". No special token (all begin with "<")
can then match inside content, and the tokenizer's normalizer, which runs on the text between special tokens after
they are matched, undoes the escape ("<"+U+FDD0 -> "<", then U+FDD0 U+FDD0 -> U+FDD0) before BPE sees it. Text is
thus encoded as guppy encodes it, for every string. U+FDD0 is a Unicode noncharacter, reserved for a program's
internal use; the only visible trace is that a plain `tokenizer(text)` (no template), and guppy chat reading this
folder's tokenizer.json, read "<"+U+FDD0 as "<" and a doubled U+FDD0 as one.

System messages render as ChatML system turns (`<|im_start|>system\\n...<|im_end|>`), as `guppy prepare` keeps them
from a `messages` dataset; guppy's own chat sends none, and a guppy trained on persona data has never seen one.
A prompt longer than the context: `guppy chat` keeps its last tokens; the tokenizer truncates from the left too, so
`apply_chat_template(..., truncation=True, max_length=n)` cuts as guppy does.

Reading back (`guppy.checkpoint.load_model` on a folder whose config.json has a model_type) maps the names the other
way and refuses, in one line, anything that is not such a folder: another model type or architecture, another
activation, a GPT-2 setting guppy has no equivalent for, a missing file, a tensor missing or of the wrong shape.
Reading needs safetensors only; writing checks the folder in transformers, so it needs `pip install 'guppy[hf]'`.
"""
from __future__ import annotations

import datetime
import json
import os

import torch

from .errors import GuppyError, one_line

FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "persona.json", "README.md")
NEEDED = ("config.json", "model.safetensors", "tokenizer.json")  # what reading the folder back needs
ESCAPE = "\ufdd0"  # a Unicode noncharacter: see the header
# guppy chat's sampling defaults (guppy.chat.Chat's; tests/test_hf.py checks they are the same). Not imported from
# there: chat -> checkpoint -> hf would make an import cycle.
CHAT_DEFAULTS = {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "max_new_tokens": 64}
# guppy name suffix -> (GPT-2 name suffix, transposed): per block, then the model-level tensors
BLOCK = {"norm1.weight": ("ln_1.weight", False), "norm1.bias": ("ln_1.bias", False),
         "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
         "attn.out.weight": ("attn.c_proj.weight", True), "attn.out.bias": ("attn.c_proj.bias", False),
         "norm2.weight": ("ln_2.weight", False), "norm2.bias": ("ln_2.bias", False),
         "ffn.up.weight": ("mlp.c_fc.weight", True), "ffn.up.bias": ("mlp.c_fc.bias", False),
         "ffn.down.weight": ("mlp.c_proj.weight", True), "ffn.down.bias": ("mlp.c_proj.bias", False)}
TOP = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
       "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias"}


def require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise GuppyError("transformers not installed; pip install 'guppy[hf]' (or: pip install transformers)") \
            from None


def name_map(n_layers: int) -> dict[str, tuple[str, bool]]:
    """guppy tensor name -> (GPT-2 tensor name, stored transposed)."""
    names = {g: (h, False) for g, h in TOP.items()}
    for i in range(n_layers):
        names.update({f"blocks.{i}.{g}": (f"transformer.h.{i}.{h}", t) for g, (h, t) in BLOCK.items()})
    return names


def to_gpt2(state_dict: dict, n_layers: int) -> dict:
    """guppy's state dict -> GPT-2's tensors (without the tied lm_head.weight, as save_pretrained writes them)."""
    return {h: (state_dict[g].t() if t else state_dict[g]).detach().float().cpu().contiguous()
            for g, (h, t) in name_map(n_layers).items()}


def gpt2_config(cfg) -> dict:
    """config.json for a guppy ModelConfig. Every GPT-2 setting that changes the arithmetic is written out, so
    that no default of some transformers version decides it."""
    from .data import IM_END_ID, IM_START_ID, PAD_ID

    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_hidden,
            "activation_function": "relu", "layer_norm_epsilon": cfg.layer_norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # a model to run; fine-tuning may set them
            "scale_attn_weights": True,                 # q.k / sqrt(head_dim), as guppy's attention
            "scale_attn_by_inverse_layer_idx": False,   # and no further 1/(layer+1)
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
            "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": IM_START_ID, "eos_token_id": IM_END_ID, "pad_token_id": PAD_ID,
            # transformers 4.x's text-generation pipeline puts its own 256 new tokens above generation_config.json's
            # length, which would run past the learned positions; it does read this (5.x reads the generation config)
            "task_specific_params": {"text-generation": {"max_new_tokens": generation_config(cfg)["max_new_tokens"]}}}


def generation_config(cfg) -> dict:
    from .data import IM_END_ID, IM_START_ID, PAD_ID

    d = CHAT_DEFAULTS
    # guppy chat keeps prompt + reply inside the context by cutting the prompt to max_seq_len - min(new, half);
    # GPT-2's learned positions end at n_positions, so the reply is capped at half the context here
    return {"do_sample": True, "temperature": d["temperature"], "top_k": d["top_k"], "top_p": d["top_p"],
            "max_new_tokens": min(d["max_new_tokens"], cfg.max_seq_len // 2),
            "bos_token_id": IM_START_ID, "eos_token_id": IM_END_ID, "pad_token_id": PAD_ID}


def chat_template(lowercase: bool) -> str:
    """ChatML, as guppy encodes it (see the header): a newline between turns, none after the last."""
    user = "text | trim | lower" if lowercase else "text | trim"
    return ("{%- for message in messages -%}"
            "{%- set text = message['content'] -%}"
            f"{{%- if message['role'] == 'user' -%}}{{%- set text = {user} -%}}{{%- endif -%}}"
            # the escape that keeps typed control tokens text; the normalizer in tokenizer.json undoes it
            "{%- set text = text | replace('\\ufdd0', '\\ufdd0\\ufdd0') | replace('<', '<\\ufdd0') -%}"
            "{{- '<|im_start|>' + message['role'] + '\\n' + text + '<|im_end|>' -}}"
            "{%- if not loop.last or add_generation_prompt -%}{{- '\\n' -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def hf_tokenizer_json(tokenizer_path: str) -> str:
    """The run's tokenizer with the normalizer that undoes the template's escape (guppy's has no normalizer)."""
    from tokenizers import normalizers

    from .data import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    before = json.loads(tok.to_str())["normalizer"]
    tok.normalizer = normalizers.Sequence([normalizers.Replace("<" + ESCAPE, "<"),
                                           normalizers.Replace(ESCAPE * 2, ESCAPE)])
    if before is not None and before != json.loads(tok.to_str())["normalizer"]:  # ours: an hf folder exported again
        raise GuppyError(f"{tokenizer_path}: has a normalizer of its own; guppy's tokenizers have none")
    return tok.to_str(pretty=True)


def tokenizer_config(cfg, card: dict) -> dict:
    from .data import IM_END, IM_START, PAD

    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": IM_START, "eos_token": IM_END,
            "pad_token": PAD, "model_max_length": cfg.max_seq_len,
            "truncation_side": "left",  # as guppy chat cuts a long prompt: its oldest tokens go
            # a batch of prompts for generate(), which derives positions from the attention mask (a plain forward
            # on a left-padded batch does not: pad on the right there, or pass position_ids)
            "padding_side": "left",
            "clean_up_tokenization_spaces": False,  # decode as tokenizers does, as guppy does
            # no token_type_ids: GPT-2 would add wte(token_type_ids), i.e. <pad>'s embedding, to every position
            # (transformers 4.x's PreTrainedTokenizerFast returns them unless told)
            "model_input_names": ["input_ids", "attention_mask"],
            "chat_template": chat_template(bool(card.get("lowercase")))}


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------
def write_hf_folder(model, tokenizer_path: str, card: dict, out_dir: str, checkpoint: str = "", license: str = "mit",
                    log=print, dataset: str | None = None) -> dict:
    """Write the transformers folder of `model` (a GuppyLM) into out_dir (export() gives it a new folder, which it
    swaps into place), then load it in transformers and check that it gives guppy's logits.
    Returns what the export reports."""
    from safetensors.torch import save_file

    require_transformers()
    cfg = model.config

    def write_json(name, obj):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")

    log(f"exporting {checkpoint or 'the model'} as a transformers GPT-2 folder")
    write_json("config.json", gpt2_config(cfg))
    save_file(to_gpt2(model.state_dict(), cfg.n_layers), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})  # transformers refuses a safetensors file without this
    write_json("generation_config.json", generation_config(cfg))
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(hf_tokenizer_json(tokenizer_path))
    tok_cfg = tokenizer_config(cfg, card)
    write_json("tokenizer_config.json", tok_cfg)
    write_json("special_tokens_map.json", {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token")})
    write_json("persona.json", card)
    report = {"checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "format": "hf", "license": license,
              "dataset": dataset, "model_bytes": os.path.getsize(os.path.join(out_dir, "model.safetensors"))}
    report["max_abs_logit_diff"] = check_in_transformers(model, out_dir)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(model, card, checkpoint, report))
    return report


def check_in_transformers(model, folder: str, tolerance: float = 1e-3) -> float:
    """Load the folder as transformers does and compare its logits with guppy's on a right-padded batch: the max
    absolute difference (fp32 gives ~1e-6). A transformers that reads the config another way fails here, not
    later in someone's pipeline."""
    import transformers
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its notes and its progress bar are about loading, not about this export
    hf_logging.disable_progress_bar()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    except Exception as e:  # anything transformers cannot load is the export's fault, or this transformers'
        raise GuppyError(f"{folder}: transformers {transformers.__version__} cannot load the exported folder "
                         f"({one_line(e)[:200]}); please report this") from None
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    T = min(16, cfg.max_seq_len)
    idx = torch.randint(3, cfg.vocab_size, (2, T), generator=g)
    mask = torch.ones_like(idx)
    mask[1, T // 2:] = 0  # the second row is right-padded
    with torch.no_grad():
        want = model(idx.to(next(model.parameters()).device))[0].float().cpu()
        got = hf(input_ids=idx, attention_mask=mask).logits
    diff = float((got - want)[mask.bool()].abs().max())
    if not diff <= tolerance:
        raise GuppyError(f"{folder}: transformers {transformers.__version__} gives logits {diff:.3g} away from "
                         "guppy's on the exported folder; please report this")
    return diff


def front_matter(report: dict, library_name: str, tags: list[str]) -> list[str]:
    """The YAML block a model hub reads at the top of README.md (both export formats' cards): license, library,
    pipeline, tags, and the dataset when the export was told it (--dataset)."""
    lines = ["---", f"license: {report.get('license', 'mit')}", f"library_name: {library_name}",
             "pipeline_tag: text-generation", f"tags: [{', '.join(tags)}]"]
    if report.get("dataset"):  # the hub links the model to its data
        lines += [f"datasets: [{report['dataset']}]"]
    return lines + ["---", ""]


def model_card(model, card: dict, checkpoint: str, report: dict) -> str:
    """README.md: the model card a hub shows, with a snippet that runs as written in the folder."""
    import transformers

    cfg, name = model.config, card["name"]
    prompt = (card.get("sample_prompts") or ["hello"])[0]
    lines = front_matter(report, "transformers", ["guppy", "gpt2", "tiny", "chatml", "text-generation"]) + [
        f"# {name}", ""]
    if card.get("description"):
        lines += [f"{card['description']}.", ""]
    lines += [
        f"A {model.num_params() / 1e6:.1f}M-parameter language model trained from scratch with guppy to talk as "
        "this character. It is a plain GPT-2 (`GPT2LMHeadModel`, ReLU feed-forward): transformers and the tools "
        "built on it load it as it is, without `trust_remote_code`.", "",
        "## Use it", "",
        "In this folder (or with the hub id in place of `\".\"` once uploaded), `pip install transformers torch`:",
        "", "```python", python_snippet(prompt), "```", "",
        "Sampling follows `generation_config.json` (guppy chat's defaults: temperature "
        f"{CHAT_DEFAULTS['temperature']}, top-k {CHAT_DEFAULTS['top_k']}, top-p {CHAT_DEFAULTS['top_p']}); "
        "`do_sample=False` is greedy and gives `guppy chat --temperature 0`'s reply token for token. "
        "The chat template writes the prompt exactly as guppy does: ChatML, "
        "`<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n`"
        + (", the user's text lowercased" if card.get("lowercase") else "")
        + "; control tokens typed in a message stay text. With guppy: `guppy chat --checkpoint .`.", "",
        "Upload: `huggingface-cli upload USER/NAME . .` in this folder (or "
        "`huggingface_hub.HfApi().upload_folder(repo_id=\"USER/NAME\", folder_path=\".\")`).", "",
        "## Architecture", "",
        f"GuppyLM's: a pre-norm transformer, {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads of "
        f"{cfg.head_dim}, ReLU feed-forward {cfg.ffn_hidden}, LayerNorm, learned positions, LM head tied to the "
        f"embedding; vocabulary {cfg.vocab_size} (byte-level BPE: `<pad>`=0, `<|im_start|>`=1, `<|im_end|>`=2), "
        f"context {cfg.max_seq_len} tokens; {model.num_params():,} parameters. That is GPT-2 with "
        f"`activation_function=\"relu\"` and `n_inner={cfg.ffn_hidden}`.", "",
        "## Training", ""]
    state = _training_state(checkpoint)
    if state:
        tc = state.get("train_config")
        recipe = (f": optimizer {tc.get('optimizer', 'adamw')}, batch {tc.get('batch_size')}, peak lr {tc.get('lr')}, "
                  f"loss on {tc.get('loss_on', 'all')} tokens" if isinstance(tc, dict) else "")
        lines += [f"Trained with guppy; these are the weights of step {state.get('step', 0):,}{recipe}.", ""]
        best = state.get("extra", {}).get("best_eval")
        if best is not None and best != float("inf"):
            lines += [f"Best held-out loss during training: {best:.4f} (per token).", ""]
    else:
        lines += ["A GuppyLM checkpoint (no guppy training record).", ""]
    lines += [(f"Data: synthetic conversations sampled from the persona file of `{name}` (`guppy prepare`)."
               if card.get("sample_prompts") else "Data: not recorded in the run."), "",
              "## Export", "",
              f"Exported {datetime.date.today().isoformat()} with guppy (`guppy export --format hf`), checked in "
              f"transformers {transformers.__version__}: its logits are guppy's within "
              f"{report['max_abs_logit_diff']:.1e}.", "",
              "## License", "",
              f"{report.get('license', 'mit')}, as chosen at export (guppy itself is MIT)."]
    return "\n".join(lines) + "\n"


def _training_state(checkpoint: str) -> dict | None:
    """state.json of a guppy checkpoint folder (None for a .pt file, a transformers folder, or a damaged one)."""
    if not checkpoint or not os.path.isdir(checkpoint):
        return None
    try:
        with open(os.path.join(checkpoint, "state.json"), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def python_snippet(prompt: str) -> str:
    """The card's transformers example, run in the folder (tests/test_hf.py runs it as the card prints it)."""
    return "\n".join([
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained(".")',
        'model = AutoModelForCausalLM.from_pretrained(".")',
        f'messages = [{{"role": "user", "content": {json.dumps(prompt, ensure_ascii=False)}}}]',
        "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "out = model.generate(**inputs, do_sample=False)  # greedy; leave out do_sample for the chat's sampling",
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())'])


# --------------------------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------------------------
def is_hf_folder(path: str) -> bool:
    """A folder whose config.json names a transformers model_type (guppy's own config.json has none)."""
    p = os.path.join(path, "config.json")
    if not os.path.isfile(p):
        return False
    try:
        with open(p, encoding="utf-8") as f:
            raw = json.load(f)
        return isinstance(raw, dict) and "model_type" in raw
    except (OSError, ValueError, TypeError):
        return False


def guppy_shapes(cfg) -> dict[str, tuple]:
    """The shape of every guppy tensor (nn.Linear weights as (out, in)) for a ModelConfig."""
    d, f, V, L = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.max_seq_len
    block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
             "attn.out.weight": (d, d), "attn.out.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,),
             "ffn.up.weight": (f, d), "ffn.up.bias": (f,), "ffn.down.weight": (d, f), "ffn.down.bias": (d,)}
    shapes = {"tok_emb.weight": (V, d), "pos_emb.weight": (L, d), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(cfg.n_layers):
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


# GPT-2 settings that change the arithmetic: the value guppy's model computes with (GPT2Config's defaults)
_SAME_AS_GUPPY = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                  "tie_word_embeddings": True}


def model_config(folder: str, raw: dict):
    """The ModelConfig of a transformers GPT-2 folder with guppy's architecture (`raw`: its config.json). One line
    (GuppyError) for anything guppy cannot run as it is: another model, a setting guppy has no equivalent for, a
    missing file."""
    from .config import ModelConfig
    from .errors import ConfigError

    cfg_path = os.path.join(folder, "config.json")
    if not isinstance(raw, dict):
        raise GuppyError(f"{cfg_path}: expected a JSON object")
    what = "guppy reads the GPT-2 folders `guppy export --format hf` writes"
    if raw.get("model_type") != "gpt2":
        raise GuppyError(f"{cfg_path}: model_type {raw.get('model_type')!r}, not gpt2; {what}")
    archs = raw.get("architectures") or ["GPT2LMHeadModel"]
    if archs != ["GPT2LMHeadModel"]:
        raise GuppyError(f"{cfg_path}: architectures {archs}, not [\"GPT2LMHeadModel\"]; {what}")
    act = raw.get("activation_function", "gelu_new")
    if act != "relu":
        raise GuppyError(f"{cfg_path}: activation_function {act!r}; a guppy is GPT-2 with \"relu\", so this is "
                         "another model")
    for key, want in _SAME_AS_GUPPY.items():
        if raw.get(key, want) != want:
            raise GuppyError(f"{cfg_path}: {key} is {raw[key]!r}; guppy's architecture has {json.dumps(want)}")
    missing = [n for n in NEEDED if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise GuppyError(f"{folder}: incomplete transformers folder, {', '.join(missing)} missing")
    try:
        n_embd = raw.get("n_embd", 768)
        cfg = ModelConfig(vocab_size=raw.get("vocab_size", 50257), max_seq_len=raw.get("n_positions", 1024),
                          d_model=n_embd, n_layers=raw.get("n_layer", 12), n_heads=raw.get("n_head", 12),
                          ffn_hidden=raw.get("n_inner") or 4 * n_embd, dropout=0.0,
                          layer_norm_eps=raw.get("layer_norm_epsilon", 1e-5))
    except (ConfigError, TypeError) as e:
        raise GuppyError(f"{cfg_path}: {e}") from None
    return cfg


def from_gpt2(tensors: dict, cfg, where: str) -> dict:
    """GPT-2's tensors (model.safetensors at `where`) -> guppy's state dict, without the tied lm_head.weight.
    One line for a tensor missing, of the wrong shape, or not guppy's."""
    # save_pretrained writes "transformer.*"; a bare GPT2Model (and the original gpt2 files) write no prefix
    tensors = {(k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"): v
               for k, v in tensors.items()}
    shapes = guppy_shapes(cfg)  # from the config, not a model: a config that lies is refused before anything is built
    sd = {}
    for g, (h, t) in name_map(cfg.n_layers).items():
        if h not in tensors:
            raise GuppyError(f"{where}: tensor {h} is missing")
        v = tensors.pop(h)
        want = shapes[g][::-1] if t else shapes[g]
        if tuple(v.shape) != want:
            raise GuppyError(f"{where}: tensor {h} has shape {tuple(v.shape)}, config.json needs {want}")
        sd[g] = v.t().contiguous() if t else v
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, sd["tok_emb.weight"]):
        raise GuppyError(f"{where}: lm_head.weight differs from transformer.wte.weight; a guppy's head is tied")
    # the causal-mask buffers older transformers saved are not weights
    extra = [k for k in tensors if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if extra:
        raise GuppyError(f"{where}: unexpected tensor {extra[0]} (weights of another model?)")
    return sd

