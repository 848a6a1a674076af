"""The browser chat page (index.html, chat.js, tokenizer.js), installed into an export folder by `guppy export`.

The page runs the model with onnxruntime-web's WASM backend. It needs three files of that distribution:
    ort.wasm.min.js               the runtime's JS (WASM backend only; sets the global `ort`)
    ort-wasm-simd-threaded.mjs    the loader of the WASM binary
    ort-wasm-simd-threaded.wasm   the binary (~14 MB; one build serves both one thread and many)
By default the page takes them from a CDN at a pinned version, each checked against the SHA-384 below (computed from
the files of the npm package onnxruntime-web@ORT_WEB_VERSION, which the CDN serves byte for byte). With
`--runtime-dir` they are copied from a local distribution into DIR/ort/, hashed there, and the page works offline
(and where a CDN is blocked). That distribution is what `npm pack onnxruntime-web@ORT_WEB_VERSION` writes: the .tgz
itself (read with tarfile, no unpacking), or that tarball unpacked, or the package's dist/ folder.
runtime.json tells the page which: {"version", "base", "files": {name: integrity}}.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tarfile
import zlib

from guppy.errors import GuppyError, one_line

ORT_WEB_VERSION = "1.30.0"
ORT_WEB_CDN = f"https://cdn.jsdelivr.net/npm/onnxruntime-web@{ORT_WEB_VERSION}/dist/"
ORT_WEB_FILES = {
    "ort.wasm.min.js": "sha384-Bw6URI+Gvoadw0do7/QrSHUC9D1vCYYK5OSqChFyhyV5mzPL4oe2rOAFljAnS8Sq",
    "ort-wasm-simd-threaded.mjs": "sha384-XcXA/MtAf0WpB8e023xQH9CM7RIjiugakT7x99DIwpFf7k56BIFFcAPerIF7FDad",
    "ort-wasm-simd-threaded.wasm": "sha384-vjBJ1z7qrhkTyYsNqKeF6c7N+nOJSU94czEo+tvZcu8G75JparGq9kB+kTnEUNVM",
}
PAGE_FILES = ("index.html", "chat.js", "tokenizer.js")


def sri(data: bytes) -> str:
    """The subresource-integrity value of a file's bytes: sha384-<base64 digest>."""
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


def find_runtime(path: str) -> str:
    """Where the three runtime files are: `path` itself if it is a file (the .tgz of `npm pack`, checked here), else
    the folder among `path`, its dist/ (an unpacked npm package) and package/dist/ (an unpacked tarball) that holds
    them."""
    if os.path.isfile(path):
        read_tarball(path)
        return path
    for cand in (path, os.path.join(path, "dist"), os.path.join(path, "package", "dist")):
        if all(os.path.isfile(os.path.join(cand, f)) for f in ORT_WEB_FILES):
            return cand
    if not os.path.isdir(path):
        raise GuppyError(f"--runtime-dir {path}: no such file or folder (give it the .tgz that "
                         f"`npm pack onnxruntime-web@{ORT_WEB_VERSION}` writes, or that .tgz unpacked)")
    raise GuppyError(f"--runtime-dir {path}: not an onnxruntime-web distribution (it needs "
                     f"{', '.join(ORT_WEB_FILES)}; get them with `npm pack onnxruntime-web@{ORT_WEB_VERSION}`)")


TARBALL_DIST = "package/dist/"  # where `npm pack` puts the package's dist/ folder


def read_tarball(path: str) -> tuple[str, dict[str, bytes]]:
    """(version, {name: bytes}) of the runtime files in the .tgz `npm pack` writes. Read in one pass to its end, so
    that a truncated download is caught here, as one line, and not by the browser."""
    wanted = {TARBALL_DIST + name: name for name in ORT_WEB_FILES}
    files, version = {}, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for m in tar:
                if m.isfile() and m.name in wanted:
                    files[wanted[m.name]] = tar.extractfile(m).read()
                elif m.isfile() and m.name == "package/package.json":
                    version = _package_version(tar.extractfile(m).read())
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise GuppyError(f"--runtime-dir {path}: not a readable .tgz ({one_line(e) or type(e).__name__}); "
                         f"make it again with `npm pack onnxruntime-web@{ORT_WEB_VERSION}`") from None
    missing = [name for name in ORT_WEB_FILES if name not in files]
    if missing:
        raise GuppyError(f"--runtime-dir {path}: not onnxruntime-web's npm package (no {TARBALL_DIST}{missing[0]} "
                         f"in it; make it with `npm pack onnxruntime-web@{ORT_WEB_VERSION}`)")
    return version or _banner_version(files["ort.wasm.min.js"]), files


def read_runtime(path: str) -> tuple[str, dict[str, bytes]]:
    """(version, {name: bytes}) of the three runtime files, from a .tgz or a folder (see find_runtime)."""
    if os.path.isfile(path):
        return read_tarball(path)
    dist, files = find_runtime(path), {}
    for name in ORT_WEB_FILES:
        with open(os.path.join(dist, name), "rb") as f:
            files[name] = f.read()
    return runtime_version(dist), files


def runtime_version(dist: str) -> str:
    """The version in the distribution's package.json, else from the banner of ort.wasm.min.js, else "unknown"."""
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(dist)), "package.json"), "rb") as f:
            version = _package_version(f.read())
    except OSError:
        version = None
    if version:
        return version
    with open(os.path.join(dist, "ort.wasm.min.js"), "rb") as f:
        return _banner_version(f.read(300))


def _package_version(raw: bytes) -> str | None:
    try:
        version = json.loads(raw).get("version")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return None
    return version if isinstance(version, str) else None


def _banner_version(script: bytes) -> str:
    head, marker = script[:300].decode("utf-8", errors="replace"), "ONNX Runtime Web v"
    return head.split(marker, 1)[1].split()[0] if marker in head else "unknown"


def install_page(out_dir: str, runtime_dir: str | None = None) -> dict:
    """Copy the page into out_dir and write runtime.json; with runtime_dir (a .tgz or a folder), copy the runtime
    into out_dir/ort/."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in PAGE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, name))
    if runtime_dir is None:
        runtime = {"version": ORT_WEB_VERSION, "base": ORT_WEB_CDN, "files": dict(ORT_WEB_FILES)}
    else:
        version, blobs = read_runtime(runtime_dir)
        os.makedirs(os.path.join(out_dir, "ort"), exist_ok=True)
        for name, data in blobs.items():
            with open(os.path.join(out_dir, "ort", name), "wb") as f:
                f.write(data)
        runtime = {"version": version, "base": "ort/", "files": {name: sri(data) for name, data in blobs.items()}}
    with open(os.path.join(out_dir, "runtime.json"), "w") as f:
        json.dump(runtime, f, indent=2)
    return runtime
