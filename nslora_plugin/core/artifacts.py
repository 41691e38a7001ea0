"""What a run leaves behind under `<output_dir>/nslora/`, and loading it back with one call.

    prompt.json            current system prompt, its version and the initial one
    prompt_history.jsonl   every candidate (accepted or not) with editor, scores and reason
    decisions.jsonl        every routing decision / edit verdict / editor fault, with its reason
    probe_reports.jsonl    one summary line per probe evaluation
    augmented.jsonl        augmented training rows ("prompts as data"); also `augmented/` as a
                           `datasets` folder (`datasets.load_from_disk`)
    state.json             loop state (router, monitor, usage) used on resume
    config.json            the NSLoRAConfig of the run (no secrets: keys are never in it)
    summary.json           before/after numbers, written at the end
    versions.json          Python, torch, transformers, TRL, PEFT, ... versions of the run
    train_log.jsonl        the trainer's log history (loss, grad norm, learning rate), at the end
    report.html            the run report (`nslora report`, or `report: true`), at the end

The folder is copied into every `checkpoint-N/` and into the final output folder so that an
adapter and its prompt always travel together.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from nslora_plugin.core.util import read_jsonl_tolerant, redact

ARTIFACT_DIR = "nslora"
_NOT_COPIED = ("editor_logs", "editor_cache")


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask cannot be read without setting it


def _atomic_write(path: Path, text: str) -> None:
    """Write `text` in full or not at all (a temporary file, then a rename), secrets scrubbed,
    with the mode a plain `open()` would give (mkstemp's own is 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(redact(text))
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """`_atomic_write` for bytes that are already scrubbed (log lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_copy(src: str, dst: str) -> str:
    """`shutil.copy2` whole or not at all (a temporary next to `dst`, then a rename)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=f".{os.path.basename(dst)}.")
    os.close(fd)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dst


def _save_dataset(root: Path, rows: list[dict[str, Any]]) -> None:
    """`rows` as a `datasets` folder `root/augmented` (written aside, then renamed into place)."""
    from datasets import Dataset

    target = root / "augmented"
    tmp = root / ".augmented.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        Dataset.from_list(rows).save_to_disk(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def append_line(path: Path, line: bytes) -> None:
    """Append `line` whole or not at all: a write the disk cut short is truncated back off."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def folder_problem(path: str | Path) -> str | None:
    """Why a folder cannot be made at `path` (it, or a folder above it, is a file), or None."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if candidate.is_dir():
                return None
            return (f"{str(candidate)!r} is a file, not a folder" if candidate == path else
                    f"{str(candidate)!r}, a folder above it, is a file")
    return None


class RunFolderInUse(RuntimeError):
    """Another run holds this artifacts folder."""


class ArtifactStore:
    """The run folder. A failed write (a full disk, a lost mount) never raises into training: it
    is reported through `on_error(file, exc)`, leaves no torn file behind (whole files are
    written to a temporary and renamed; a log line that did not fit is cut back off), and is
    retried — log lines are kept in order until they fit, whole files are kept in memory and
    written again at the next flush. What the folder could not take (`missing`) goes from memory
    into every copy (`copy_into`: a checkpoint, the end-of-run copy, a folder the user names), so
    a copy on a disk with room is complete even when the run folder is not."""

    LOCK = ".run.lock"

    def __init__(self, root: str | Path, on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock: Any = None
        self.on_error = on_error or (lambda name, exc: None)
        self._pending: dict[str, list[bytes]] = {}  # log lines not written yet, per file, in order
        #: whole files not written yet: name -> writer(folder), the latest version of each
        self._unwritten: dict[str, Callable[[Path], None]] = {}
        self.errors: dict[str, str] = {}  # file -> why its last write in the run folder failed
        #: the last `copy_into`: (its folder, whether everything reached it)
        self.last_copy: tuple[Path, bool] | None = None

    def _guard(self, name: str, write: Callable[[], None]) -> bool:
        try:
            write()
            return True
        except OSError as exc:
            self.on_error(name, exc)
            return False

    def _write_whole(self, name: str, writer: Callable[[Path], None]) -> bool:
        """Write a whole file (or folder) of the run folder; if it fails, keep `writer` for the
        next flush and for the copies."""
        try:
            writer(self.root)
        except OSError as exc:
            self._unwritten[name] = writer
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            self.on_error(name, exc)
            return False
        self._unwritten.pop(name, None)
        self.errors.pop(name, None)
        return True

    @property
    def pending_lines(self) -> int:
        return sum(len(v) for v in self._pending.values())

    @property
    def missing(self) -> dict[str, int | None]:
        """What the run folder lacks: log file -> lines not written yet, whole file -> None."""
        out: dict[str, int | None] = {name: len(lines) for name, lines in self._pending.items() if lines}
        out.update({name: None for name in self._unwritten})
        return dict(sorted(out.items()))

    def lock(self) -> None:
        """Hold the folder for this run. A second run on it stops here, with the reason; the lock
        is the OS's (flock), so a killed run leaves nothing stale behind."""
        from filelock import FileLock, Timeout

        if self._lock is not None:
            return
        lock = FileLock(str(self.path(self.LOCK)))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderInUse(
                f"NSLoRA: another run is writing to {str(self.root)!r} (it holds {self.LOCK}); give "
                "this run its own output_dir (or NSLoRA output_dir), or stop the other run first") from None
        self._lock = lock

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def path(self, name: str) -> Path:
        return self.root / name

    def write_json(self, name: str, data: Any) -> bool:
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
        return self._write_whole(name, lambda root: _atomic_write(root / name, text))

    def append_jsonl(self, name: str, row: dict[str, Any]) -> bool:
        line = (redact(json.dumps(row, ensure_ascii=False, default=str)) + "\n").encode("utf-8")
        self._pending.setdefault(name, []).append(line)
        return self.flush(name)

    def flush(self, name: str | None = None) -> bool:
        """Write the log lines still pending (all files when `name` is None, and then the whole
        files kept in memory too); False if some still do not fit."""
        ok = True
        for key in [name] if name is not None else list(self._pending):
            lines = self._pending.get(key) or []
            while lines:
                try:
                    append_line(self.path(key), lines[0])
                except OSError as exc:
                    self.errors[key] = f"{type(exc).__name__}: {exc}"
                    self.on_error(key, exc)
                    ok = False
                    break
                lines.pop(0)
            if not lines:
                self.errors.pop(key, None)
        if name is None:
            for key, writer in list(self._unwritten.items()):
                ok = self._write_whole(key, writer) and ok
        return ok

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> bool:
        text = _jsonl(rows)
        return self._write_whole(name, lambda root: _atomic_write(root / name, text))

    def write_prompt(self, current: str | None, version: int, initial: str | None,
                     history: list[dict[str, Any]]) -> bool:
        ok = self.write_json("prompt.json", {"system_prompt": current, "version": version,
                                             "initial_system_prompt": initial})
        return self.write_jsonl("prompt_history.jsonl", history) and ok

    def write_augmented(self, rows: list[dict[str, Any]]) -> bool:
        ok = self.write_jsonl("augmented.jsonl", rows)
        if rows:
            snapshot = list(rows)
            ok = self._write_whole("augmented", lambda root: _save_dataset(root, snapshot)) and ok
        return ok

    def copy_into(self, folder: str | Path) -> Path:
        """Copy the artifacts into `folder/nslora` (a checkpoint or the final adapter folder):
        the run folder's files, with what it could not take written from memory (its pending log
        lines after its own, the latest version of each unwritten whole file), each file whole or
        not at all. `last_copy` says whether everything got there."""
        dest = Path(folder) / ARTIFACT_DIR
        if dest.resolve() == self.root.resolve():
            self.last_copy = (dest, not self.missing)
            return dest
        pending = {name: lines for name, lines in self._pending.items() if lines}
        from_memory = set(pending) | set(self._unwritten)
        skip = shutil.ignore_patterns(*_NOT_COPIED, ".*.tmp", ".*")

        def ignore(folder: str, names: list[str]) -> set[str]:
            ignored = set(skip(folder, names))
            if Path(folder) == self.root:
                ignored |= from_memory & set(names)
            return ignored

        label = str(dest)
        ok = self._guard(label, lambda: shutil.copytree(self.root, dest, dirs_exist_ok=True,
                                                        ignore=ignore, copy_function=_atomic_copy))
        for name, lines in pending.items():
            def merged(name: str = name, lines: list[bytes] = lines) -> None:
                own = self.path(name)
                head = own.read_bytes() if own.is_file() else b""
                _atomic_write_bytes(dest / name, head + b"".join(lines))
            ok = self._guard(f"{label}/{name}", merged) and ok
        for name, writer in list(self._unwritten.items()):
            ok = self._guard(f"{label}/{name}", lambda writer=writer: writer(dest)) and ok
        self.last_copy = (dest, ok)
        return dest


@dataclass
class NSLoRAArtifacts:
    """Everything a run produced, as loaded by `load_artifacts`."""

    root: Path
    system_prompt: str | None
    prompt_version: int
    initial_system_prompt: str | None
    prompt_history: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    probe_reports: list[dict[str, Any]] = field(default_factory=list)
    augmented_rows: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)


class NoArtifactsError(FileNotFoundError):
    """A folder holds no NSLoRA artifacts; the message names the folder, where it looked and
    what the folder does hold."""


#: packages whose versions a run records (`versions.json`) and the report shows
VERSIONED_PACKAGES = ("nslora-plugin", "torch", "transformers", "trl", "peft", "accelerate",
                      "datasets", "textgrad", "bitsandbytes")


def package_versions() -> dict[str, str | None]:
    """The Python and package versions of this process (None: not installed), so a report or a
    card can say what a run was trained with."""
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _checkpoint_step(folder: Path) -> int:
    tail = folder.name.rpartition("-")[2]
    return int(tail) if folder.name.startswith("checkpoint-") and tail.isdigit() else -1


def artifact_candidates(path: str | Path) -> list[Path]:
    """Where a run's artifacts may be, in the order they are looked for: the folder itself (an
    `nslora/` folder), its `nslora/` (a run folder, a checkpoint or a final adapter folder),
    then its checkpoints' `nslora/`, latest first (a run folder whose own copy is elsewhere)."""
    path = Path(path)
    out = [path, path / ARTIFACT_DIR]
    if path.is_dir():
        checkpoints = sorted((p for p in path.glob("checkpoint-*") if _checkpoint_step(p) >= 0),
                             key=_checkpoint_step, reverse=True)
        out += [p / ARTIFACT_DIR for p in checkpoints]
    return out


def _what_is_there(path: Path) -> str:
    if not path.exists():
        return "the path does not exist"
    if not path.is_dir():
        return "it is a file, not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                   if not p.name.startswith("."))
    if not names:
        return "the folder is empty"
    shown = ", ".join(names[:12]) + (f", … ({len(names)} entries)" if len(names) > 12 else "")
    hint = ""
    if (path / "adapter_config.json").is_file():
        hint = ("; it is an adapter saved without its NSLoRA artifacts — copy them next to it "
                "with nslora_plugin.trainer.callback.save_artifacts(callback, folder)")
    elif (path / ARTIFACT_DIR).is_dir():
        hint = f"; {ARTIFACT_DIR}/ has no prompt.json (a run that stopped before its first save?)"
    return f"it holds {shown}{hint}"


def find_artifact_dir(path: str | Path) -> Path:
    """The folder with a run's `prompt.json`, from a run folder, a `checkpoint-N` folder, a final
    adapter folder or the `nslora/` folder itself; `NoArtifactsError` says what was there."""
    path = Path(path)
    for candidate in artifact_candidates(path):
        if (candidate / "prompt.json").is_file():
            return candidate
    raise NoArtifactsError(
        f"No NSLoRA artifacts under {str(path)!r}: looked for prompt.json in it, in "
        f"{ARTIFACT_DIR}/ and in checkpoint-*/{ARTIFACT_DIR}/ (what a run's output folder, a "
        f"checkpoint-N folder or the final adapter folder holds); {_what_is_there(path)}")


class ArtifactsUnreadable(ValueError):
    """A saved artifact file is torn or empty."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactsUnreadable(
            f"NSLoRA: {str(path)!r} is not readable JSON ({exc}); the file is truncated or empty — "
            "resume from an earlier checkpoint, or delete the NSLoRA folder of this one to start "
            "the loop afresh") from None
    if not isinstance(data, dict):
        raise ArtifactsUnreadable(f"NSLoRA: {str(path)!r} should hold a JSON object")
    return data


def load_artifacts(path: str | Path) -> NSLoRAArtifacts:
    """Load a run's artifacts from its output folder, a checkpoint or the final adapter folder."""
    root = find_artifact_dir(path)
    prompt = _read_json(root / "prompt.json")
    return NSLoRAArtifacts(
        root=root,
        system_prompt=prompt.get("system_prompt"),
        prompt_version=int(prompt.get("version", 0)),
        initial_system_prompt=prompt.get("initial_system_prompt"),
        prompt_history=read_jsonl_tolerant(root / "prompt_history.jsonl"),
        decisions=read_jsonl_tolerant(root / "decisions.jsonl"),
        probe_reports=read_jsonl_tolerant(root / "probe_reports.jsonl"),
        augmented_rows=read_jsonl_tolerant(root / "augmented.jsonl"),
        config=_read_json(root / "config.json"),
        summary=_read_json(root / "summary.json"),
        state=_read_json(root / "state.json"),
        versions=_read_json(root / "versions.json"),
    )
