"""Shared pytest fixtures.

Session-scoped fixtures here are expensive (a real model, a real server) and meant to be reused by
every test module that needs them. Keep each fixture small and documented; add new ones in their
own section.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from nslora_plugin.apps.tools.serve import EditorServer

REPO_ROOT = Path(__file__).resolve().parents[1]
# OpenMP threads that spin while waiting starve the other process when a test runs a training job
# next to an editor server or a framework subprocess on few cores; passive waiting does not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`-n`, pyproject's addopts) each worker takes its share of the cores, so the
# workers' tiny training jobs and the subprocesses they start do not oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(_share, 1)))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker a core, at most four (each loads the 135M model and its own editor
    server; more would cost memory, not time, on the tests' small jobs)."""
    return max(min(os.cpu_count() or 1, 4), 1)


# ------------------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct) and an editor server on it
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Stable model cache for tests, so a CI run converts the default model once.

    ``$NSLORA_CACHE`` if set, else ``<repo>/.cache/nslora-test`` (git-ignored).
    """
    explicit = os.environ.get("NSLORA_CACHE")
    return Path(explicit).expanduser() if explicit else REPO_ROOT / ".cache" / "nslora-test"


@pytest.fixture(scope="session")
def default_model_dir(model_cache_dir: Path) -> Path:
    """A trainable SmolLM2-135M-Instruct folder, built through the offline route.

    The Hub is skipped (``prefer_hub=False``, ``HF_HUB_OFFLINE=1``) so the PyPI -> GGUF -> folder
    conversion is what gets exercised, and the result is the same on every machine. About 20 s the
    first time, instant once cached.
    """
    from nslora_plugin.apps.tools.models import ensure_default_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return ensure_default_model(model_cache_dir, prefer_hub=False)


@pytest.fixture(scope="session")
def editor_server(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EditorServer]:
    """A running ``transformers serve`` on a free loopback port, serving ``default_model_dir``.

    Shared by the whole session: do not stop it in a test (start your own ``EditorServer`` for
    that). Its log is kept under pytest's temp folder for post-mortems.
    """
    from nslora_plugin.apps.tools.serve import EditorServer

    log_path = tmp_path_factory.mktemp("editor-server") / "server.log"
    with EditorServer(default_model_dir, log_path=log_path) as server:
        yield server


# ------------------------------------------------------------------------------------------------
# Shared test inputs: the real SmolLM2 tokenizer, and the fault-injecting editor server
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path):
    """The real SmolLM2 tokenizer (chat template included), shared by the tiny-model tests."""
    from tiny import load_tokenizer

    tok = load_tokenizer(default_model_dir)
    tok.pristine_chat_template = tok.chat_template
    return tok


@pytest.fixture(autouse=True)
def _fresh_chat_template(request):
    """The end of an NSLoRA run writes the final prompt into the trainer's tokenizer (so
    `save_model` saves it): every test starts and ends with the shared tokenizer's own template."""
    if "tokenizer" not in request.fixturenames:
        yield
        return
    tok = request.getfixturevalue("tokenizer")
    tok.chat_template = tok.pristine_chat_template
    yield
    tok.chat_template = tok.pristine_chat_template


@pytest.fixture(scope="module")
def module_server():
    """One fault-injecting OpenAI-compatible server on loopback per test module."""
    from fault_server import FaultServer

    with FaultServer() as srv:
        yield srv


@pytest.fixture()
def server(module_server):
    """The module's fault server, reset to healthy behaviour for each test."""
    module_server.reset()
    return module_server


# ------------------------------------------------------------------------------------------------
# A real full disk: a small tmpfs (needs root; skips and says why otherwise)
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs mounted under `tmp_path` (fill it with `tiny.fill_disk` or `tiny.DiskFiller`);
    unmounted after the test. Skips where it cannot be mounted (not root, no tmpfs)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a small tmpfs, and mounting one needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"could not mount a small tmpfs here ({done.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
