"""What every benchmark records with its numbers: the device, the versions, the date, and where results go."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import tempfile

import torch

from guppy.errors import GuppyError

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Dense fp16/bf16 tensor-core peaks with fp32 accumulation (TFLOPS, no sparsity), from the vendors' datasheets, by the
# exact name torch.cuda.get_device_name() reports: variants of one chip differ (H100 PCIe 756, SXM 989), and a
# substring would match the wrong card ("L4" is in "L40S"). A name not listed has an unknown peak and no MFU.
PEAK_TFLOPS = {
    "Tesla T4": 65.0,
    "Tesla V100-SXM2-16GB": 125.0, "Tesla V100-SXM2-32GB": 125.0,
    "Tesla V100-PCIE-16GB": 112.0, "Tesla V100-PCIE-32GB": 112.0,
    "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A10": 125.0,                 # the A10G (AWS) has no NVIDIA datasheet figure: unknown, not guessed
    "NVIDIA L4": 121.0, "NVIDIA L40": 181.0, "NVIDIA L40S": 362.0,
    "NVIDIA H100 80GB HBM3": 989.0,      # H100 SXM5
    "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,                # H200 SXM
    "NVIDIA H200 NVL": 835.0,
}


def device_name(device=None) -> str:
    if device is not None and torch.device(device).type == "cuda" or device is None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_tflops(name: str) -> float | None:
    """The datasheet peak for this exact device name, or None (unknown: no MFU is reported)."""
    return PEAK_TFLOPS.get(name.strip())


def peak_note(name: str) -> str:
    peak = peak_tflops(name)
    return f"{peak:g} TFLOPS (dense fp16/bf16 datasheet peak)" if peak else \
        f"unknown peak for {name!r}: no MFU (bench/common.py PEAK_TFLOPS lists exact device names)"


def environment(device=None) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
           "cuda": torch.version.cuda, "date": datetime.date.today().isoformat(),
           "cpu_count": os.cpu_count()}  # the host side (batches, launches, builds) runs on these (Colab T4: ~2)
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def prepared_data(data: str | None, work: str | None = None, **prepare_args) -> str:
    """The data folder a suite runs on: `data` when it is a prepared one (else a GuppyError that says what is missing,
    one line at the CLI), or a fresh one prepared with `prepare_args` into work/data (work: a new temporary folder
    when None)."""
    from guppy.data import DATA_FILES, prepare
    if data is None:
        data = os.path.join(work or tempfile.mkdtemp(prefix="guppy-bench-"), "data")
        prepare(data, **prepare_args)
        return data
    if not os.path.isdir(data):
        raise GuppyError(f"--data {data}: no such folder (make one with `guppy prepare --out {data}`)")
    missing = [f for f in (*DATA_FILES, "train.tokens.npy") if not os.path.isfile(os.path.join(data, f))]
    if missing:
        raise GuppyError(f"--data {data}: not a prepared data folder (no {', '.join(missing)}; make one with "
                         f"`guppy prepare --out {data}`)")
    return data


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]


def write_result(result: dict, path: str, plot=None) -> str:
    """Write result as JSON to path (folders made as needed) and, given a plot function, a PNG beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    png = plot(result, os.path.splitext(path)[0] + ".png") if plot else None
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return path


def default_result_path(result: dict, prefix: str = "", subdir: str = "") -> str:
    """bench/results/[subdir/]<prefix><device>-<date>.json"""
    return os.path.join(RESULTS_DIR, subdir, f"{prefix}{slug(result['device'])}-{result['date']}.json")


def result_path(out: str | None, result: dict, prefix: str = "", subdir: str = "") -> str:
    """Where --out puts a result: a path ending in .json is that file; any other path is a folder that gets the
    default file name; none gives bench/results/[subdir/]<prefix><device>-<date>.json."""
    default = default_result_path(result, prefix, subdir)
    if not out:
        return default
    return out if out.lower().endswith(".json") else os.path.join(out, os.path.basename(default))


def model_flops_per_token(cfg, seq_len: float) -> float:
    """Training FLOPs per token: 6 per parameter touched per token (the embedding lookup is free, the tied LM head
    is not), plus attention's 12·L·d·T_ctx (causal halves the 6·2·... of full attention; T_ctx = mean context)."""
    n_matmul = cfg.n_layers * (4 * cfg.d_model ** 2 + 2 * cfg.d_model * cfg.ffn_hidden) + cfg.vocab_size * cfg.d_model
    return 6 * n_matmul + 6 * cfg.n_layers * cfg.d_model * seq_len


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None (and one line saying so) when matplotlib is not
    installed: a benchmark's numbers never depend on its plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install guppy[bench]): no plot")
        return None
    return plt
