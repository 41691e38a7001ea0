"""The editor LLM server the demo starts itself: ``transformers serve`` on loopback.

The symbolic (TextGrad) half of nslora talks to an OpenAI-compatible endpoint. Real users point it
at vLLM, Ollama or an API; the demo and the tests need one that works offline, so they start
``transformers serve`` (extra ``transformers[serving]``) on a local model folder as a child process.

What this relies on (checked against transformers 5.23, SmolLM2-135M-Instruct in fp32 on a CPU):

* Invocation: ``transformers serve <model-dir> --device cpu --host 127.0.0.1 --port N`` (the
  positional argument pins the server to one model and preloads it before listening), run as
  ``sys.executable -c <bootstrap> serve ...`` so it uses this venv and dies with its parent.
* Model name: a pinned server accepts only the exact string given on its command line; any
  other ``model`` (the Hub id, the path with a trailing slash, ...) gets HTTP 400.
  :attr:`EditorServer.model` holds that string. Responses report it back as ``<path>@main``.
* Readiness: ``/health`` answers only once the model is loaded. ``/v1/models`` lists the Hugging
  Face *cache*, not the pinned model, and returns HTTP 500 when that cache folder does not exist,
  so it is not used as a readiness probe.
* ``usage`` (prompt/completion/total tokens) comes back on non-streaming chat completions.
* Startup (spawn to a healthy ``/health``) and replies take seconds on a CPU and many times longer
  when other CPU-bound jobs share it: hence polling ``/health`` up to a generous
  ``startup_timeout`` rather than a fixed wait.
* The CLI checks PyPI for a newer transformers at start; the child gets
  ``HF_HUB_DISABLE_UPDATE_CHECK=1`` and ``HF_HUB_OFFLINE=1`` (a local folder needs no network).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from nslora_plugin.core.util import free_port

__all__ = ["EditorServer", "free_port"]


#: Run by the child interpreter: the ``transformers`` console script's own entry point, plus a
#: daemon thread that ends the server once its parent is gone. atexit covers a parent that exits or
#: raises; this covers one killed by SIGKILL/SIGTERM, which would otherwise leave an orphan server
#: holding the model's memory and a port.
_BOOTSTRAP = """\
import os, sys, threading, time
parent = int(os.environ.pop("NSLORA_EDITOR_PARENT_PID", "0") or 0)
def _watch_parent():
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
if parent:
    threading.Thread(target=_watch_parent, name="nslora-parent-watch", daemon=True).start()
sys.argv = ["transformers", *sys.argv[1:]]
from transformers.cli.transformers import main
main()
"""


def _port_is_free(host: str, port: int) -> bool:
    """True if a server could listen on ``host:port`` now (SO_REUSEADDR, as uvicorn binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class EditorServer:
    """A ``transformers serve`` child process serving one local model folder.

    Use as a context manager (``with EditorServer(path) as server: ...``) or call
    :meth:`start` / :meth:`stop`. The child runs in its own process group so :meth:`stop` also
    reaps anything it spawned; :meth:`stop` is registered with :mod:`atexit` so a demo that
    crashes with an exception does not leave a server behind, and the child exits by itself
    within about a second if its parent is killed outright.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        folder = Path(model_dir).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a model folder (no config.json)")
        if "@" in str(folder):
            # transformers serve splits model names at "@" into id and revision.
            raise ValueError(f"transformers serve cannot load a path containing '@': {folder}")
        self.model_dir: Path = folder
        self.host = host
        self._auto_port = port is None
        self.port: int = port if port is not None else free_port(host)
        self.startup_timeout = startup_timeout
        self._own_log = log_path is None
        #: Server stdout+stderr. Without ``log_path`` a temp file is made at :meth:`start` and
        #: deleted at :meth:`stop`, except after a failed start (the error message names it).
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self.startup_seconds: float | None = None

    # ----------------------------------------------------------------------------------------
    # Public surface
    # ----------------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The ``model`` value clients must send: the exact folder string the server was given."""
        return str(self.model_dir)

    @property
    def root_url(self) -> str:
        """``http://host:port`` (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url`` (``.../v1``)."""
        return f"{self.root_url}/v1"

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The argv used to start the server: ``transformers serve`` run by this interpreter (so
        the same venv) through a small bootstrap that exits when its parent dies."""
        return [
            sys.executable, "-c", _BOOTSTRAP, "serve", self.model,
            "--device", "cpu", "--host", self.host, "--port", str(self.port),
        ]  # fmt: skip

    def start(self) -> EditorServer:
        """Launch the server and block until ``/health`` answers (the model is loaded by then).

        Raises:
            RuntimeError: the process exited or ``startup_timeout`` passed; the message carries
                the last lines of the server log.
        """
        if self.running:
            return self
        if self._auto_port and not _port_is_free(self.host, self.port):
            self.port = free_port(self.host)  # the one picked at construction got taken
        if not _port_is_free(self.host, self.port):
            # Checked up front: otherwise whatever already listens there could answer /health.
            raise RuntimeError(f"port {self.port} on {self.host} is already in use")
        if self.log_path is None or self._own_log:
            self.log_path = self._temp_log()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_handle = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        started = time.monotonic()
        try:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=self._child_env(),
                start_new_session=True,  # own process group: stop() signals the whole group
            )
        except BaseException:
            log_handle.close()
            raise
        self._log_handle = log_handle
        atexit.register(self.stop)
        try:
            self._wait_until_healthy(started)
        except BaseException:
            self.stop(_keep_log=True)
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self, timeout: float = 5.0, *, _keep_log: bool = False) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` seconds; safe to call twice."""
        process, self._process = self._process, None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if process is not None:
            # A stop leaves no member of the group behind (the leader reaped, any worker gone).
            self._signal_group(process, signal.SIGTERM)
            if not self._group_gone(process, timeout):
                self._signal_group(process, signal.SIGKILL)
                self._group_gone(process, timeout)
        handle, self._log_handle = self._log_handle, None
        if handle is not None:
            handle.close()
        if self._own_log and not _keep_log and process is not None and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server log (for error messages)."""
        if self.log_path is None:
            return "(no server log)"
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        # Progress bars redraw with carriage returns; keep only the last state of each line.
        cleaned = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
        return "\n".join(cleaned[-lines:])

    def __enter__(self) -> EditorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EditorServer({self.model!r}, base_url={self.base_url!r}, {state})"

    # ----------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _temp_log() -> Path:
        handle, name = tempfile.mkstemp(prefix="nslora-editor-", suffix=".log")
        os.close(handle)
        return Path(name)

    @staticmethod
    def _child_env() -> dict[str, str]:
        """Environment for the child: offline (the model is local), quiet, unbuffered logs."""
        env = dict(os.environ)
        env.update(
            NSLORA_EDITOR_PARENT_PID=str(os.getpid()),
            HF_HUB_OFFLINE="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            PYTHONUNBUFFERED="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env

    def _wait_until_healthy(self, started: float) -> None:
        """Poll ``/health`` until it says ok, the child dies, or the timeout passes."""
        deadline = started + self.startup_timeout
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise RuntimeError(
                    f"transformers serve exited (code {code}) before becoming ready.\n"
                    f"Command: {' '.join(self.command())}\nLog {self.log_path}:\n{self.log_tail()}"
                )
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"transformers serve did not answer {self.root_url}/health within "
                    f"{self.startup_timeout:.0f} s.\nCommand: {' '.join(self.command())}\n"
                    f"Log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.root_url}/health", timeout=2) as response:
                body = json.loads(response.read() or b"{}")
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return body.get("status") == "ok"

    @staticmethod
    def _group_gone(process: subprocess.Popen[bytes], timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no process of the child's group is left.

        Reaps the leader on the way: an unreaped child still counts as a group member.
        """
        deadline = time.monotonic() + timeout
        while True:
            process.poll()
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Signal the child's process group (== its pid, thanks to start_new_session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
