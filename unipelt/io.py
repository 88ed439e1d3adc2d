"""Files on disk: the one atomic-write helper, output-path checks, and adapter files.

**Writing.** A file or folder written with :func:`atomic_output` (adapters, ``compile --out``
and ``--graph``, ``merge``, ``export``, ``gates --plot``) is staged in a private sibling folder
``.NAME.tmp-PID-XXXXXXXX``, flushed to disk, given the modes the umask allows (``mkdtemp`` makes
0700), and renamed onto ``NAME`` only once complete. A failed or interrupted write leaves ``NAME``
as it was; the staging folder is removed on failure and, if the process was killed, by the next
write into the same folder (:func:`clean_stale`). A target that exists and is not of the kind
being written (an adapter directory, a PNG, a graph file) is refused, never replaced; so is a
target under a file, and any ``OSError`` (read-only disk, full disk, no permission) becomes one
:class:`~unipelt.errors.OutputError` naming the path.

**Adapter files.** ``DIR/adapter.safetensors`` holds the tensors under canonical keys;
``DIR/unipelt.json`` the spec, the base fingerprint and, since format version 2, the dtype,
shape and sha256 of every tensor's bytes (``tensors``). Loading verifies each, and refuses
non-finite values and integer or boolean tensors where the adapter has floating-point ones.
Version 1 files (no checksums) still load, with a warning that their integrity is unchecked.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from unipelt.errors import AdapterFileError, ModelError, OutputError, SpecError, UnipeltWarning

if TYPE_CHECKING:  # pragma: no cover
    from unipelt.handle import AdapterHandle
    from unipelt.registry import Registry

WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "unipelt.json"
FILE_FORMAT = "unipelt-adapter"
FILE_FORMAT_VERSION = 2  # 2: per-tensor dtype, shape and sha256 under "tensors"
READABLE_VERSIONS = (1, 2)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------
# output paths
# ------------------------------------------------------------------------------------------
def check_output_path(path: str | os.PathLike, *, kind: Literal["file", "dir"], what: str,
                      replaces: Callable[[Path], bool] | None = None) -> Path:
    """Check that ``path`` can receive a new ``kind`` (``"file"`` or ``"dir"``) and return it.

    Refused with :class:`OutputError` naming the path: an empty path; a path under a file; a
    directory where a file is to go or the reverse; and an existing, non-empty target for which
    ``replaces(target)`` is not true (``what`` names the kind in the message, e.g.
    ``"unipelt adapter directory"``). Nothing is created. Disk errors (read-only, full) are
    reported when writing, by :func:`atomic_output`.
    """
    if not str(path).strip():
        raise OutputError("an empty output path", path="")
    dest = Path(path)
    # the nearest existing ancestor must be a folder: `--out results.csv/adapter` is refused here,
    # not by a NotADirectoryError from mkdir
    for anc in dest.parents:
        if anc.exists() or anc.is_symlink():
            if not anc.is_dir():
                raise OutputError(f"{dest}: cannot write here: {anc} is a file, not a folder", path=str(dest))
            break
    if not (dest.exists() or dest.is_symlink()):
        return dest
    if kind == "dir":
        if not dest.is_dir():
            raise OutputError(f"{dest}: exists and is a file; the output is a folder ({what})", path=str(dest))
        if any(dest.iterdir()) and not (replaces is not None and replaces(dest)):
            raise OutputError(f"{dest}: exists and is not a {what}; refusing to replace it", path=str(dest))
    else:
        if dest.is_dir():
            raise OutputError(f"{dest}: is a folder; the output is a file ({what})", path=str(dest))
        if dest.stat().st_size > 0 and not (replaces is not None and replaces(dest)):
            raise OutputError(f"{dest}: exists and is not a {what}; refusing to replace it", path=str(dest))
    return dest


def is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def is_adapter_dir(path: Path) -> bool:
    return (path / META_FILE).is_file()


# ------------------------------------------------------------------------------------------
# the atomic-write helper
# ------------------------------------------------------------------------------------------
_TMP_TAG = ".tmp-"
# .NAME.tmp-PID-XXXXXXXX (ours), .NAME.tmp-PID (older single files), .NAME.tmp-XXXXXXXX (older
# mkdtemp folders, no pid), .NAME.old-PID (the previous version, while it is being swapped out)
_OURS_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d{1,7})-[a-z0-9_]{8}$")
_PID_ONLY_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d{1,7})$")
_NO_PID_RE = re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$")
_OLD_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d{1,7})$")
# A staging folder without a pid in its name is only removed once nothing in it has changed for
# this long and it predates this process: a concurrent writer of such a folder (an older unipelt,
# or train.py's checkpoints until they use this module) is never mid-write for an hour.
NO_PID_STALE_S = 3600.0


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # os.umask can only be read by setting it; set it straight back (not thread-safe, hence last)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _process_start(pid: int) -> float | None:
    """Start time of process ``pid`` (seconds since the epoch), where /proc says it."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5): starttime, after "pid (comm)"
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(l.split()[1]) for l in f if l.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, created: float) -> bool:
    """Whether the process that created a staging entry (at ``created``) may still be writing it.
    A pid in use by a process started after the entry was made is a reused pid, not the owner."""
    if pid == os.getpid() or os.name != "posix":
        return True  # on Windows os.kill(pid, 0) would terminate the process: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    except OSError:
        return True
    start = _process_start(pid)
    return start is None or start <= created + 1.0


def _newest_mtime(p: Path) -> float:
    newest = p.lstat().st_mtime
    if p.is_dir() and not p.is_symlink():
        for q in p.rglob("*"):
            try:
                newest = max(newest, q.lstat().st_mtime)
            except OSError:
                pass
    return newest


def clean_stale(parent: str | os.PathLike) -> list[Path]:
    """Remove staging entries left in ``parent`` by interrupted writes; returns what was removed.

    Only entries whose writer is gone: a ``.NAME.tmp-PID-...`` or ``.NAME.tmp-PID`` whose process
    has exited (or whose pid now belongs to a younger process), a ``.NAME.old-PID`` of an exited
    process when ``NAME`` exists (the swap finished), and an older pid-less ``.NAME.tmp-XXXXXXXX``
    unchanged for :data:`NO_PID_STALE_S` and older than this process. A concurrent writer's
    entries are kept. Never raises: cleaning is best effort.
    """
    removed: list[Path] = []
    d = Path(parent)
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    me_start = _process_start(os.getpid()) or time.time()
    now = time.time()
    for p in entries:
        name = p.name
        if not name.startswith(".") or (_TMP_TAG not in name and ".old-" not in name):
            continue
        try:
            created = p.lstat().st_mtime
            is_dir = p.is_dir() and not p.is_symlink()
            # each older pattern only in the form its writer made (a file, a folder), so that
            # another program's look-alike is left alone
            m = _OURS_RE.match(name) if is_dir else _PID_ONLY_RE.match(name)
            if m:
                stale = not _owner_alive(int(m.group("pid")), created)
            elif (m := _OLD_RE.match(name)) is not None and is_dir:
                stale = (d / m.group("name")).exists() and not _owner_alive(int(m.group("pid")), created)
            elif is_dir and _NO_PID_RE.match(name):
                newest = _newest_mtime(p)
                stale = newest < me_start and now - newest > NO_PID_STALE_S
            else:
                continue
            if not stale:
                continue
            if is_dir:
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            continue
    return removed


def _fsync_tree(root: Path) -> None:
    paths = [root] if root.is_file() else [q for q in root.rglob("*") if q.is_file()]
    for q in paths:
        with open(q, "rb") as f:
            os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    # makes the rename durable; not every platform or file system can open a folder
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first
        try:
            d.rmdir()
        except OSError:
            return


def _apply_umask(root: Path) -> None:
    """Give the staged tree the modes a plain ``open``/``mkdir`` would have: ``mkdtemp`` makes
    the folder 0700, and some writers (safetensors) create private 0600 files."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for q in root.rglob("*"):
        if q.is_symlink():
            continue
        if q.is_dir():
            os.chmod(q, 0o777 & ~mask)
        else:
            executable = q.stat().st_mode & 0o111
            os.chmod(q, (0o777 if executable else 0o666) & ~mask)


def swap_in_dir(tmp: Path, dest: Path) -> None:
    """Replace directory ``dest`` by the complete directory ``tmp``: the old one is renamed
    away first and removed only once the new one is in place."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(dest, old)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(old, dest)  # put the previous version back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dest)


_RUST_OS_ERROR = re.compile(r"os error (\d+)")


def _disk_error(e: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write: ``e`` itself, one it was raised from, or the one a
    Rust writer reports in its message (safetensors raises ``SafetensorError: ... I/O error: No
    space left on device (os error 28)``, also from inside ``save_pretrained``)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        if type(e).__name__ == "SafetensorError" and (m := _RUST_OS_ERROR.search(str(e))):
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _os_error(dest: Path, e: OSError, staging: Path | None = None) -> OutputError:
    reason = e.strerror or str(e) or type(e).__name__
    name = getattr(e, "filename", None)
    # the file that failed, unless it is the target itself or a staging folder (removed by now)
    shown = name is not None and str(name) != str(dest) and f"{os.sep}.{dest.name}{_TMP_TAG}" not in str(name) \
        and not (staging is not None and str(name).startswith(str(staging)))
    return OutputError(f"{dest}: cannot write: {reason}{f' ({name})' if shown else ''}", path=str(dest))


@contextmanager
def atomic_output(path: str | os.PathLike, *, kind: Literal["file", "dir"], what: str,
                  replaces: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Stage a new file or folder for ``path`` and put it in place only if the block succeeds.

        with atomic_output("out/graph.dot", kind="file", what="graph file") as staged:
            staged.write_text(text)

    Yields the path to write (a file path for ``kind="file"``, an empty folder for ``"dir"``).
    The target is checked first (:func:`check_output_path`), stale staging entries of earlier
    interrupted writes in its folder are removed (:func:`clean_stale`), and on success the content
    is fsynced, given the modes the umask allows, and renamed onto ``path``. On any failure the
    staging folder is removed and ``path`` is as it was; an ``OSError`` (read-only or full disk,
    permissions) is raised as :class:`OutputError` naming ``path``.
    """
    dest = check_output_path(path, kind=kind, what=what, replaces=replaces)
    # the folders this write creates, removed again (when empty) if it fails
    created = [a for a in [dest.parent, *dest.parent.parents] if not a.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(dest.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_TMP_TAG}{os.getpid()}-", dir=dest.parent))
    except OSError as e:
        _remove_empty(created)
        raise _os_error(dest, e) from None
    staged = tmp if kind == "dir" else tmp / dest.name
    try:
        yield staged
        if not staged.exists():
            raise OutputError(f"{dest}: nothing was written", path=str(dest))
        _fsync_tree(staged)
        _apply_umask(tmp)
        if kind == "dir":
            swap_in_dir(tmp, dest)
        else:
            os.replace(staged, dest)
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(e, OutputError):
            raise
        cause = _disk_error(e)
        if cause is None:
            raise
        raise _os_error(dest, cause, tmp) from None


def write_text(path: str | os.PathLike, text: str, *, what: str,
               replaces: Callable[[Path], bool] | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, kind="file", what=what, replaces=replaces) as staged:
        staged.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, what: str,
               replaces: Callable[[Path], bool] | None = None) -> Path:
    """Write ``data`` as indented JSON (and a newline) to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n", what=what, replaces=replaces)


# ------------------------------------------------------------------------------------------
# tensor records: dtype, shape, sha256
# ------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_sha256(t: Tensor) -> str:
    """sha256 of the tensor's bytes as safetensors stores them (C order, little-endian)."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian test machine
        raise AdapterFileError("checksums are defined on little-endian bytes; this machine is big-endian")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy())
    return h.hexdigest()


def tensor_records(tensors: dict[str, Tensor]) -> dict[str, dict]:
    return {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": tensor_sha256(t)}
            for k, t in tensors.items()}


def key_mismatch(expected: Any, got: Any) -> str | None:
    """``"missing keys: ...; unexpected keys: ..."`` (eight of each at most) or None when the key
    sets agree."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    return "; ".join(parts) or None


def verify_tensors(tensors: dict[str, Tensor], records: Any, *, weights: Path, meta_path: Path) -> None:
    """Compare the tensors read from ``weights`` with the records of ``unipelt.json``: the same
    keys, and per tensor the same dtype, shape and sha256. Raises AdapterFileError naming the file
    and the tensor."""
    if not isinstance(records, dict):
        raise AdapterFileError(f"{meta_path}: field 'tensors': missing or not a mapping")
    mismatch = key_mismatch(records, tensors)
    if mismatch:
        raise AdapterFileError(f"{weights}: the tensors do not match those recorded in {meta_path.name} ({mismatch})")
    for k, t in tensors.items():
        rec = records[k]
        if not isinstance(rec, dict) or not all(f in rec for f in ("dtype", "shape", "sha256")):
            raise AdapterFileError(f"{meta_path}: field 'tensors.{k}': expected dtype, shape and sha256")
        if _dtype_name(t.dtype) != rec["dtype"]:
            raise AdapterFileError(f"{weights}: tensor {k!r} has dtype {_dtype_name(t.dtype)}; "
                                   f"{meta_path.name} records {rec['dtype']}")
        if list(t.shape) != rec["shape"]:
            raise AdapterFileError(f"{weights}: tensor {k!r} has shape {tuple(t.shape)}; "
                                   f"{meta_path.name} records {tuple(rec['shape']) if isinstance(rec['shape'], list) else rec['shape']}")
        if tensor_sha256(t) != rec["sha256"]:
            raise AdapterFileError(f"{weights}: tensor {k!r}: the data does not match its checksum "
                                   f"in {meta_path.name} (the file is corrupt)")


def check_values(tensors: dict[str, Tensor], own: dict[str, Tensor], *, source: str) -> None:
    """Refuse tensors that would be silently cast or that poison the model: a non-floating tensor
    (int, bool) where the adapter's is floating, any other dtype change of a non-floating one, and
    NaN or infinite values."""
    for k, t in tensors.items():
        mine = own.get(k)
        if mine is None:
            continue
        if mine.is_floating_point() != t.is_floating_point() or (not mine.is_floating_point() and mine.dtype != t.dtype):
            raise AdapterFileError(f"{source}: tensor {k!r} has dtype {_dtype_name(t.dtype)}; the adapter's is "
                                   f"{_dtype_name(mine.dtype)}")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterFileError(f"{source}: tensor {k!r} has {bad} non-finite value{'s' if bad > 1 else ''} "
                                   "(NaN or infinity)")


# ------------------------------------------------------------------------------------------
# saving an adapter
# ------------------------------------------------------------------------------------------
def fingerprint(handle: AdapterHandle) -> dict:
    """Architecture and the shapes of every hook point the adapter attaches to."""
    sites = {}
    for bp in handle.graph.branches:
        sites[bp.site.key] = [bp.site.in_features, bp.site.out_features]
    info = handle.info
    return {
        "architecture": info.arch.name, "model_type": info.model_type,
        "num_layers": info.num_layers, "hidden_size": info.hidden_size, "sites": sites,
    }


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def metadata(handle: AdapterHandle) -> dict:
    from unipelt.spec import FORMAT_VERSION

    return {
        "format": FILE_FORMAT,
        "format_version": FILE_FORMAT_VERSION,
        "spec_format_version": FORMAT_VERSION,
        "name": handle.name,
        "spec": _jsonable(handle.spec.raw) if handle.spec.raw else None,
        "base": fingerprint(handle),
    }


def save_adapter(handle: AdapterHandle, path: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` and ``unipelt.json`` into directory ``path`` atomically.

    An existing adapter there is replaced only once the new one is complete; any other non-empty
    directory, or a file, is refused (OutputError). A NaN or infinite value (what load refuses) is
    a ModelError before anything is written. ``unipelt.json`` records each tensor's dtype,
    shape and sha256, which :func:`load_adapter` verifies.
    """
    from safetensors import torch as st

    dest = check_output_path(path, kind="dir", what="unipelt adapter directory", replaces=is_adapter_dir)
    meta = metadata(handle)
    handle.registry.hook.unipelt_adapter_saved(handle=handle, path=str(dest), metadata=meta)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in handle.state_dict().items()}
    for k, t in tensors.items():
        # what load refuses is not written: a diverged adapter would replace the one saved there
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(f"adapter {handle.name!r}: tensor {k!r} has {bad} non-finite value{'s' if bad > 1 else ''} "
                             f"(NaN or infinity); not saved ({dest} left as it was): the training diverged, or "
                             "the values were set so; load would refuse the file")
    meta["tensors"] = tensor_records(tensors)
    with atomic_output(dest, kind="dir", what="unipelt adapter directory", replaces=is_adapter_dir) as tmp:
        st.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FILE_FORMAT})
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=False)
            f.write("\n")
    return dest


# ------------------------------------------------------------------------------------------
# loading an adapter
# ------------------------------------------------------------------------------------------
def read_adapter_meta(path: str | os.PathLike) -> dict:
    """``unipelt.json`` of adapter directory ``path``, checked: format, version, spec, base."""
    d = Path(path)
    meta_path = d / META_FILE
    if not d.exists():
        raise AdapterFileError(f"{d}: no such adapter directory")
    if not d.is_dir():
        raise AdapterFileError(f"{d}: is a file, not an adapter directory")
    if not meta_path.is_file():
        raise AdapterFileError(f"{meta_path}: missing (not a unipelt adapter directory)")
    try:
        text = meta_path.read_text(encoding="utf-8")
    except OSError as e:
        raise AdapterFileError(f"{meta_path}: unreadable ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise AdapterFileError(f"{meta_path}: corrupt JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    if not text.strip():
        raise AdapterFileError(f"{meta_path}: empty (not a unipelt adapter file)")
    from unipelt.spec import loads_json

    try:
        # the spec loader's strict JSON: duplicate keys, non-finite numbers and deep nesting refused
        meta = loads_json(text)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{meta_path}: corrupt JSON ({e})") from None
    except RecursionError:
        raise AdapterFileError(f"{meta_path}: corrupt JSON (nested too deeply)") from None
    except ValueError as e:
        raise AdapterFileError(f"{meta_path}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FILE_FORMAT:
        raise AdapterFileError(f"{meta_path}: field 'format': expected {FILE_FORMAT!r}")
    version = meta.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        shown = repr(version) if len(repr(version)) <= 40 else repr(version)[:40] + "..."
        raise AdapterFileError(
            f"{meta_path}: field 'format_version': {shown} is not supported (this unipelt reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    for k in ("spec", "base"):
        if not isinstance(meta.get(k), dict):
            raise AdapterFileError(f"{meta_path}: field {k!r}: missing or not a mapping")
    if version >= 2 and not isinstance(meta.get("tensors"), dict):
        raise AdapterFileError(f"{meta_path}: field 'tensors': missing or not a mapping (format version {version} "
                               "records every tensor's checksum)")
    return meta


def read_weights(path: str | os.PathLike, meta: dict | None = None) -> dict[str, Tensor]:
    """The tensors of adapter directory ``path``, verified against the dtype, shape and sha256
    that ``unipelt.json`` records (``meta``, read when not given). A version 1 adapter has no
    records: it is read with a warning. Corrupt or unreadable files raise AdapterFileError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    meta = read_adapter_meta(d) if meta is None else meta
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{weights}: missing")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise AdapterFileError(f"{weights}: corrupt or unreadable safetensors file ({e})") from None
    if "tensors" in meta or meta.get("format_version", 1) >= 2:
        verify_tensors(tensors, meta.get("tensors"), weights=weights, meta_path=d / META_FILE)
    else:
        warnings.warn(f"{d / META_FILE}: format version 1 records no checksums: the integrity of {weights.name} "
                      "is not verified (save the adapter again to add them)", UnipeltWarning, stacklevel=3)
    return tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                 registry: Registry | None = None) -> AdapterHandle:
    """Attach a saved adapter to ``model`` (compiling its stored spec) and load its weights.

    A base model the adapter was not made for, a corrupt file, a tensor whose bytes do not match
    their checksum, a non-finite value, an unexpected dtype, or missing/unexpected tensors raise
    :class:`AdapterFileError` naming the file and the field or tensor; a name already attached to
    the model raises :class:`ModelError`. Either way the model is left as it was.
    """
    from unipelt.compiler import compile as _compile, get_state, triton_cannot_run
    from unipelt.executor import ENV_VAR
    from unipelt.spec import parse_spec

    d = Path(path)
    meta = read_adapter_meta(d)
    stored = meta.get("name")
    name = name or (stored if isinstance(stored, str) and stored else None) or "default"
    state = get_state(model)
    if state is not None and name in state.handles:
        raise ModelError(f"an adapter named {name!r} is already attached to this model; load {d} under "
                         "another name (name=...) or detach the attached one first")
    try:
        spec = parse_spec(meta["spec"], registry)
    except SpecError as e:
        raise AdapterFileError(f"{d / META_FILE}: field 'spec': {e}") from None
    spec.source = str(d / META_FILE)
    if spec.executor == "triton":
        # how the groups ran where it was trained, not what the adapter computes: an adapter trained
        # on a GPU with the kernels must still load on a CPU (eval there; merge and export load on
        # the CPU everywhere). The saved spec (spec.raw) keeps the choice for the next GPU.
        why = triton_cannot_run(model)
        if why is not None:
            # (UNIPELT_EXECUTOR=triton asks for it now: compile then refuses, naming the variable)
            if os.environ.get(ENV_VAR) != "triton":
                warnings.warn(f"{d / META_FILE}: the adapter was saved with executor 'triton', which cannot run "
                              f"here ({why}); it runs on the model's executor instead (auto unless UNIPELT_EXECUTOR, "
                              "an earlier adapter or set_executor chose another)", UnipeltWarning, stacklevel=3)
            spec.executor = None
    tensors = read_weights(d, meta)  # before compiling: a corrupt file never touches the model
    # what a refusal after the compile puts back, as a failed compile does: the compile made the
    # new adapter the active one (and may have set the model's executor)
    previous = None if state is None else (state.executor, state.ctx.expand_kernel, set(state.ctx.active))
    try:
        handle = _compile(model, spec, name, registry=registry)
    except (SpecError, ModelError) as e:
        raise AdapterFileError(f"{d}: the adapter does not fit this model: {e}") from None
    try:
        check_fingerprint(meta["base"], fingerprint(handle), d / META_FILE)
        # what plugins recorded at save (an AdapterFusion: the adapters it fuses), checked
        handle.registry.hook.unipelt_adapter_loaded(handle=handle, path=str(d), metadata=meta)
        handle.load_state_dict(tensors, source=str(d / WEIGHTS_FILE))
    except BaseException:
        handle.detach()
        if previous is not None and (after := get_state(model)) is not None:
            after.executor, after.ctx.expand_kernel = previous[:2]
            after.set_active(previous[2])
        raise
    return handle


def check_fingerprint(saved: dict, current: dict, source: Path) -> None:
    diffs = []
    for k in ("architecture", "model_type", "num_layers", "hidden_size"):
        if saved.get(k) != current.get(k):
            diffs.append(f"base.{k}: adapter {saved.get(k)!r}, model {current.get(k)!r}")
    ss, cs = saved.get("sites", {}), current.get("sites", {})
    if not isinstance(ss, dict):
        raise AdapterFileError(f"{source}: field 'base.sites': not a mapping")
    for k in sorted(set(ss) | set(cs)):
        if ss.get(k) != cs.get(k):
            diffs.append(f"base.sites.{k}: adapter {ss.get(k)!r}, model {cs.get(k)!r}")
    if diffs:
        shown = "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
        raise AdapterFileError(f"{source}: the adapter was made for another base model ({shown})")


# ------------------------------------------------------------------------------------------
# a clean base checkpoint from save_pretrained
# ------------------------------------------------------------------------------------------
def _saving_through_save_pretrained() -> bool:
    """Whether this ``state_dict()`` call comes from transformers' ``save_pretrained`` on behalf of
    a user (not of ``Trainer``, whose ``resume_from_checkpoint`` restores the model, adapter
    included, from the very file it writes)."""
    f = sys._getframe(2)
    through = False
    while f is not None:
        mod = f.f_globals.get("__name__", "")
        if mod == "transformers.trainer" or mod.startswith("transformers.trainer."):
            return False
        if f.f_code.co_name == "save_pretrained" and mod.startswith("transformers."):
            through = True
        f = f.f_back
    return through


def drop_adapter_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook of an adapted model: through ``save_pretrained``, leave out the adapter
    container (``unipelt.*``), so the saved checkpoint has exactly the base model's keys and
    ``from_pretrained`` of the base class loads it without an "unexpected keys" report.

    ``model.state_dict()`` itself keeps the adapter's tensors: torch users who save and reload an
    adapted model's state dict, copy it, or resume Trainer from its checkpoints get them back.
    Save the adapter with ``handle.save``."""
    from unipelt.compiler import CONTAINER

    if _saving_through_save_pretrained():
        for k in [k for k in state_dict if k.startswith(f"{prefix}{CONTAINER}.")]:
            del state_dict[k]


def install_clean_save(model: nn.Module):
    """Register :func:`drop_adapter_keys` on ``model``; returns the removable hook handle."""
    return model.register_state_dict_post_hook(drop_adapter_keys)


__all__ = [
    "WEIGHTS_FILE", "META_FILE", "FILE_FORMAT", "FILE_FORMAT_VERSION", "check_output_path", "atomic_output",
    "write_text", "write_json", "clean_stale", "swap_in_dir", "save_adapter", "read_adapter_meta", "read_weights",
    "load_adapter", "fingerprint", "metadata", "tensor_sha256", "check_values", "install_clean_save",
]
