"""Checkpoints without pickle: safetensors for tensors, JSON for everything else, written atomically.

A run folder holds
    checkpoints/step-000400/    model.safetensors  config.json  state.safetensors  state.json
    latest.json, best.json      {"checkpoint": "checkpoints/step-000400", "step": 400, ...}
A checkpoint folder is written under a temporary name, its files fsync'ed, then renamed into place; only then is the
pointer file replaced (temp file, fsync, os.replace). A kill -9 at any moment therefore leaves the previous pointer
naming a complete checkpoint. Folders no pointer names are removed afterwards, unless a pointer file is damaged
(then nothing is removed: what it named cannot be told). A folder a pointer names is never rewritten; one that no
pointer names at the step being saved (left by a crash between its rename and the pointer update) is replaced, so a
checkpoint always holds the state and recipe of the process that wrote it.

state.json also records the run (`run`: the preset and the data fingerprint, see guppy.data.fingerprint), which
--resume, chat and eval check against the data and tokenizer they are given.

Folders and files follow the umask, as any other file the user writes (a run on a team machine is shared like the
rest of their files).

`load_model` also reads the original GuppyLM's `.pt` checkpoints (a dict with `model_state_dict`) through torch's
weights-only unpickler, which refuses to run code.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensor_bytes, save as tensor_bytes

from .config import ModelConfig, TrainConfig
from .errors import ConfigError, GuppyError, one_line

TIED = "lm_head.weight"  # the same tensor as tok_emb.weight; stored once
POINTERS = ("latest", "best")
CHECKPOINT_FILES = ("model.safetensors", "config.json", "state.safetensors", "state.json")
_CHECKPOINT_NAME = re.compile(r"step-\d+\Z")


class DamagedPointer(GuppyError):
    """A latest.json / best.json that exists but does not name a checkpoint (torn, truncated, edited)."""


# --------------------------------------------------------------------------------------------------------------------
# Writing files: fsync'ed, modes from the umask
# --------------------------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _follow_umask(path: str, is_dir: bool):
    """mkdtemp/mkstemp create 0700/0600 whatever the umask says: give the path the mode a plain mkdir/open would."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def fsync_dir(path):
    """A folder's entries on disk (a rename into it survives a power cut); nothing where the filesystem cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a filesystem that cannot fsync a folder
        pass
    finally:
        os.close(fd)


def _write_bytes(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path, obj):
    _write_bytes(path, json.dumps(obj, indent=2).encode())


def atomic_write_bytes(path, data: bytes):
    """Replace the file at path with data, all or nothing (temp file beside it, fsync, os.replace)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=d)
    os.close(fd)
    try:
        _follow_umask(tmp, is_dir=False)
        _write_bytes(tmp, data)
        os.replace(tmp, path)
        fsync_dir(d)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def _save_tensors(path, tensors: dict, metadata=None):
    # serialised here and written by Python, so that a full disk or a permission problem is an OSError with its path
    # (safetensors' own file writer reports those as a SafetensorError with no path)
    _write_bytes(path, tensor_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def _load_tensors(path) -> dict:
    with open(path, "rb") as f:  # an OSError (missing, permission denied) keeps its path and cause
        data = f.read()
    try:
        return load_tensor_bytes(data)
    except SafetensorError as e:
        raise GuppyError(f"{path}: unreadable checkpoint ({one_line(e)})") from None


def _read_json(path, what: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GuppyError(f"{path}: damaged {what}, not valid JSON ({one_line(e)})") from None


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


# --------------------------------------------------------------------------------------------------------------------
# A run folder: its checkpoints and the pointers that name them
# --------------------------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str) -> list[str]:
    """The checkpoint folders of a run ("checkpoints/step-N"), oldest first, whatever the pointers say."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _CHECKPOINT_NAME.match(n) and os.path.isdir(os.path.join(root, n))]
    return [f"checkpoints/{n}" for n in sorted(names, key=lambda n: int(n[5:]))]


def run_contents(run_dir: str) -> list[str]:
    """What makes run_dir an existing run: its pointer files and checkpoint folders (empty: not a run)."""
    if not os.path.isdir(run_dir):
        return []
    pointers = [f"{n}.json" for n in POINTERS if os.path.lexists(os.path.join(run_dir, f"{n}.json"))]
    return pointers + list_checkpoints(run_dir)


def read_pointer(run_dir: str, name: str) -> dict | None:
    """RUN/<name>.json: {"checkpoint": "checkpoints/step-N", "step": N, ...}, or None when there is no such file.
    Raises DamagedPointer when the file is there but does not hold that."""
    path = os.path.join(run_dir, f"{name}.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        p = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedPointer(f"{path}: damaged, not valid JSON ({one_line(e)})") from None
    ckpt = p.get("checkpoint") if isinstance(p, dict) else None
    if not (isinstance(ckpt, str) and ckpt.startswith("checkpoints/") and _CHECKPOINT_NAME.match(ckpt[12:])
            and isinstance(p.get("step"), int)):
        raise DamagedPointer(f'{path}: damaged, expected {{"checkpoint": "checkpoints/step-N", "step": N}}')
    return p


def _named_checkpoints(run_dir: str) -> set[str] | None:
    """The checkpoints the pointers name; None when a pointer is damaged (what it named cannot be told)."""
    named = set()
    for name in POINTERS:
        try:
            p = read_pointer(run_dir, name)
        except DamagedPointer:
            return None
        if p:
            named.add(p["checkpoint"])
    return named


def _resumable(ckpt_dir: str) -> bool:
    if not all(os.path.isfile(os.path.join(ckpt_dir, f)) for f in CHECKPOINT_FILES):
        return False
    try:
        with open(os.path.join(ckpt_dir, "state.json"), encoding="utf-8") as f:
            return isinstance(json.load(f).get("train_config"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_to_resume(run_dir: str, log=print) -> str:
    """The checkpoint folder --resume continues from: the one latest.json names. When latest.json is missing or
    damaged but the run holds checkpoints, the newest complete one, with a note saying so (a checkpoint that no
    pointer names is adopted with its own recorded recipe, never mixed with another's)."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise GuppyError(f"{run_dir}: exists and is not a folder; choose another --out")
    if not os.path.isdir(run_dir):
        raise GuppyError(f"{run_dir}: no such run folder; start without --resume")
    latest = os.path.join(run_dir, "latest.json")
    try:
        p = read_pointer(run_dir, "latest")
        if p is not None and os.path.isdir(os.path.join(run_dir, p["checkpoint"])):
            return os.path.join(run_dir, p["checkpoint"])
        problem = f"{latest}: names {p['checkpoint']}, which is not there" if p else f"{latest}: missing"
    except DamagedPointer as e:
        problem = str(e)
    found = list_checkpoints(run_dir)
    if not found and not os.path.lexists(latest):
        raise GuppyError(f"{run_dir}: nothing to resume (no latest.json, no checkpoints); start without --resume")
    for rel in reversed(found):
        if _resumable(os.path.join(run_dir, rel)):
            log(f"note: {problem}; resuming from {rel}, the newest complete checkpoint")
            return os.path.join(run_dir, rel)
    raise GuppyError(f"{problem}, and the run holds no complete checkpoint to resume from")


def _replace_dir(new: str, final: str):
    """Rename `new` to `final`, moving an existing `final` aside first (it is removed after)."""
    aside = None
    if os.path.isdir(final):
        aside = tempfile.mkdtemp(prefix=".tmp-replaced-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(aside, "old"))
    os.rename(new, final)
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def save_checkpoint(run_dir: str, step: int, model, model_cfg: ModelConfig, train_cfg: TrainConfig | None = None,
                    optimizer=None, scaler=None, rng: dict | None = None, extra: dict | None = None,
                    pointers=("latest",), run: dict | None = None, tensors: dict | None = None) -> str:
    """Write checkpoints/step-N atomically and point each name in `pointers` ("latest", "best") at it.
    `run` is what the run records about itself (preset, data fingerprint), kept in state.json. `tensors`: more of the
    training state, by name, into state.safetensors (a weight average's raw weights, guppy.train.WeightAverage)."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    rel = f"checkpoints/step-{step:07d}"
    final = os.path.join(run_dir, rel)
    if not (os.path.isdir(final) and rel in (_named_checkpoints(run_dir) or ())):
        tmp = tempfile.mkdtemp(prefix=f".tmp-step-{step:07d}-", dir=ckpt_root)
        try:
            _follow_umask(tmp, is_dir=True)
            sd = {k: v for k, v in model.state_dict().items() if k != TIED}
            _save_tensors(os.path.join(tmp, "model.safetensors"), sd, metadata={"format": "guppy"})
            _write_json(os.path.join(tmp, "config.json"), model_cfg.to_dict())
            state_tensors, state = {}, {"step": step, "extra": extra or {}}
            if train_cfg is not None:
                state["train_config"] = train_cfg.to_dict()
            if run is not None:
                state["run"] = run
            if optimizer is not None:
                t, state["optimizer"] = _flatten_optimizer(optimizer.state_dict())
                state_tensors.update(t)
            if scaler is not None and scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            for name, t in (rng or {}).items():
                state_tensors[f"rng.{name}"] = t
            state_tensors.update(tensors or {})
            _save_tensors(os.path.join(tmp, "state.safetensors"), state_tensors)
            _write_json(os.path.join(tmp, "state.json"), state)
            fsync_dir(tmp)
            _replace_dir(tmp, final)
            fsync_dir(ckpt_root)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
    for name in pointers:
        atomic_write_json(os.path.join(run_dir, f"{name}.json"), {"checkpoint": rel, "step": step, **(extra or {})})
    _remove_unreferenced(run_dir)
    return final


def _remove_unreferenced(run_dir):
    keep = _named_checkpoints(run_dir)
    root = os.path.join(run_dir, "checkpoints")
    for name in os.listdir(root):
        stale = name.startswith(".tmp-") or (keep is not None and _CHECKPOINT_NAME.match(name)
                                             and f"checkpoints/{name}" not in keep)
        if stale:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str, prefer: str = "best") -> str:
    """A checkpoint folder, a run folder (its best, else latest checkpoint), or an original GuppyLM .pt file."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise GuppyError(f"{path}: no such checkpoint or run folder")
    entries = os.listdir(path)  # a folder we may not read says so (PermissionError), rather than "no checkpoint"
    if "model.safetensors" in entries or "config.json" in entries:
        return path
    damaged = []
    for name in (prefer, "latest" if prefer == "best" else "best"):
        try:
            p = read_pointer(path, name)
        except DamagedPointer as e:
            damaged.append(str(e))
            continue
        if p and not os.path.isdir(os.path.join(path, p["checkpoint"])):
            damaged.append(f"{os.path.join(path, name)}.json: names {p['checkpoint']}, which is not there")
        elif p:
            for problem in damaged:  # the run is usable through its other pointer: say what was skipped
                print(f"note: {problem}; using {name}.json", file=sys.stderr)
            return os.path.join(path, p["checkpoint"])
    if damaged:
        raise GuppyError(damaged[0])
    raise GuppyError(f"{path}: no checkpoint in this folder (expected latest.json/best.json or model.safetensors)")


def read_model_config(path: str) -> ModelConfig:
    try:
        return ModelConfig.from_dict(_read_json(path, "model config"))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_run_record(ckpt: str) -> dict | None:
    """What the run recorded about itself in this checkpoint (preset, data fingerprint); None where nothing is
    recorded (an original GuppyLM .pt, or a checkpoint written before guppy recorded it)."""
    path = os.path.join(ckpt, "state.json")
    if os.path.isfile(ckpt) or not os.path.isfile(path):
        return None
    record = _read_json(path, "training state").get("run")
    return record if isinstance(record, dict) else None


def check_weights(model, sd: dict, where: str):
    """Load sd into model, saying which tensor does not fit (missing, unexpected, wrong shape, not finite)."""
    expected = model.state_dict()
    for k in sd:
        if k not in expected:
            raise GuppyError(f"{where}: unexpected tensor {k} (weights of another model?)")
    for k in expected:  # in the model's order: the first layer that does not fit is the one named
        if k not in sd:
            raise GuppyError(f"{where}: tensor {k} is missing")
        v = sd[k]
        if tuple(v.shape) != tuple(expected[k].shape):
            raise GuppyError(f"{where}: tensor {k} has shape {tuple(v.shape)}, the model config needs "
                             f"{tuple(expected[k].shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise GuppyError(f"{where}: tensor {k} holds NaN or infinite values (did the run diverge?)")
    model.load_state_dict(sd, strict=True)


def load_model(path: str, device="cpu", ops: str | None = None, prefer: str = "best"):
    """-> (GuppyLM, checkpoint folder or file). Reads guppy checkpoints, original GuppyLM .pt files, and the
    transformers folders of `guppy export --format hf` (guppy/hf.py)."""
    from . import hf
    from .model import GuppyLM
    from .ops import names as ops_names

    ckpt = resolve_checkpoint(path, prefer)
    if os.path.isfile(ckpt):
        model_cfg, sd = _read_guppylm_pt(ckpt)
        where = ckpt
    elif hf.is_hf_folder(ckpt):  # config.json names a model_type: GPT-2's tensor names, mapped back
        model_cfg = hf.model_config(ckpt, _read_json(os.path.join(ckpt, "config.json"), "transformers config"))
        where = os.path.join(ckpt, "model.safetensors")
        sd = hf.from_gpt2(_load_tensors(where), model_cfg, where)
        sd[TIED] = sd["tok_emb.weight"]
    else:
        cfg_path, where = os.path.join(ckpt, "config.json"), os.path.join(ckpt, "model.safetensors")
        for p in (cfg_path, where):
            if not os.path.isfile(p):
                raise GuppyError(f"{ckpt}: incomplete checkpoint, {os.path.basename(p)} is missing")
        model_cfg = read_model_config(cfg_path)
        sd = _load_tensors(where)
        if "tok_emb.weight" not in sd:
            raise GuppyError(f"{where}: tensor tok_emb.weight is missing")
        sd[TIED] = sd["tok_emb.weight"]
    if ops is not None:
        model_cfg.ops = ops
    if model_cfg.ops not in ops_names():
        raise GuppyError(f"{ckpt}: unknown ops {model_cfg.ops!r} in its config; choose one of: "
                         f"{', '.join(ops_names())}")
    model = GuppyLM(model_cfg)
    check_weights(model, sd, where)
    return model.to(device), ckpt


def _read_guppylm_pt(path: str):
    import pickle
    import zipfile
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message goes on to advise weights_only=False, i.e. running the file's code: never repeat that
        why = "it holds Python objects other than tensors, which guppy does not unpickle" \
            if "Weights only load failed" in str(e) else "not a PyTorch checkpoint"
        raise GuppyError(f"{path}: not a readable checkpoint ({why})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise GuppyError(f"{path}: not a readable checkpoint ({one_line(str(e).splitlines()[0])[:200]})") from None
    sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or "tok_emb.weight" not in sd \
            or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise GuppyError(f"{path}: not a GuppyLM checkpoint (no model_state_dict with tok_emb.weight)")
    try:
        vocab, d_model = sd["tok_emb.weight"].shape
        n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        cfg = dict(obj.get("config") or {}) if isinstance(obj.get("config"), dict) else {}
        cfg.update(vocab_size=vocab, d_model=d_model, n_layers=n_layers, max_seq_len=sd["pos_emb.weight"].shape[0],
                   ffn_hidden=sd["blocks.0.ffn.up.weight"].shape[0])
    except (KeyError, ValueError, IndexError) as e:
        raise GuppyError(f"{path}: not a GuppyLM checkpoint (its tensors do not describe one: {one_line(e)})") from None
    cfg.setdefault("n_heads", ModelConfig().n_heads)  # not recoverable from shapes; GuppyLM's is 6
    if TIED not in sd:
        sd[TIED] = sd["tok_emb.weight"]
    try:
        return ModelConfig.from_dict(cfg), sd
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_train_config(ckpt_dir: str) -> TrainConfig:
    """The recipe a training checkpoint was saved with (state.json's train_config)."""
    path = os.path.join(ckpt_dir, "state.json")
    state = _read_json(path, "training state")
    if not isinstance(state, dict) or not isinstance(state.get("train_config"), dict):
        raise GuppyError(f"{path}: cannot resume, it holds no train_config (not a training checkpoint)")
    try:
        return TrainConfig.from_dict(state["train_config"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_training_state(ckpt_dir: str) -> tuple[dict, dict]:
    """-> (state.json contents, tensors of state.safetensors) for --resume."""
    for name in CHECKPOINT_FILES:
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            raise GuppyError(f"{ckpt_dir}: cannot resume, incomplete checkpoint ({name} is missing)")
    path = os.path.join(ckpt_dir, "state.json")
    state = _read_json(path, "training state")
    if not isinstance(state, dict) or not isinstance(state.get("train_config"), dict) \
            or not isinstance(state.get("step"), int):
        raise GuppyError(f"{path}: cannot resume, it holds no train_config and step (not a training checkpoint)")
    tensors = _load_tensors(os.path.join(ckpt_dir, "state.safetensors"))
    try:
        if "optimizer" in state:
            state["optimizer"] = _unflatten_optimizer(tensors, state["optimizer"])
    except (KeyError, ValueError, TypeError, AttributeError):
        raise GuppyError(f"{path}: cannot resume, its optimizer state is damaged") from None
    state["rng"] = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    state.setdefault("extra", {})
    return state, tensors
