"""The run directory and its checkpoints.

A run directory (``--out``) holds ``checkpoint-N/`` (``adapter/``, ``trainer_state.json``,
``training_state.pt``), the final ``adapter/`` and ``report.json``. Every write goes to a
temporary sibling and is renamed into place, so an interrupted save never leaves a half-written
checkpoint; the temporary folders such an interruption leaves (``.checkpoint-N.tmp-*``,
``.adapter.tmp-*``) are removed when the next run in that directory starts. A run holds an
exclusive lock on the directory (``.unipelt-run.lock``, released by the kernel when the process
dies): a folder found while holding it belongs to no live run, so removing it is safe.

Resuming compares the run's fingerprint (:func:`run_fingerprint`) with the checkpoint's.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unipelt.errors import AdapterFileError
from unipelt.errors import OutputError
from unipelt.training.options import TrainingError
from unipelt.training.record import REPORT_FILE

STATE_JSON = "trainer_state.json"
STATE_PT = "training_state.pt"
LOCK_FILE = ".unipelt-run.lock"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# what interrupted saves leave behind: ours (checkpoints, report) and AdapterHandle.save's (adapter)
_STALE_RE = re.compile(r"^\.(checkpoint-\d+|adapter|report\.json)\.(tmp|old)-")


# ------------------------------------------------------------------------------------------
# writing files
# ------------------------------------------------------------------------------------------
def write_error(path: Path, e: BaseException, what: str = "write") -> OutputError:
    """One error naming the path for a failed write (read-only disk, full disk, a file in the way)."""
    if isinstance(e, OSError) and e.strerror:
        reason = e.strerror
    else:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    hint = " (the disk is full)" if isinstance(e, OSError) and e.errno == errno.ENOSPC else ""
    return OutputError(f"{path}: cannot {what}: {reason}{hint}", path=str(path))


def _write_failures() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [OSError]
    try:  # safetensors reports its own I/O failures (a full disk) as SafetensorError
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return tuple(kinds)


def atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_error(path, e) from e


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def save_adapter(handle, dest: Path) -> Path:
    """``handle.save(dest)`` with a failed write reported as one error naming ``dest``."""
    try:
        return handle.save(dest)
    except _write_failures() as e:
        raise write_error(dest, e, "save the adapter") from e


# ------------------------------------------------------------------------------------------
# the run directory
# ------------------------------------------------------------------------------------------
def check_output_dir(out: Path) -> None:
    """Make sure ``out`` is, or can be made, a writable directory; else one error naming the path
    that is in the way (an existing file, a file above it, a read-only or full disk)."""
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                if p == out:
                    raise OutputError(f"{out}: exists and is not a directory; --out needs a directory", path=str(out))
                raise OutputError(f"{p}: is a file, so the run directory {out} cannot be created under it", path=str(out))
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e, "create the run directory") from e
    try:  # a read-only mount or a directory without write permission fails here, before any training
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise write_error(out, e, "write in the run directory") from e


class RunLock:
    """An exclusive ``flock`` on ``out/.unipelt-run.lock`` for the duration of a run."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self._file = None

    def acquire(self) -> bool:
        """True when held; False where there is no ``flock`` (Windows, a filesystem without locks):
        then the run goes on unlocked and nothing is cleaned. Held by another process: an error."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return False
        try:
            f = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise write_error(self.path, e) from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.close()  # a filesystem without locks (some network mounts): run unlocked, clean nothing
                return False
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise TrainingError(f"{self.path.parent}: another training run (process {holder}) is using this "
                                "directory; wait for it or choose another --out") from None
        try:  # the holder's pid, for the message a second run gets; a full disk only loses that
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
        except OSError:
            pass
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def remove_stale(out: Path) -> list[str]:
    """Remove what interrupted saves left in ``out`` (call only while holding the run lock);
    returns the names removed."""
    removed = []
    for p in sorted(out.iterdir()):
        if _STALE_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def prepare_out_dir(out: Path, *, resuming: bool, overwrite: bool) -> None:
    previous = list_checkpoints(out) + [p for p in (out / "adapter", out / REPORT_FILE) if p.exists()]
    previous += [p for p in out.glob("checkpoint-*")] if out.is_dir() else []
    if previous and not resuming:
        if not overwrite:
            raise TrainingError(f"{out}: holds an earlier training run ({previous[0].name}); "
                                "resume it (--resume) or start again (--overwrite)")
        for p in set(previous):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a ``trainer_state.json``) of a run, oldest first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_JSON).is_file() and (p / STATE_PT).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------------------
# the state of a run, saved and restored
# ------------------------------------------------------------------------------------------
@dataclass
class RunState:
    """Where a run is: ``step`` optimizer steps done, in ``epoch`` (0-based) at accumulation group
    ``group_in_epoch``, with the epoch's loss so far and the history of finished epochs."""

    step: int = 0
    epoch: int = 0
    group_in_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    epoch_loss: float = 0.0
    epoch_steps: int = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.group_in_epoch, self.epoch_loss, self.epoch_steps = epoch, 0, 0.0, 0

    def to_json(self, fingerprint: dict, total_steps: int) -> dict:
        return {"step": self.step, "epoch": self.epoch, "group_in_epoch": self.group_in_epoch,
                "total_steps": total_steps, "history": self.history, "epoch_loss_sum": self.epoch_loss,
                "epoch_steps": self.epoch_steps, "fingerprint": fingerprint}

    @classmethod
    def from_json(cls, state: dict) -> RunState:
        return cls(step=int(state["step"]), epoch=int(state["epoch"]), group_in_epoch=int(state["group_in_epoch"]),
                   history=list(state.get("history", [])), epoch_loss=float(state.get("epoch_loss_sum", 0.0)),
                   epoch_steps=int(state.get("epoch_steps", 0)))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def best_step(history: list[dict], task: str) -> int | None:
    """The step of the epoch with the best evaluation (classification: accuracy, then macro-F1;
    LM: the lowest loss; the earliest on a tie), or None without evaluations."""
    scored = [(e["step"], e["eval"]) for e in history if e.get("eval")]
    if not scored:
        return None
    if task == "classification":
        return max(scored, key=lambda s: (s[1]["accuracy"], s[1]["macro_f1"], -s[0]))[0]
    return min(scored, key=lambda s: (s[1]["loss"], s[0]))[0]


def save_checkpoint(out: Path, handle, optimizer, scheduler, state: dict, *, limit: int | None,
                    keep: int | None = None) -> Path:
    """Write ``out/checkpoint-{step}`` atomically; with ``limit``, then delete all but the newest
    ``limit`` checkpoints and ``checkpoint-{keep}`` (the best one)."""
    final = out / f"checkpoint-{state['step']}"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=out))
    except OSError as e:
        raise write_error(final, e, "write the checkpoint") from e
    try:
        handle.save(tmp / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / STATE_PT)
        with open(tmp / STATE_JSON, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, default=str)
            f.write("\n")
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, _write_failures()):
            raise write_error(final, e, "write the checkpoint") from e
        raise
    if limit:
        for old in list_checkpoints(out)[:-limit]:
            if keep is None or old.name != f"checkpoint-{keep}":
                shutil.rmtree(old, ignore_errors=True)
    return final


def resume_point(out: Path | None, resume) -> Path:
    if resume is True or resume == "latest":
        found = list_checkpoints(out) if out is not None else []
        if not found:
            raise TrainingError(f"{out}: no checkpoint to resume from (checkpoint-N with {STATE_JSON} and {STATE_PT})")
        return found[-1]
    p = Path(resume)
    if not (p / STATE_JSON).is_file() or not (p / STATE_PT).is_file() or not (p / "adapter").is_dir():
        raise TrainingError(f"{p}: not a complete checkpoint (needs adapter/, {STATE_JSON} and {STATE_PT})")
    return p


def load_checkpoint(ckpt: Path, state: dict, handle, optimizer, scheduler) -> RunState:
    from safetensors.torch import load_file

    from unipelt.handle import WEIGHTS_FILE

    weights = ckpt / "adapter" / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise AdapterFileError(f"{weights}: unreadable ({e})") from None
    handle.load_state_dict(tensors, source=str(weights))
    blob = torch.load(ckpt / STATE_PT, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return RunState.from_json(state)


# ------------------------------------------------------------------------------------------
# the run fingerprint
# ------------------------------------------------------------------------------------------
# Options a resumed run may change, with what the change means; every other fingerprint entry
# must match (a changed spec, data set or learning rate would continue another run's optimizer
# state as if it were this one's).
MAY_CHANGE = {
    "total_steps": "the run is extended or shortened; the learning-rate schedule is recomputed for the new "
                   "total, so with a decaying schedule the result differs from a run started with it",
    "eval_data": "the evaluation data changed; earlier epochs in the history were evaluated on the old data",
}


def digest(value: Any) -> str:
    """SHA-256 of a JSON-able value (canonical: sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def run_fingerprint(*, spec_raw: Any, model_name: str | None, task: str, labels: list[str] | None,
                    train_digest: str, examples: int, eval_digest: str | None, cfg, total_steps: int) -> dict:
    """What a checkpoint must share with the run that resumes it: the spec, the base model, the
    training data's content, and every option that shapes the trajectory."""
    return {
        "spec": digest(spec_raw), "model": model_name, "data": train_digest, "examples": examples,
        "task": task, "labels": labels, "max_length": cfg.max_length, "use_chat_template": cfg.use_chat_template,
        "lr": cfg.lr, "gate_lr": cfg.gate_lr, "weight_decay": cfg.weight_decay, "schedule": cfg.schedule,
        "warmup_steps": cfg.warmup_steps, "warmup_ratio": cfg.warmup_ratio, "max_grad_norm": cfg.max_grad_norm,
        "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
        "total_steps": total_steps, "eval_data": eval_digest,
        # a quantized base or another optimizer continues a different trajectory (an 8-bit
        # optimizer's state does not even load into AdamW's)
        "quantize": getattr(cfg, "quantize", None), "optim": getattr(cfg, "optim", "adamw"),
    }


def _show(key: str, value: Any) -> str:
    if key in ("spec", "data", "eval_data") and isinstance(value, str):
        return f"sha256 {value[:12]}"
    return repr(value)


def read_checkpoint_state(ckpt: Path, fingerprint: dict) -> tuple[dict, list[str]]:
    """The checkpoint's state, after comparing fingerprints: a difference in anything but
    ``MAY_CHANGE`` is refused, listing every change; the allowed changes come back as notes."""
    try:
        state = json.loads((ckpt / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"{ckpt / STATE_JSON}: unreadable ({e})") from None
    saved = state.get("fingerprint") or {}
    refused, notes, unrecorded = [], [], []
    for key, now in fingerprint.items():
        if key not in saved:
            unrecorded.append(key)
            continue
        was = saved[key]
        if was == now:
            continue
        change = f"{key} ({_show(key, was)} in the checkpoint, {_show(key, now)} now)"
        if key in MAY_CHANGE:
            notes.append(f"{change}: {MAY_CHANGE[key]}")
        else:
            refused.append(change)
    if unrecorded:
        notes.append(f"not recorded by this checkpoint (an older unipelt), so not checked: {', '.join(unrecorded)}")
    if refused:
        raise TrainingError(f"{ckpt}: this checkpoint belongs to a different run; changed: {'; '.join(refused)}. "
                            "Resume with the same spec, model, data and options, or start again with --overwrite")
    return state, notes
