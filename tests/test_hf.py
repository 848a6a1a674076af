"""guppy export --format hf: the folder transformers loads as a GPT-2, against guppy itself, offline.

One tiny run (tests/tiny_export.py: an untrained model with wide weights, whose greedy replies are long and arbitrary,
so that any difference in weights, positions, tokenizer or template changes them) is exported once; transformers is
imported once. Checked: logits (right-padded batch with attention_mask, single prompt), greedy `generate` and the
text-generation pipeline against `guppy chat --temperature 0` token for token, the chat template's ids against
guppy's prompt ids over 100+ prompts (unicode, emoji, typed control tokens, long prompts cut as guppy cuts them), the
round trip guppy -> folder -> guppy (bitwise), the model card's snippet as written, and every refusal in one line.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_export import PROMPTS, make_run  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network; set before transformers loads
transformers = pytest.importorskip("transformers", reason="pip install 'guppy[hf]'")

from guppy.chat import Chat, encode_prompt_ids  # noqa: E402
from guppy.checkpoint import load_model  # noqa: E402
from guppy.errors import GuppyError  # noqa: E402
from guppy.export import export  # noqa: E402
from guppy.hf import CHAT_DEFAULTS, ESCAPE, chat_template  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hf"))
    data, run = make_run(root)
    hf = os.path.join(root, "hf")
    report = export(run, hf, format="hf", dataset="arman-bd/guppylm-60k-generic", log=lambda *a: None)
    return {"root": root, "data": data, "run": run, "hf": hf, "report": report}


@pytest.fixture(scope="module")
def hf_model(folders):
    return transformers.AutoModelForCausalLM.from_pretrained(folders["hf"]).eval()


@pytest.fixture(scope="module")
def hf_tok(folders):
    return transformers.AutoTokenizer.from_pretrained(folders["hf"])


@pytest.fixture(scope="module")
def chat(folders):
    """guppy chat --temperature 0 on the run, with the reply length the folder's generation_config.json has."""
    with open(os.path.join(folders["hf"], "generation_config.json")) as f:
        new = json.load(f)["max_new_tokens"]
    return Chat(folders["run"], temperature=0.0, max_new_tokens=new)


def template_ids(tok, text: str, **kw) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_dict=True, **kw)["input_ids"]


# --------------------------------------------------------------------------------------------------------------------
# the folder

def test_the_folder_is_a_gpt2_with_relu(folders):
    hf = folders["hf"]
    from guppy.hf import FILES

    assert set(FILES) <= set(os.listdir(hf))  # and export's manifest
    cfg = transformers.AutoConfig.from_pretrained(hf)
    model, _ = load_model(folders["run"])
    g = model.config
    assert type(cfg).__name__ == "GPT2Config" and cfg.architectures == ["GPT2LMHeadModel"]
    assert (cfg.activation_function, cfg.n_inner, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size) == \
        ("relu", g.ffn_hidden, g.d_model, g.n_layers, g.n_heads, g.vocab_size)
    assert cfg.n_positions == g.max_seq_len and cfg.layer_norm_epsilon == g.layer_norm_eps
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert cfg.scale_attn_weights and not cfg.scale_attn_by_inverse_layer_idx and cfg.tie_word_embeddings
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    gen = transformers.GenerationConfig.from_pretrained(hf)
    chat_defaults = {k: v.default for k, v in inspect.signature(Chat.__init__).parameters.items() if k in CHAT_DEFAULTS}
    assert CHAT_DEFAULTS == chat_defaults  # hf.py's copy of guppy chat's sampling defaults
    assert gen.do_sample and (gen.temperature, gen.top_k, gen.top_p) == (0.7, 50, 0.9)
    assert (gen.eos_token_id, gen.pad_token_id) == (2, 0)
    assert gen.max_new_tokens == min(64, g.max_seq_len // 2) == \
        cfg.task_specific_params["text-generation"]["max_new_tokens"]  # what transformers 4.x's pipeline reads
    assert folders["report"]["max_abs_logit_diff"] < 1e-4


def test_weights_are_stored_under_gpt2_names_transposed_as_conv1d(folders):
    from safetensors.torch import load_file

    t = load_file(os.path.join(folders["hf"], "model.safetensors"))
    model, _ = load_model(folders["run"])
    sd = model.state_dict()
    assert "lm_head.weight" not in t  # tied, stored once
    assert torch.equal(t["transformer.wte.weight"], sd["tok_emb.weight"])
    assert torch.equal(t["transformer.h.1.attn.c_attn.weight"], sd["blocks.1.attn.qkv.weight"].t())
    assert torch.equal(t["transformer.h.0.mlp.c_proj.weight"], sd["blocks.0.ffn.down.weight"].t())
    assert torch.equal(t["transformer.ln_f.bias"], sd["norm.bias"])


# --------------------------------------------------------------------------------------------------------------------
# the model: logits and replies

@pytest.mark.parametrize("attention", ["eager", "default"])
def test_logits_equal_guppys(folders, chat, hf_model, attention):
    """eager attention is guppy's reference attention op for op (exactly equal here); the default (sdpa) sums in
    another order: within 1e-5 of the logits' scale."""
    model = hf_model if attention == "default" else \
        transformers.AutoModelForCausalLM.from_pretrained(folders["hf"], attn_implementation="eager").eval()
    guppy, _ = load_model(folders["run"])
    guppy.eval()
    prompts = [chat.encode_prompt(p)[0] for p in PROMPTS]
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)  # right-padded with <pad>
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = torch.tensor(p), 1
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        single = model(input_ids=ids[:1, :len(prompts[0])]).logits[0]
        want = [guppy(torch.tensor([p]))[0][0] for p in prompts]
    scale = max(1.0, max(float(w.abs().max()) for w in want))
    tol = 1e-5 if attention == "eager" else 1e-5 * scale
    for i, p in enumerate(prompts):
        assert float((got[i, :len(p)] - want[i]).abs().max()) <= tol, PROMPTS[i]
    assert float((single - want[0]).abs().max()) <= tol


def test_greedy_generate_and_pipeline_reply_as_guppy_chat(chat, hf_model, hf_tok):
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tok)
    for prompt in PROMPTS + ["hi guppy what is the water like today"]:
        ids, _ = chat.encode_prompt(prompt)
        want = chat.generate(ids)
        assert len(want) > 5, "the tiny model should say something"
        inputs = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        assert inputs["input_ids"][0].tolist() == ids
        out = hf_model.generate(**inputs, do_sample=False)  # generation_config.json's length, eos and pad
        assert out[0, len(ids):].tolist() == want, prompt
        reply = pipe([{"role": "user", "content": prompt}], do_sample=False)[0]["generated_text"][-1]
        assert reply["role"] == "assistant" and reply["content"].strip() == chat.reply(prompt), prompt


def test_batched_generation_of_left_padded_prompts_equals_one_by_one(chat, hf_model, hf_tok):
    """The tokenizer pads on the left for generation; GPT-2's positions then follow the attention mask."""
    prompts = ["hi", "What do you EAT?"]
    texts = [hf_tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=False) for p in prompts]
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    out = hf_model.generate(**batch, do_sample=False, max_new_tokens=8)
    for i, p in enumerate(prompts):
        ids, truncated = chat.encode_prompt(p)
        assert not truncated
        assert out[i, batch["input_ids"].shape[1]:].tolist() == chat.generate(ids)[:8]


# --------------------------------------------------------------------------------------------------------------------
# the tokenizer and the chat template

def template_prompts(card: dict) -> list[str]:
    """120+ user messages: the shared ones, the persona's, and random mixes of what breaks tokenizers and templates
    (capitals to lowercase, letters whose lowercase is longer, emoji, CJK, combining marks, whitespace to strip,
    typed control tokens, the template's escape character itself)."""
    rng = random.Random(0)
    pieces = ["hi", "What do you EAT?", " fish ", "héllo", "WÖRLD", "🐟", "🐠🫧", "日本語", "İstanbul", "ẞ", "ǅ",
              "\t", "  ", "\n", "<|im_end|>", "<|im_start|>", "<pad>", "<", "|", ">", "<|", f"<{ESCAPE}|", ESCAPE,
              ESCAPE * 2, f"<{ESCAPE}", "a\u0301", "\u200b", "xxxxxxxx", "123", "!?", "Ω", "\\n", "{{ x }}", "{%"]
    out = list(PROMPTS) + list(card.get("sample_prompts", [])) + ["", "   ", "<|im_end|>", ESCAPE]
    while len(out) < 130:
        out.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 7))))
    return out


def test_chat_template_gives_guppys_prompt_ids(chat, hf_tok):
    prompts = template_prompts(chat.persona)
    assert chat.persona["lowercase"] and len(prompts) >= 100
    for p in prompts:
        assert template_ids(hf_tok, p) == encode_prompt_ids(chat.tok, chat.user_text(p)), repr(p)
    # a persona that keeps case: the same template without `| lower`
    plain = chat_template(lowercase=False)
    for p in prompts:
        assert template_ids(hf_tok, p, chat_template=plain) == encode_prompt_ids(chat.tok, p.strip()), repr(p)


def test_a_typed_control_token_stays_text(chat, hf_tok):
    ids = template_ids(hf_tok, "x<|im_end|><|im_start|>assistant ok")
    assert ids.count(2) == 1 and ids.count(1) == 2  # only the template's own <|im_end|> and two <|im_start|>


def test_long_prompts_are_cut_as_guppy_cuts_them(chat, hf_tok):
    for p in ["word " * 100, "🐟" * 60, "<|im_end|>" * 30]:
        ids, truncated = chat.encode_prompt(p)
        assert truncated
        assert template_ids(hf_tok, p, truncation=True, max_length=chat.max_prompt) == ids


def test_conversation_template_is_guppys_training_layout(chat, hf_tok):
    """A whole conversation (system, earlier turns, the reply) renders as `guppy prepare` lays out a messages row."""
    from guppy.data import conversation_row, encode_conversations

    messages = [{"role": "system", "content": "you are a fish"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello <|im_end|> friend"}, {"role": "user", "content": "food?"},
                {"role": "assistant", "content": "yes. always."}]
    got = hf_tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    with pytest.raises(ValueError, match="control tokens"):  # training data may not hold one: prepare refuses it
        conversation_row({"messages": messages})
    messages[2]["content"] = "hello friend"
    got = hf_tok.apply_chat_template(messages, return_dict=True)["input_ids"]
    tokens, offsets, prompt_len = encode_conversations(chat.tok, [conversation_row({"messages": messages})])
    assert got == tokens.tolist()
    prompt = hf_tok.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert int(prompt_len[0]) == len(prompt)


# --------------------------------------------------------------------------------------------------------------------
# the way back into guppy

def test_round_trip_is_bitwise(folders):
    a, _ = load_model(folders["run"])
    b, where = load_model(folders["hf"])
    assert where == folders["hf"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.lm_head.weight is b.tok_emb.weight
    again = os.path.join(folders["root"], "hf-again")  # guppy -> hf -> guppy -> hf: the same files
    export(folders["hf"], again, format="hf", log=lambda *a: None)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "persona.json"):
        with open(os.path.join(folders["hf"], name), "rb") as f, open(os.path.join(again, name), "rb") as g:
            assert f.read() == g.read(), name


def test_guppy_chat_and_eval_read_the_folder(folders, chat, capsys):
    from guppy.chat import evaluate_checkpoint
    from guppy.cli import main
    from guppy.errors import printable

    main(["chat", "--checkpoint", folders["hf"], "--prompt", PROMPTS[1], "--temperature", "0",
          "--max-new-tokens", str(chat.max_new_tokens)])
    assert capsys.readouterr().out.strip() == printable(chat.reply(PROMPTS[1]))  # as the CLI prints a reply
    from guppy.data import eval_batches, load_split
    from guppy.train import evaluate

    r = evaluate_checkpoint(folders["hf"], folders["data"], per_category=1, log=lambda *a: None)
    model, _ = load_model(folders["run"])
    want = evaluate(model, eval_batches(load_split(folders["data"], "eval"), 32, 64), torch.device("cpu"))
    assert r["eval_loss"] == want and r["keyword_prompts"] > 0
    same = Chat(folders["run"], temperature=0.0)  # eval's chat: greedy, the default reply length
    assert all(s["reply"] == same.reply(s["prompt"]).lower() for s in r["samples"][:3])


def tampered(folders, name: str, change) -> str:
    d = os.path.join(folders["root"], "tampered", name)
    shutil.copytree(folders["hf"], d)
    change(d)
    return d


def edit_config(**fields):
    def change(d):
        p = os.path.join(d, "config.json")
        with open(p) as f:
            cfg = json.load(f)
        cfg.update(fields)
        with open(p, "w") as f:
            json.dump(cfg, f)
    return change


def remove(name):
    return lambda d: os.remove(os.path.join(d, name))


def test_a_tampered_folder_is_one_line_from_the_cli(folders):
    """As a user meets it: `python -m guppy chat`, exit 2, one stderr line, no traceback. Run side by side."""
    cases = {"model_type": (edit_config(model_type="llama"), "config.json: model_type 'llama', not gpt2"),
             "gelu": (edit_config(activation_function="gelu_new"), "config.json: activation_function 'gelu_new'"),
             "no-tokenizer": (remove("tokenizer.json"), "incomplete transformers folder, tokenizer.json missing")}
    procs = {}
    for name, (change, _) in cases.items():
        d = tampered(folders, name, change)
        procs[name] = (d, subprocess.Popen([sys.executable, "-m", "guppy", "chat", "--checkpoint", d, "--prompt",
                                            "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for name, (d, p) in procs.items():
        out, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in err, (name, err)
        assert lines[0].startswith(f"guppy chat: error: {d}") and cases[name][1] in lines[0], (name, err)


@pytest.mark.parametrize("name, change, message", [
    ("arch", edit_config(architectures=["GPT2ForSequenceClassification"]), "architectures"),
    ("scaled", edit_config(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx is True"),
    ("untied", edit_config(tie_word_embeddings=False), "tie_word_embeddings is False"),
    ("shape", edit_config(n_inner=256), "tensor transformer.h.0.mlp.c_fc.weight has shape (64, 128), config.json "
                                        "needs (64, 256)"),
    ("no-weights", remove("model.safetensors"), "model.safetensors"),
    ("huge", edit_config(vocab_size=1_000_000), "tensor transformer.wte.weight has shape (300, 64), config.json "
                                                "needs (1000000, 64)"),  # refused before a model is built
])
def test_what_guppy_cannot_run_is_refused_in_one_line(folders, name, change, message):
    d = tampered(folders, name, change)
    with pytest.raises(GuppyError) as e:
        load_model(d)
    assert str(e.value).startswith(d) and message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------------------
# export's rules, the model card, and a missing transformers

def test_export_keeps_the_folder_rules(folders):
    with pytest.raises(GuppyError, match="already holds an export; pass --force"):
        export(folders["run"], folders["hf"], format="hf", log=lambda *a: None)
    with pytest.raises(GuppyError, match="not an earlier export"):  # a checkpoint is never overwritten
        export(folders["run"], os.path.join(folders["run"], "checkpoints", "step-0000000"), format="hf",
               force=True, log=lambda *a: None)
    with pytest.raises(GuppyError, match="--quantize: only for --format onnx"):
        export(folders["run"], os.path.join(folders["root"], "q"), format="hf", quantize="uint8")
    again = os.path.join(folders["root"], "forced")
    shutil.copytree(folders["hf"], again)
    export(folders["run"], again, format="hf", force=True, log=lambda *a: None)


def test_the_model_card_has_hub_front_matter_and_its_snippet_runs_as_written(folders, chat):
    with open(os.path.join(folders["hf"], "README.md"), encoding="utf-8") as f:
        card = f.read()
    front = card.split("---\n")[1]
    for line in ("license: mit", "library_name: transformers", "pipeline_tag: text-generation"):
        assert line in front.splitlines()
    assert re.search(r"^tags: \[.*gpt2.*\]$", front, re.M)
    assert "datasets: [arman-bd/guppylm-60k-generic]" in front.splitlines()  # export's --dataset
    code = re.search(r"```python\n(.*?)```", card, re.S)[1]
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(folders["hf"])
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert out.getvalue().strip() == chat.reply(chat.persona["sample_prompts"][0])


def test_without_transformers_the_export_says_how_to_get_it(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(GuppyError, match=r"transformers not installed; pip install 'guppy\[hf\]'"):
        export(folders["run"], os.path.join(folders["root"], "none"), format="hf")
    load_model(folders["hf"])  # reading a folder back needs no transformers


def test_the_readmes_transformers_snippet_runs_as_written(folders, chat):
    """The repository README's "Use it with transformers" block, on this folder in place of fish-hf: greedy, it
    prints guppy chat --temperature 0's reply to its prompt."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        section = f.read().split("### Use it with transformers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    prompt = re.search(r'"content": "([^"]*)"', code)[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace('"fish-hf"', repr(folders["hf"])), "README.md", "exec"), {})
    assert out.getvalue().strip() == chat.reply(prompt)
