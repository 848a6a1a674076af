"""The browser chat page (index.html, chat.js, tokenizer.js), installed into an export folder by `guppy export`.

The page runs the model with onnxruntime-web's WASM backend. It needs three files of that distribution:
    ort.wasm.min.js               the runtime's JS (WASM backend only; sets the global `ort`)
    ort-wasm-simd-threaded.mjs    the loader of the WASM binary
    ort-wasm-simd-threaded.wasm   the binary (~14 MB; one build serves both one thread and many)
By default the page takes them from a CDN at a pinned version, each checked against the SHA-384 below (computed from
the files of the npm package onnxruntime-web@ORT_WEB_VERSION, which the CDN serves byte for byte). With
`--runtime-dir` they are copied from a local distribution into DIR/ort/, hashed there, and the page works offline.
runtime.json tells the page which: {"version", "base", "files": {name: integrity}}.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil

from guppy.errors import GuppyError

ORT_WEB_VERSION = "1.30.0"
ORT_WEB_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
ORT_WEB_FILES = {
    "ort.wasm.min.js": "sha384-Bw6URI+Gvoadw0do7/QrSHUC9D1vCYYK5OSqChFyhyV5mzPL4oe2rOAFljAnS8Sq",
    "ort-wasm-simd-threaded.mjs": "sha384-XcXA/MtAf0WpB8e023xQH9CM7RIjiugakT7x99DIwpFf7k56BIFFcAPerIF7FDad",
    "ort-wasm-simd-threaded.wasm": "sha384-vjBJ1z7qrhkTyYsNqKeF6c7N+nOJSU94czEo+tvZcu8G75JparGq9kB+kTnEUNVM",
}
PAGE_FILES = ("index.html", "chat.js", "tokenizer.js")


def sri(path: str) -> str:
    """The subresource-integrity value of a file: sha384-<base64 digest>."""
    h = hashlib.sha384()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha384-" + base64.b64encode(h.digest()).decode()


def find_runtime(path: str) -> str:
    """The folder holding the three runtime files: `path` itself, its dist/ (an unpacked npm package), or
    package/dist/ (an unpacked `npm pack` tarball)."""
    for cand in (path, os.path.join(path, "dist"), os.path.join(path, "package", "dist")):
        if all(os.path.isfile(os.path.join(cand, f)) for f in ORT_WEB_FILES):
            return cand
    if not os.path.isdir(path):
        raise GuppyError(f"--runtime-dir {path}: no such folder")
    raise GuppyError(f"--runtime-dir {path}: not an onnxruntime-web distribution (it needs "
                     f"{', '.join(ORT_WEB_FILES)}; get them with `npm pack onnxruntime-web@{ORT_WEB_VERSION}`)")


def runtime_version(dist: str) -> str:
    """The version in the distribution's package.json, else from the banner of ort.wasm.min.js, else "unknown"."""
    pkg = os.path.join(os.path.dirname(os.path.abspath(dist)), "package.json")
    try:
        with open(pkg, encoding="utf-8") as f:
            return json.load(f)["version"]
    except (OSError, ValueError, KeyError):
        pass
    with open(os.path.join(dist, "ort.wasm.min.js"), encoding="utf-8", errors="replace") as f:
        head = f.read(300)
    marker = "ONNX Runtime Web v"
    return head.split(marker, 1)[1].split()[0] if marker in head else "unknown"


def install_page(out_dir: str, runtime_dir: str | None = None) -> dict:
    """Copy the page into out_dir and write runtime.json; with runtime_dir, copy the runtime into out_dir/ort/."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in PAGE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, name))
    if runtime_dir is None:
        runtime = {"version": ORT_WEB_VERSION, "base": ORT_WEB_CDN, "files": dict(ORT_WEB_FILES)}
    else:
        dist = find_runtime(runtime_dir)
        os.makedirs(os.path.join(out_dir, "ort"), exist_ok=True)
        files = {}
        for name in ORT_WEB_FILES:
            dst = os.path.join(out_dir, "ort", name)
            shutil.copyfile(os.path.join(dist, name), dst)
            files[name] = sri(dst)
        runtime = {"version": runtime_version(dist), "base": "ort/", "files": files}
    with open(os.path.join(out_dir, "runtime.json"), "w") as f:
        json.dump(runtime, f, indent=2)
    return runtime
