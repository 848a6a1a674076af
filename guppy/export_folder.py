"""The export folder: what makes `guppy export` (guppy/export.py, both formats) safe for the folder it writes into.
The checks on --out, the manifest, the lock beside the folder, the work folder the export is built in, the swap, and
the recovery of what a killed export left. guppy/export.py uses it as

    writes = files_written(format, runtime_dir)
    inspect_target(out_dir, force, writes)               # before any work: one line if --out is not for this export
    ...
    with building(out_dir, force, writes, format, ckpt, fingerprint) as (new, work):
        ...                                              # the export's files into `new`; scratch files into `work`

The folder: never deleting what the export did not write.
- What --out may be: new, empty, or an earlier export (its manifest; or, for an export made before manifests, the
  model.onnx + config.json + index.html, or the transformers config.json, of one), and then only with --force.
  Refused: a file; a run or a checkpoint (checkpoints/, latest.json, best.json, state.json, metrics.jsonl); a
  dataset (meta.json, train/eval .jsonl and arrays); any other non-empty folder; a damaged manifest; and a path this
  export writes that holds something the earlier export did not write (the user's README.md in a manifest-less
  folder's place, a folder named model.onnx).
- What --force replaces: the files the earlier export's manifest lists (for an older export, those of ONNX_FILES /
  HF_FILES / ort/ it holds), whether the user edited them or not. Files it lists that this export does not write
  (ort/ after an export without --runtime-dir) go. Everything else in the folder stays: NOTES.txt, .gitattributes,
  .git/, a file written into the folder while the export runs.
- The lock: PARENT/.guppy-export-NAME.lock, flock'ed for the whole export (taken after the cheap checks, before the
  model is exported), so a second export into the same folder is refused in one line naming the first. The kernel
  drops it when its holder dies; the file is removed when it is let go.
- The build: in a work folder beside the target, PARENT/.guppy-export-XXXX/ (same filesystem, so renames are
  atomic), whose journal.json names the target and the export's random id (also in the manifest) and says whether
  the swap has begun. The new folder, WORK/new/, gets every file of the export, the manifest last, all fsync'ed.
- The user's files: just before the swap, every file of the target that the earlier export did not write is
  hard-linked (copied where links fail) into WORK/new/, in its folders. At the swap the new folder thus already
  holds them: the target never lacks a user's file that existed before the export began (save one that can be
  neither linked nor copied, a socket say, which the merge below moves across a moment after the swap).
- The swap: renameat2(RENAME_EXCHANGE) (macOS: renamex_np(RENAME_SWAP)) exchanges WORK/new and the target in one
  step: the target's name is the complete old folder up to that instant and the complete new one after it. The old
  folder (now in the work folder) is then merged back: what of the user's is in it but not in the target (a file
  written during the export after the links were made, a socket) is renamed across, a file that differs from the
  target's copy is kept as NAME.guppy-kept-N; then the work folder goes. A new target is one rename. Where no
  exchange exists, the target is renamed into the work folder and the new folder onto its name: for the instant in
  between the name is missing, and the next export puts it back (below).
- kill -9 at any point leaves the target either the complete old export or the complete new one, never a mix, and the
  user's files in it. What it can leave is the work folder (and the lock file). The next export into any folder of
  that parent finds it (while its target's lock is free) and runs `recover`: before the swap it is deleted; after,
  the user's files still in it are moved into the target (and a missing target gets its complete folder back); then
  it is deleted. `building` runs the same `recover` on its own work folder when it ends, however it ends.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import stat
import tempfile
import time

from guppy import hf
from guppy.checkpoint import fsync_dir
from guppy.errors import GuppyError, one_line
from guppy.runlock import EXPORT_KIND, folder_kind

MANIFEST = ".guppy-export.json"   # the export's record of itself: its files with their sha256, the run's fingerprint
WORK_PREFIX = ".guppy-export-"    # PARENT/.guppy-export-XXXX/: an export being built; PARENT/.guppy-export-NAME.lock
JOURNAL = "journal.json"          # in a work folder: its target, its export's id, and whether the swap has begun
STALE_WORK_S = 600                # a work folder without a journal (an older guppy's, or one killed at once) this old
# What each format writes; a folder without a manifest (an export of guppy before it wrote one) holding model.onnx,
# config.json and index.html, or a transformers config.json, is taken to be an export of these files.
ONNX_FILES = ("model.onnx", "tokenizer.json", "persona.json", "config.json", "README.md", "index.html", "chat.js",
              "tokenizer.js", "runtime.json")
HF_FILES = hf.FILES


@contextlib.contextmanager
def building(out_dir: str, force: bool, writes: set[str], format: str, ckpt: str, fingerprint: dict):
    """Build an export into out_dir, as the module header says: yields (new, work), the empty folder the export's
    files go into and the work folder around it (for intermediate files). On the way in: the lock, the stale work
    folders of the parent put right, out_dir checked again (inspect_target), the work folder and its journal. When the
    block ends without an exception: the manifest, everything fsync'ed, the user's files carried into `new`, and the
    swap. However it ends: the work folder recovered and removed, the lock let go, and on a failure the folders made
    for out_dir's parent removed again."""
    target = os.path.realpath(out_dir)  # a link to a folder: the folder it names is swapped, never the link
    parent = os.path.dirname(target)
    made = missing_parents(parent)
    os.makedirs(parent, exist_ok=True)
    done = False
    try:
        with ExportLock(target, out_dir):
            clean_stale(parent, target)
            earlier = inspect_target(out_dir, force, writes)
            export_id = os.urandom(8).hex()
            work = tempfile.mkdtemp(prefix=WORK_PREFIX, dir=parent)
            try:
                write_journal(work, target, export_id, "building")
                new = os.path.join(work, "new")
                os.mkdir(new)
                if os.path.isdir(target):
                    shutil.copymode(target, new)
                yield new, work
                write_manifest(new, export_id, format, ckpt, fingerprint)
                sync_tree(new)
                if os.path.isdir(target):
                    carry_foreign(target, new, earlier, out_dir)
                write_journal(work, target, export_id, "swapping")
                swap_in(work, new, target, earlier)
                fsync_dir(parent)
            finally:
                recover(work)  # the old folder's user files into the target, if a swap began; then the work folder
        done = True
    finally:
        if not done:
            for d in made:  # a failed export leaves no folder it created
                try:
                    os.rmdir(d)
                except OSError:
                    break


# ---- what --out may be ---------------------------------------------------------------------------------------------
def files_written(format: str, runtime_dir) -> set[str]:
    """The paths (relative to the folder) an export of this format writes, its manifest included."""
    from guppy.web import ORT_WEB_FILES

    names = set(HF_FILES if format == "hf" else ONNX_FILES) | {MANIFEST}
    if format == "onnx" and runtime_dir is not None:
        names |= {f"ort/{n}" for n in ORT_WEB_FILES}
    return names


def inspect_target(out_dir: str, force: bool, writes: set[str]) -> set[str]:
    """The files of an earlier export in out_dir, which this one may replace (empty for a new or empty folder).
    Refused, in one line: a file; a run, a checkpoint or a dataset; a folder no export wrote; an export without
    --force; and a file that is not the earlier export's where this one writes a file."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise GuppyError(f"{out_dir}: exists and is not a folder")
    if not os.path.isdir(out_dir):
        return set()
    names = set(os.listdir(out_dir))
    if not names:
        return set()
    kind = folder_kind(out_dir)  # a run, a checkpoint or a dataset (runlock.KINDS)
    if kind and kind[0] != EXPORT_KIND:
        raise GuppyError(f"{out_dir}: holds {kind[0]} ({', '.join(kind[1][:3])}), not an earlier export; an export "
                         "never replaces it: choose another --out")
    ours = export_files(out_dir)
    if ours is None:
        raise GuppyError(f"{out_dir}: not empty and not an earlier export (no {MANIFEST}, nor the model.onnx, "
                         "config.json and index.html of an older one); choose a new folder")
    if not force:
        raise GuppyError(f"{out_dir}: already holds an export; pass --force to replace it (the files the export "
                         "wrote; the folder's other files are kept)")
    for rel in sorted(writes):
        clash = _clash(out_dir, rel, ours)
        if clash:
            raise GuppyError(f"{os.path.join(out_dir, clash)}: not a file of the earlier export, and this export "
                             f"writes {rel}; move it away, or choose another --out")
    return ours


def _clash(folder: str, rel: str, ours: set[str]) -> str | None:
    """The first path on the way to folder/rel that this export may not replace (the user's file, or a folder where
    it writes a file), else None."""
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        sub = "/".join(parts[:i])
        try:
            st = os.lstat(os.path.join(folder, sub))
        except FileNotFoundError:
            return None
        if i < len(parts):
            if not stat.S_ISDIR(st.st_mode):
                return sub
        elif stat.S_ISDIR(st.st_mode) or sub not in ours:
            return sub
    return None


def export_files(folder: str) -> set[str] | None:
    """The files an export wrote in folder: what its manifest lists, or for an export older than the manifest, those
    of ONNX_FILES / HF_FILES it holds. None when the folder is not an export."""
    manifest = read_manifest(folder)
    if manifest is not None:
        return set(manifest["files"]) | {MANIFEST}
    from guppy.hf import is_hf_folder
    from guppy.web import ORT_WEB_FILES

    if all(os.path.isfile(os.path.join(folder, n)) for n in ("model.onnx", "config.json", "index.html")):
        names = set(ONNX_FILES) | {f"ort/{n}" for n in ORT_WEB_FILES}
    elif is_hf_folder(folder):
        names = set(HF_FILES)
    else:
        return None
    return {n for n in names if os.path.lexists(os.path.join(folder, n))
            and not os.path.isdir(os.path.join(folder, n))} | {MANIFEST}


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(r, str) and _relative(r) for r in files):
            raise ValueError("its file list is not a list of paths inside the folder")
    except (ValueError, KeyError, TypeError) as e:
        raise GuppyError(f"{path}: damaged ({one_line(e)[:120]}): which files are the export's cannot be told; "
                         "choose a new --out") from None
    return manifest


def _relative(rel: str) -> bool:
    return bool(rel) and not os.path.isabs(rel) and os.path.normpath(rel) == rel and rel.split("/")[0] != ".." \
        and rel != MANIFEST


def _manifest_id(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f).get("id")
    except (OSError, ValueError, AttributeError):
        return None


# ---- the manifest, the lock, the swap ------------------------------------------------------------------------------
def write_manifest(new: str, export_id: str, format: str, ckpt: str, fingerprint: dict):
    from guppy.data import file_sha256

    files = {}
    for d, _, names in os.walk(new):
        for n in names:
            p = os.path.join(d, n)
            files[os.path.relpath(p, new).replace(os.sep, "/")] = file_sha256(p)
    manifest = {"guppy_export": 1, "id": export_id, "format": format, "checkpoint": os.path.abspath(ckpt),
                "created": datetime.datetime.now().isoformat(timespec="seconds"), "fingerprint": fingerprint,
                "files": dict(sorted(files.items()))}
    with open(os.path.join(new, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_journal(work: str, target: str, export_id: str, phase: str):
    tmp = os.path.join(work, JOURNAL + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"target": target, "id": export_id, "phase": phase, "pid": os.getpid()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(work, JOURNAL))


def _read_journal(work: str) -> dict | None:
    try:
        with open(os.path.join(work, JOURNAL)) as f:
            journal = json.load(f)
    except (OSError, ValueError):
        return None
    return journal if isinstance(journal, dict) and isinstance(journal.get("target"), str) else None


def sync_tree(folder: str):
    """The export's files on disk before the swap names them (a power cut leaves the old export, not empty files)."""
    for d, _, names in os.walk(folder):
        for n in names:
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(d)


def missing_parents(path: str) -> list[str]:
    """The folders `os.makedirs(path)` would create, deepest first."""
    made = []
    while path and not os.path.exists(path):
        made.append(path)
        up = os.path.dirname(path)
        if up == path:
            break
        path = up
    return made


class ExportLock:
    """An exclusive flock on PARENT/.guppy-export-NAME.lock while an export into PARENT/NAME works: a second export
    into the same folder is refused at once, in one line naming the first (guppy.runlock.holder). The kernel drops
    the lock when its holder dies, however it dies. The file is removed on release; the holder checks after locking
    that the file it locked is still the one at that name (one removed meanwhile by a holder letting go is not)."""

    def __init__(self, target: str, shown: str):
        self.path = os.path.join(os.path.dirname(target), f"{WORK_PREFIX}{os.path.basename(target)}.lock")
        self.shown, self.fd = shown, None

    def __enter__(self):
        import fcntl
        import socket

        from guppy.runlock import holder

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise GuppyError(f"{self.shown}: in use by {holder(self.path)}; wait for it to end, or choose "
                                 "another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": "an export",
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        return False


def clean_stale(parent: str, target: str):
    """Work folders of exports that were killed: each is put right (recover) and removed, when the lock of its
    target is free (ours is held by this export). Twice over: one that waits for its target to be back (another
    work folder restores it) gets a second turn."""
    pending = []
    for name in sorted(os.listdir(parent)):
        work = os.path.join(parent, name)
        if not name.startswith(WORK_PREFIX) or os.path.islink(work) or not os.path.isdir(work):
            continue
        if _read_journal(work) is None:  # killed before it wrote its journal, or an older guppy's: scratch only
            if time.time() - os.lstat(work).st_mtime > STALE_WORK_S:
                shutil.rmtree(work, ignore_errors=True)
            continue
        pending.append(work)
    for _ in range(2):
        pending = [work for work in pending if not _recover_stale(work, parent, target)]


def _recover_stale(work: str, parent: str, target: str) -> bool:
    journal = _read_journal(work)
    if journal is None:  # gone meanwhile: its export finished
        return True
    other = journal["target"]
    if other == target:
        return recover(work)
    if os.path.dirname(other) != parent:  # not a folder of this parent's: not for this export to touch
        return True
    try:
        with ExportLock(other, other):
            return recover(work)
    except (GuppyError, OSError):  # that export is running (or its folder cannot be fixed from here)
        return True


def swap_in(work: str, new: str, target: str, earlier: set[str]):
    """Make the complete folder `new` the target in one step; then move the old folder's user files across."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    old = os.path.join(work, "old")
    if _exchange(new, target):
        os.rename(new, old)
    else:  # no atomic exchange here: two renames, and recover puts back whichever is missing after a kill
        os.rename(target, old)
        os.rename(new, target)
    _merge_back(old, target, earlier)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step: Linux renameat2(RENAME_EXCHANGE), macOS renamex_np(RENAME_SWAP). False where
    neither the system nor the filesystem has it."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    fa, fb = os.fsencode(a), os.fsencode(b)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        result = fn(-100, fa, -100, fb, 2)  # AT_FDCWD, RENAME_EXCHANGE
    else:
        fn = getattr(libc, "renamex_np", None)
        if fn is None:
            return False
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        result = fn(fa, fb, 2)  # RENAME_SWAP
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def carry_foreign(old: str, new: str, ours: set[str], shown: str, rel: str = ""):
    """Hard-link (else copy) into `new` every file of `old` that its export did not write (`ours`), folders
    recreated, symbolic links as links: at the swap the target already holds the user's files. What cannot be linked
    or copied here (a socket, an unreadable folder) is moved across after the swap (_merge_back)."""
    for name in os.listdir(os.path.join(old, rel)):
        r = f"{rel}/{name}" if rel else name
        src, dst = os.path.join(old, r), os.path.join(new, r)
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            made = not os.path.lexists(dst)
            if made:
                os.mkdir(dst)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
            elif os.path.islink(dst) or not os.path.isdir(dst):
                raise GuppyError(f"{os.path.join(shown, r)}: a folder of the user's where this export writes a file; "
                                 "move it away, or choose another --out")
            try:
                carry_foreign(old, new, ours, shown, r)
            except PermissionError:
                if made:
                    shutil.rmtree(dst, ignore_errors=True)
                continue
            if made and not os.listdir(dst) and os.listdir(src):  # it held only the earlier export's files (ort/)
                os.rmdir(dst)
        elif r in ours:
            continue
        elif os.path.lexists(dst):  # it appeared in the folder during the export
            raise GuppyError(f"{os.path.join(shown, r)}: not a file of the earlier export, and this export writes "
                             f"{r}; move it away, or choose another --out")
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(st.st_mode):
            try:
                os.link(src, dst, follow_symlinks=False)
            except OSError:
                try:
                    shutil.copy2(src, dst)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.remove(dst)


def _merge_back(old: str, new: str, ours: set[str], rel: str = ""):
    """After the swap: everything of the user's in `old` (what the target was) that `new` (the target now) lacks is
    moved across: files written after carry_foreign ran, and what it could not link. A file that is in both but
    differs is kept beside as NAME.guppy-kept-N: nothing of the user's is ever dropped."""
    try:
        names = os.listdir(os.path.join(old, rel))
    except PermissionError:
        _keep_beside(os.path.join(old, rel), os.path.join(new, rel))
        return
    for name in names:
        r = f"{rel}/{name}" if rel else name
        src, dst = os.path.join(old, r), os.path.join(new, r)
        st = os.lstat(src)
        if stat.S_ISDIR(st.st_mode):
            if not os.path.lexists(dst) and not any(o.startswith(r + "/") for o in ours):
                os.rename(src, dst)  # a folder of the user's, whole
            elif not os.path.lexists(dst):  # a folder that held the earlier export's files: the rest of it, if any
                os.mkdir(dst)
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                _merge_back(old, new, ours, r)
                if not os.listdir(dst):
                    os.rmdir(dst)
            elif os.path.isdir(dst) and not os.path.islink(dst):
                _merge_back(old, new, ours, r)
            else:
                _keep_beside(src, dst)
        elif r in ours:
            continue
        elif not os.path.lexists(dst):
            os.rename(src, dst)
        elif not _same_file(src, dst, st):
            _keep_beside(src, dst)


def _same_file(a: str, b: str, sa) -> bool:
    import filecmp

    sb = os.lstat(b)
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    if stat.S_ISLNK(sa.st_mode) and stat.S_ISLNK(sb.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISREG(sa.st_mode) and stat.S_ISREG(sb.st_mode) and sa.st_size == sb.st_size:
        try:
            return filecmp.cmp(a, b, shallow=False)
        except OSError:
            return False
    return False


def _keep_beside(src: str, dst: str):
    n = 1
    while os.path.lexists(f"{dst}.guppy-kept-{n}"):
        n += 1
    os.rename(src, f"{dst}.guppy-kept-{n}")


def recover(work: str) -> bool:
    """Finish or undo what the export of a work folder left, then remove the folder; False (the folder kept) when its
    target is missing and cannot be restored from it. Before the swap began (journal phase "building") the target
    was never touched: the folder goes. Once it began ("swapping"): if the target is missing (a kill between the two
    renames where the system cannot exchange), the complete new folder is renamed into place (else the old one
    back); then whatever of the user's is still in the old folder (the one whose manifest id is not this export's)
    is moved across (_merge_back). Run at the end of every export and on stale work folders."""
    journal = _read_journal(work)
    if journal and journal.get("phase") == "swapping":
        target, export_id = journal["target"], journal.get("id")
        new, old = os.path.join(work, "new"), os.path.join(work, "old")
        if not os.path.lexists(target):
            back = new if os.path.isdir(new) and _manifest_id(new) == export_id else old
            if not os.path.isdir(back):
                return False
            os.rename(back, target)
        for folder in (new, old):
            if os.path.isdir(folder) and _manifest_id(folder) != export_id:
                try:
                    ours = export_files(folder) or set()
                except GuppyError:  # its manifest is damaged: every file goes across (as .guppy-kept-N)
                    ours = set()
                _merge_back(folder, target, ours)
    shutil.rmtree(work, ignore_errors=True)
    return True
