"""The browser chat page in a real headless Chromium: `guppy serve` on a tiny exported model, a prompt typed into the
page, and its greedy reply compared with the PyTorch model's; the JS tokenizer against the Python one.

Needs Debian's `chromium` and a local onnxruntime-web distribution (no CDN: the export uses --runtime-dir). It is
$GUPPY_ORT_WEB_DIR, else the .tgz that `npm pack` writes, fetched once into ~/.cache/guppy/ and given to the export as
it is. Outside CI a missing piece skips the test with the reason; in CI (CI=true, as .ci/run sets up both) it fails
instead. The page's failures (offline with the CDN runtime, a runtime file missing, opened from file://) need only
chromium: each must show, in the chat area, what failed and the command that fixes it.

`python tests/test_web.py RUN docs/chat-page.png` exports RUN and takes the README's screenshot the same way.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chromium import Browser, find_chromium  # noqa: E402
from tiny_export import PROMPTS, make_run  # noqa: E402

from guppy.web import ORT_WEB_FILES, ORT_WEB_VERSION, install_page, read_runtime, sri  # noqa: E402

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "guppy")
TARBALL = f"onnxruntime-web-{ORT_WEB_VERSION}.tgz"  # the name `npm pack` gives it


def missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser test: .ci/run installs what it needs)")
    pytest.skip(reason)


def ort_web_dist() -> str:
    """A local onnxruntime-web distribution: $GUPPY_ORT_WEB_DIR, else the cached .tgz, fetched by `npm pack` once."""
    if os.environ.get("GUPPY_ORT_WEB_DIR"):
        return os.environ["GUPPY_ORT_WEB_DIR"]
    tgz = os.path.join(CACHE, TARBALL)
    if not os.path.isfile(tgz):
        npm = shutil.which("npm")
        if npm is None:
            missing("no onnxruntime-web distribution: set GUPPY_ORT_WEB_DIR, or install npm to fetch it")
        os.makedirs(CACHE, exist_ok=True)
        part = os.path.join(CACHE, f".npm-pack-{os.getpid()}")  # renamed into place whole: never a partial .tgz
        os.makedirs(part, exist_ok=True)
        r = subprocess.run([npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--silent"], cwd=part,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0 or not os.path.isfile(os.path.join(part, TARBALL)):
            shutil.rmtree(part, ignore_errors=True)
            missing(f"npm pack onnxruntime-web@{ORT_WEB_VERSION} failed: {r.stderr.strip()[-300:]}")
        os.replace(os.path.join(part, TARBALL), tgz)
        shutil.rmtree(part, ignore_errors=True)
    return tgz


def serve(folder: str):
    """`guppy serve folder --port 0` in a subprocess -> (process, URL it printed)."""
    proc = subprocess.Popen([sys.executable, "-m", "guppy", "serve", folder, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not m:
        proc.kill()
        raise AssertionError(f"guppy serve printed {line!r}; stderr: {proc.stderr.read()}")
    return proc, m.group(0)


def open_page(url: str) -> Browser:
    browser = Browser(find_chromium())
    browser.open(url)
    state = browser.wait_for("document.body.dataset.ready || document.body.dataset.error", timeout=180)
    assert state == "1", f"the page failed to start: {state}; console: {browser.console()}"
    return browser


def ask(browser: Browser, prompt: str, temperature: str = "0") -> tuple[str, list[int]]:
    """Type the prompt into the page, press Enter, wait for the reply -> (text, token ids)."""
    n = browser.eval("document.querySelectorAll('.msg.bot[data-done]').length")
    browser.eval(f"document.getElementById('temperature').value = {json.dumps(temperature)}")
    browser.eval("document.getElementById('input').focus()")
    browser.type(prompt)
    browser.press_enter()
    browser.wait_for(f"document.querySelectorAll('.msg.bot[data-done]').length > {n}", timeout=120)
    last = "[...document.querySelectorAll('.msg.bot')].at(-1)"
    return browser.eval(f"{last}.textContent"), json.loads(browser.eval(f"{last}.dataset.ids"))


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The tiny run exported with the runtime from the npm .tgz, served, and open in Chromium."""
    if find_chromium() is None:
        missing("no chromium on PATH (apt-get install chromium)")
    dist = ort_web_dist()
    from guppy.export import export

    root = str(tmp_path_factory.mktemp("web"))
    data, run = make_run(root)
    out = os.path.join(root, "export")
    export(run, out, runtime_dir=dist, log=lambda *a: None)
    server, url = serve(out)
    browser = None
    try:
        browser = open_page(url)
        yield browser, run, root
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=10)


def test_pinned_cdn_hashes_match_the_npm_package():
    """The CDN default's SRI hashes are those of the npm package's files (which the CDN serves byte for byte)."""
    version, files = read_runtime(ort_web_dist())
    assert version == ORT_WEB_VERSION
    assert {name: sri(data) for name, data in files.items()} == ORT_WEB_FILES


def test_greedy_reply_in_the_browser_equals_pytorch(page, tmp_path):
    from guppy.chat import NO_REPLY, Chat

    browser, run, _ = page
    chat = Chat(run, temperature=0.0)
    for prompt in PROMPTS:
        ids, _ = chat.encode_prompt(prompt)
        want = chat.generate(ids)
        text, got = ask(browser, prompt)
        assert got == want, prompt
        assert text == (chat.reply(prompt) or NO_REPLY), prompt
    send = browser.eval("(() => { const s = getComputedStyle(document.getElementById('send')); "
                        "return [s.opacity, s.cursor]; })()")
    assert send == ["1", "pointer"]   # ready: looks clickable (tests below: disabled looks disabled)
    browser.screenshot(str(tmp_path / "page.png"))
    with open(tmp_path / "page.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sampled_reply_in_the_browser_stops_and_decodes(page):
    browser, _, _ = page
    text, ids = ask(browser, "hello", temperature="1.0")
    assert text and len(ids) >= 1 and all(isinstance(i, int) for i in ids)


# where JavaScript's \s and the tokenizer's regex disagree: U+0085 is white space there, U+FEFF and U+001C are not
WHITE_SPACE_EDGES = ["!\u0085!", "a \u0085b", "!\ufeff!", "x \ufeff!", "!\x1c!", "!\u180e!", "!\u2028!",
                     "!\u3000!", "ab\u0085\u0085cd", "ab\ufeffcd"]


def tokenizer_corpus(data_dir: str, n_random: int = 150) -> list[str]:
    """Prompts and replies of the data, unicode edge cases (whitespace the regex engines disagree on, emoji sequences,
    scripts, control characters), and random strings over a mixed alphabet."""
    from guppy.data import read_jsonl

    rows = (read_jsonl(os.path.join(data_dir, "eval.jsonl"))[:30]
            + read_jsonl(os.path.join(data_dir, "train.jsonl"))[:50])
    corpus = [r["input"] for r in rows] + [r["output"] for r in rows]
    corpus += ["Hello World!", "I'M SHOUTING", "don't you'll we've I'd", "héllo wörld", "日本語のテキスト",
               "emoji 🐟🐠🐡 fish", "👨‍👩‍👧 family", "🏳️‍🌈", "tabs\tand\nnewlines\r\n", "  leading and trailing  ",
               "nbsp\u00a0here", "nel\u0085x", "bom\ufeffx", "zero\u200bwidth", "ideographic\u3000space",
               "numbers 123 4567 ٣٤٥", "mixed123abc", "x<|im_end|>y", "<|im_start|>user", "'s 's 'S", "a  b   c",
               "\n\n\n", "", " ", "ok…", "café ☕", "\x00\x01 control", "line\u2028sep", "ς σ Σ", "İstanbul",
               "ﬁ ligature", "🤖" * 5, "a" * 200, "ab" * 50, "ǅ title case", "\U0001d400 math bold", "한국어 텍스트",
               *WHITE_SPACE_EDGES]
    rng = random.Random(0)
    alphabet = "abcXYZ 019!?.,'é🐟\n\t\u00a0日\u2003"
    corpus += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n_random)]
    return corpus


def test_js_tokenizer_ids_equal_python(page):
    """On the run's tokenizer, and on one trained on the corpus itself: with merges across unicode, emoji and odd
    white space, a piece boundary in the wrong place changes the ids."""
    from guppy.chat import encode_prompt_ids
    from guppy.data import load_tokenizer, train_tokenizer

    browser, run, root = page
    corpus = tokenizer_corpus(os.path.join(root, "data"))
    assert len(corpus) >= 300
    rich = train_tokenizer(corpus + WHITE_SPACE_EDGES * 50, vocab_size=700)  # merges across those characters
    for tok in (load_tokenizer(os.path.join(run, "tokenizer.json")), rich):
        js = f"new guppy.tokenizer.constructor({tok.to_str()})"
        got = browser.eval(f"JSON.stringify({json.dumps(corpus)}.map((s) => {js}.encode(s)))")
        tok.encode_special_tokens = True   # plain text: typed text makes no control tokens, as the page encodes it
        want = [tok.encode(s, add_special_tokens=False).ids for s in corpus]
        assert json.loads(got) == want
        decoded = browser.eval(f"JSON.stringify({json.dumps(want)}.map((ids) => {js}.decode(ids)))")
        assert json.loads(decoded) == [tok.decode(ids) for ids in want]
        prompts = browser.eval(f"JSON.stringify({json.dumps(PROMPTS)}.map((s) => {js}.encodePrompt(s)))")
        assert json.loads(prompts) == [encode_prompt_ids(tok, p) for p in PROMPTS]


# ---------------------------------------------------------------------------------------------------------------
# the page's failures: each one said in the chat area, with the command that fixes it, and the form disabled

OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",)  # no name resolves: as offline as it gets


@pytest.fixture(scope="module")
def offline_browser():
    if find_chromium() is None:
        missing("no chromium on PATH (apt-get install chromium)")
    browser = Browser(find_chromium(), flags=OFFLINE)
    try:
        yield browser
    finally:
        browser.close()


def page_folder(folder: str, runtime_dir: str | None = None) -> str:
    """The page as `guppy export` installs it, with the JSON files it reads first and a stand-in model.onnx: these
    pages stop before they load a model."""
    from guppy.data import train_tokenizer

    os.makedirs(folder)
    install_page(folder, runtime_dir)
    files = {"persona.json": {"name": "crab", "description": "a crab", "lowercase": True, "sample_prompts": ["hi"]},
             "config.json": {"vocab_size": 300, "max_seq_len": 64, "d_model": 64, "n_layers": 2, "n_heads": 2,
                             "ffn_hidden": 128, "dropout": 0.0}}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(train_tokenizer(["hello crab", "where do you live"], vocab_size=300).to_str())
    with open(os.path.join(folder, "model.onnx"), "wb") as f:
        f.write(b"never loaded")
    return folder


def problem_shown(browser: Browser, url: str, timeout: float = 60) -> tuple[str, dict]:
    """Open url and wait until the page gives up -> (the message in the chat area, how the send button looks)."""
    browser.open(url)
    browser.wait_for("document.body.dataset.error || document.body.dataset.ready", timeout=timeout)
    text = browser.eval("document.querySelector('#log .msg.problem')?.textContent ?? '(no message in the chat area)'")
    send = browser.eval("(() => { const b = document.getElementById('send'), s = getComputedStyle(b); "
                        "return { disabled: b.disabled, opacity: s.opacity, cursor: s.cursor }; })()")
    return text, send


def served(folder: str, browser: Browser) -> tuple[str, dict]:
    server, url = serve(folder)
    try:
        return problem_shown(browser, url)
    finally:
        server.terminate()
        server.wait(timeout=10)


LOOKS_DISABLED = {"disabled": True, "opacity": "0.4", "cursor": "not-allowed"}


def test_offline_with_the_cdn_runtime_the_page_says_so_and_how_to_fix_it(offline_browser, tmp_path):
    text, send = served(page_folder(str(tmp_path / "export")), offline_browser)
    assert f"Could not load onnxruntime-web {ORT_WEB_VERSION} from cdn.jsdelivr.net" in text and "offline" in text
    assert f"guppy export --checkpoint RUN --out DIR --force --runtime-dir {TARBALL}" in text
    assert f"npm pack onnxruntime-web@{ORT_WEB_VERSION}" in text
    assert send == LOOKS_DISABLED


def test_a_runtime_file_missing_from_the_folder_says_export_again(offline_browser, tmp_path):
    fake = tmp_path / "dist"
    fake.mkdir()
    for name in ORT_WEB_FILES:
        (fake / name).write_bytes(b"// " + name.encode())   # loads (a comment) and matches its hash
    folder = page_folder(str(tmp_path / "export"), str(fake))
    os.remove(os.path.join(folder, "ort", "ort-wasm-simd-threaded.wasm"))
    text, send = served(folder, offline_browser)
    assert "Could not load onnxruntime-web from ort/ in this folder" in text and "missing" in text
    assert "guppy export --checkpoint RUN --out DIR --force --runtime-dir" in text
    assert send == LOOKS_DISABLED


@pytest.mark.parametrize("key", ["n_layers", "max_seq_len"])
def test_a_config_that_is_not_the_models_is_said_in_the_chat_area(page, offline_browser, tmp_path, key):
    """config.json of another shape beside model.onnx (two exports mixed, or an edit): the page used to say "ready"
    and leave the first reply at "…", with the error in the console only. A wrong max_seq_len runs the first call
    with the right shapes: only the model's own record (its metadata) tells."""
    _, _, root = page
    folder = str(tmp_path / "mixed")
    shutil.copytree(os.path.join(root, "export"), folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, key: config[key] + 1}, f)
    text, send = served(folder, offline_browser)
    assert "config.json is not this model's" in text and "guppy export --checkpoint RUN --out DIR --force" in text
    assert f"{key} {config[key] + 1}" in text
    assert send == LOOKS_DISABLED


def test_a_tokenizer_from_another_dataset_of_the_same_size_is_said_in_the_chat_area(page, offline_browser, tmp_path):
    """The same vocabulary size runs without an error and answers in garbage; `guppy chat` on the folder refuses it
    (tests/test_export_safety.py), and so does the page, by the sha256 model.onnx records."""
    from guppy.data import prepare

    _, _, root = page
    folder = str(tmp_path / "mixed")
    shutil.copytree(os.path.join(root, "export"), folder)
    other = str(tmp_path / "other")
    prepare(other, samples=600, vocab_size=300, seed=1, log=lambda *a: None)
    vocab = {}
    for name, path in (("ours", folder), ("theirs", other)):
        with open(os.path.join(path, "tokenizer.json"), "rb") as f:
            vocab[name] = json.load(f)["model"]["vocab"]
    assert len(vocab["ours"]) == len(vocab["theirs"]) and vocab["ours"] != vocab["theirs"]
    shutil.copyfile(os.path.join(other, "tokenizer.json"), os.path.join(folder, "tokenizer.json"))
    text, send = served(folder, offline_browser)
    assert "tokenizer.json is not the tokenizer model.onnx was exported with" in text
    assert "guppy export --checkpoint RUN --out DIR --force" in text
    assert send == LOOKS_DISABLED


def test_the_page_checks_the_shape_keys_guppy_chat_checks():
    """chat.js keeps its own copy of guppy/onnx_chat.py's SHAPE (the page cannot import Python): the two stay equal."""
    from guppy.onnx_chat import SHAPE

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "guppy", "web", "chat.js")) as f:
        page_shape = re.search(r"^const SHAPE = (\[[^\]]*\]);", f.read(), re.M)
    assert page_shape and json.loads(page_shape.group(1)) == list(SHAPE)


def test_js_sha256_and_onnx_metadata_equal_python(page):
    """The page's own SHA-256 against hashlib (lengths around the 64-byte block and its 56-byte padding limit, bytes
    of every value, the export's tokenizer.json), and its protobuf reading of model.onnx's metadata against
    onnxruntime's."""
    import hashlib

    import onnxruntime

    browser, _, root = page
    rng = random.Random(0)
    cases = [b"", b"abc", "héllo 🐟".encode()] + [bytes(rng.randrange(256) for _ in range(n))
                                                  for n in (1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 70000)]
    got = browser.eval(f"JSON.stringify({json.dumps([list(c) for c in cases])}.map("
                       "(b) => guppy.sha256Hex(Uint8Array.from(b))))")
    assert json.loads(got) == [hashlib.sha256(c).hexdigest() for c in cases]

    fetched = ("(async () => { const r = await fetch(NAME); const b = new Uint8Array(await r.arrayBuffer()); "
               "return JSON.stringify(WHAT); })()")
    with open(os.path.join(root, "export", "tokenizer.json"), "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    assert browser.eval(fetched.replace("NAME", '"tokenizer.json"').replace("WHAT", "guppy.sha256Hex(b)")) == \
        json.dumps(want)
    meta = onnxruntime.InferenceSession(os.path.join(root, "export", "model.onnx")).get_modelmeta().custom_metadata_map
    assert {"guppy_config", "guppy_tokenizer_sha256"} <= set(meta) and meta["guppy_tokenizer_sha256"] == want
    got = browser.eval(fetched.replace("NAME", '"model.onnx"').replace("WHAT", "guppy.onnxMetadata(b)"))
    assert json.loads(got) == dict(meta)


def test_opened_from_a_file_the_page_says_to_serve_its_folder(offline_browser, tmp_path):
    folder = page_folder(str(tmp_path / "my export"))
    text, send = problem_shown(offline_browser, "file://" + urllib.request.pathname2url(
        os.path.join(folder, "index.html")), timeout=20)
    assert "opened as a file" in text and f'guppy serve "{folder}"' in text
    assert f'python3 -m http.server --directory "{folder}"' in text
    assert send == LOOKS_DISABLED


def main(run: str, png: str):
    """Export `run` (offline runtime), serve it, ask two of its sample prompts, and screenshot the page."""
    import tempfile

    from guppy.export import export

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "export")
        export(run, out, runtime_dir=ort_web_dist())
        server, url = serve(out)
        try:
            browser = open_page(url)
            with open(os.path.join(out, "persona.json")) as f:
                prompts = json.load(f)["sample_prompts"][:2] or ["hi"]
            for p in prompts + ["What do you think of CATS?"]:
                print(p, "->", ask(browser, p, temperature="0")[0])
            browser.screenshot(png)
            browser.close()
        finally:
            server.terminate()
    print(f"wrote {png}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
