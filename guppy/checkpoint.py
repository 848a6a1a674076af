"""Checkpoints without pickle: safetensors for tensors, JSON for everything else, written atomically.

A run folder holds
    checkpoints/step-000400/    model.safetensors  config.json  state.safetensors  state.json
    latest.json, best.json      {"checkpoint": "checkpoints/step-000400", "step": 400, ...}
A checkpoint folder is written under a temporary name, its files fsync'ed, then renamed into place; only then is the
pointer file replaced (temp file, fsync, os.replace). A kill -9 at any moment therefore leaves the previous pointer
naming a complete checkpoint. Folders no pointer names are removed afterwards.

`load_model` also reads the original GuppyLM's `.pt` checkpoints (a dict with `model_state_dict`) through torch's
weights-only unpickler, which refuses to run code.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ModelConfig, TrainConfig
from .errors import GuppyError

TIED = "lm_head.weight"  # the same tensor as tok_emb.weight; stored once


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path, obj):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    os.close(fd)
    try:
        _write_json(tmp, obj)
        os.replace(tmp, path)
        _fsync_dir(d)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_tensors(path, tensors: dict, metadata=None):
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _flatten_optimizer(opt_state: dict):
    """torch optimizer state_dict -> (tensors, json). Tensors: state.{param}.{name}; the rest stays JSON."""
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    groups = [{k: (v.item() if torch.is_tensor(v) else v) for k, v in g.items()} for g in opt_state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str, step: int, model, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None,
                    optimizer=None, scaler=None, rng: dict | None = None, extra: dict | None = None,
                    pointers=("latest",)) -> str:
    """Write checkpoints/step-N atomically and point each name in `pointers` ("latest", "best") at it."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    rel = os.path.join("checkpoints", f"step-{step:07d}")
    final = os.path.join(run_dir, rel)
    if not os.path.isdir(final):
        tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step:07d}-", dir=ckpt_root)
        try:
            sd = {k: v for k, v in model.state_dict().items() if k != TIED}
            _save_tensors(os.path.join(tmp, "model.safetensors"), sd, metadata={"format": "guppy"})
            _write_json(os.path.join(tmp, "config.json"), model_cfg.to_dict())
            state_tensors, state = {}, {"step": step, "extra": extra or {}}
            if train_cfg is not None:
                state["train_config"] = train_cfg.to_dict()
            if optimizer is not None:
                t, state["optimizer"] = _flatten_optimizer(optimizer.state_dict())
                state_tensors.update(t)
            if scaler is not None and scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            for name, t in (rng or {}).items():
                state_tensors[f"rng.{name}"] = t
            _save_tensors(os.path.join(tmp, "state.safetensors"), state_tensors)
            _write_json(os.path.join(tmp, "state.json"), state)
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(ckpt_root)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    for name in pointers:
        atomic_write_json(os.path.join(run_dir, f"{name}.json"), {"checkpoint": rel, "step": step, **(extra or {})})
    _remove_unreferenced(run_dir)
    return final


def read_pointer(run_dir: str, name: str) -> dict | None:
    path = os.path.join(run_dir, f"{name}.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _remove_unreferenced(run_dir):
    keep = {os.path.normpath(p["checkpoint"]) for p in (read_pointer(run_dir, n) for n in ("latest", "best")) if p}
    root = os.path.join(run_dir, "checkpoints")
    for name in os.listdir(root):
        rel = os.path.normpath(os.path.join("checkpoints", name))
        if rel not in keep and (name.startswith("step-") or name.startswith(".tmp-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def resolve_checkpoint(path: str, prefer: str = "best") -> str:
    """A checkpoint folder, a run folder (its best, else latest checkpoint), or an original GuppyLM .pt file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise GuppyError(f"{path}: no such checkpoint or run folder")
    if os.path.isfile(os.path.join(path, "model.safetensors")) or os.path.isfile(os.path.join(path, "config.json")):
        return path
    for name in (prefer, "latest" if prefer == "best" else "best"):
        p = read_pointer(path, name)
        if p:
            return os.path.join(path, p["checkpoint"])
    raise GuppyError(f"{path}: no checkpoint in this folder (expected latest.json/best.json or model.safetensors)")


def load_model(path: str, device="cpu", ops: str | None = None, prefer: str = "best"):
    """-> (GuppyLM, checkpoint folder or file). Reads guppy checkpoints and original GuppyLM .pt files."""
    from .model import GuppyLM

    ckpt = resolve_checkpoint(path, prefer)
    if os.path.isfile(ckpt):
        model_cfg, sd = _read_guppylm_pt(ckpt)
    else:
        cfg_path, weights = os.path.join(ckpt, "config.json"), os.path.join(ckpt, "model.safetensors")
        for p in (cfg_path, weights):
            if not os.path.isfile(p):
                raise GuppyError(f"{ckpt}: incomplete checkpoint, {os.path.basename(p)} is missing")
        try:
            with open(cfg_path) as f:
                model_cfg = ModelConfig.from_dict(json.load(f))
            sd = load_file(weights)
        except (json.JSONDecodeError, SafetensorError, OSError) as e:
            raise GuppyError(f"{ckpt}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
        sd[TIED] = sd["tok_emb.weight"]
    if ops is not None:
        model_cfg.ops = ops
    model = GuppyLM(model_cfg)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise GuppyError(f"{ckpt}: weights do not fit the model ({str(e).splitlines()[0]})") from None
    return model.to(device), ckpt


def _read_guppylm_pt(path: str):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GuppyError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None
    sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or "tok_emb.weight" not in sd:
        raise GuppyError(f"{path}: not a GuppyLM checkpoint (no model_state_dict with tok_emb.weight)")
    vocab, d_model = sd["tok_emb.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    cfg = dict(obj.get("config") or {}) if isinstance(obj.get("config"), dict) else {}
    cfg.update(vocab_size=vocab, d_model=d_model, n_layers=n_layers, max_seq_len=sd["pos_emb.weight"].shape[0],
               ffn_hidden=sd["blocks.0.ffn.up.weight"].shape[0])
    cfg.setdefault("n_heads", ModelConfig().n_heads)  # not recoverable from shapes; GuppyLM's is 6
    if TIED not in sd:
        sd[TIED] = sd["tok_emb.weight"]
    return ModelConfig.from_dict(cfg), sd


def load_training_state(ckpt_dir: str) -> tuple[dict, dict]:
    """-> (state.json contents, tensors of state.safetensors) for --resume."""
    try:
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            state = json.load(f)
        tensors = load_file(os.path.join(ckpt_dir, "state.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise GuppyError(f"{ckpt_dir}: cannot resume, training state unreadable ({str(e).splitlines()[0]})") from None
    if "optimizer" in state:
        state["optimizer"] = _unflatten_optimizer(tensors, state["optimizer"])
    state["rng"] = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    return state, tensors
