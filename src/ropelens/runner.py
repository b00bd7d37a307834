"""The warm runner: a fork server that runs a Snakemake process's cells without start-up cost.

One runner per Snakemake process (``python -m ropelens.runner serve``; started by the first cell's
client,
``ropelens.runner_client``) imports torch, transformers, pyarrow and ropelens once and keeps the
models of the cells it served loaded, by cell spec, under a memory budget. For each cell it forks a
child that takes the client's stdin/stdout/stderr, working directory and environment and runs the
same ``ropelens.cli.main(argv)`` as the cold command, with the loaded model handed to
``ropelens.models.load``. Everything a cell changes dies with its child: dynamic NTK's rotary
frequencies, the attention recorder, torch's thread count and random state, a crash or an
out-of-memory kill. The parent never computes (torch at one thread, no OpenMP pool to break in a
fork) and never initialises CUDA: GPU cells run cold.

The runner ends when its owner (the Snakemake process) is gone (polled every 0.2 s), after
``--idle-seconds`` without a cell, or when asked (``python -m ropelens.runner stop``, the workflow's
onsuccess/onerror); a child whose client went away is killed, and the children die with the
runner (PR_SET_PDEATHSIG). Its log has one JSON line per event; ``"event": "load"`` lines count
model loads.

It serves only its own user: it does not start in a folder that others own or can reach
(``runner_client.folder_problem``), its socket is created owner-only, and a connection whose peer
(``SO_PEERCRED``) is another uid is closed before anything is read from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path

from ropelens import runner_client as rc

# environment read when modules are imported: a request that differs runs cold
IMPORT_ENV = ("PYTHON", "HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "OMP_", "MKL_")
IMPORT_ENV += ("KMP_", "NUMBA_", "TOKENIZERS_", "LD_")
FRESH_SEED = 67280421310721  # torch's default generator seed in a fresh process


# thread counts Snakemake sets per job: the child sets torch's own (below), so they may differ
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")
THREAD_ENV += ("VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def fingerprint(env: dict) -> dict:
    skip = ("PYTHONWARNINGS", *THREAD_ENV)
    return {k: v for k, v in env.items() if k.startswith(IMPORT_ENV) and k not in skip}


class Server:
    def __init__(self, path, owner: int, memory_mb: float, idle_s: float, log, lock_fd=None):
        self.path, self.owner, self.budget = path, owner, memory_mb * 2**20
        self.idle_s, self.log_file = idle_s, log
        self.env = fingerprint(os.environ)
        self.owner_start = _start_time(owner)
        self.models: OrderedDict = OrderedDict()  # key -> (Loaded, rng state, bytes)
        self.jobs: dict[int, tuple] = {}  # child pid -> (connection, started, out)
        self.sel = selectors.DefaultSelector()
        self.last = time.monotonic()
        self.stopping = False
        self.lock_fd = lock_fd

    # --- the loop -----------------------------------------------------------------------------

    def serve(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a dead runner's socket (the starter holds the lock)
        umask = os.umask(0o177)  # the socket file is made owner-only (0600), whatever the umask
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(umask)
        self.listener.listen(64)
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # listening: cells waiting to start a runner connect instead
        self.sel.register(self.listener, selectors.EVENT_READ)
        # a finished child wakes the loop at once (SIGCHLD -> wakeup fd), not at the next poll
        self.wake, wake_w = socket.socketpair()
        self._wake_w = wake_w
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(self.wake, selectors.EVENT_READ)
        self.event("start", socket=self.path, owner=self.owner, threads=_os_threads())
        try:
            while not self.done():
                for key, _ in self.sel.select(timeout=0.2):
                    if key.fileobj is self.listener:
                        self.accept()
                    elif key.fileobj is self.wake:
                        self.wake.recv(4096)
                    else:
                        self.client_gone(key.fileobj)
                self.reap()
        finally:
            self.shutdown()

    def done(self) -> bool:
        if not _alive(self.owner, self.owner_start):
            return self.event("exit", reason="owner gone") or True
        if self.stopping and not self.jobs:
            return self.event("exit", reason="stopped") or True
        if not self.jobs and time.monotonic() - self.last > self.idle_s:
            return self.event("exit", reason="idle") or True
        return False

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        uid = rc.peer_uid(conn)
        if uid != os.getuid():  # another user's process: read nothing, run nothing
            self.event("refused", uid=uid, reason="another user")
            return conn.close()
        conn.settimeout(30)
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
            request = rc._receive(conn, data)
        except (OSError, ValueError):
            request = None
        if request is None or request.get("op") not in ("run", "stop"):
            return _close(conn, fds)
        if request["op"] == "stop":
            self.stopping = True
            rc._send(conn, {"stopping": True})
            return _close(conn, fds)
        reason = self.cold_reason(request, fds)
        if reason:
            self.event("cold", reason=reason, argv=request["argv"][:1])
            rc._send(conn, {"cold": reason})
            return _close(conn, fds)
        self.fork(conn, fds, request)

    def cold_reason(self, request: dict, fds) -> str | None:
        if self.stopping:
            return "the runner is stopping"
        if len(fds) != 3:
            return "no file descriptors received"
        if request.get("python") != sys.executable:
            return f"another interpreter ({request.get('python')})"
        if request.get("package") != str(Path(rc.__file__).resolve().parent):
            return "another ropelens checkout"
        theirs = fingerprint(request.get("env", {}))
        if theirs != self.env:
            keys = sorted(
                k for k in theirs.keys() | self.env.keys() if theirs.get(k) != self.env.get(k)
            )
            return f"another environment (read at import time: {', '.join(keys)})"
        return None

    # --- one cell -------------------------------------------------------------------------------

    def fork(self, conn, fds, request) -> None:
        self.last = time.monotonic()
        try:
            key, spec = self.preload(request)
        except Exception as e:  # a spec of the wrong shape: the child reports it as cold would
            self.event("no-load", error=f"{type(e).__name__}: {e}"[:300])
            key, spec = None, None
        entry = self.models.get(key) if key else None
        if entry and entry[0] == "cold":
            rc._send(conn, {"cold": "not a CPU cell (fork cannot carry CUDA)"})
            return _close(conn, fds)
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            _child(parent, fds, request, entry, spec, self._sockets(conn))
        for fd in fds:
            os.close(fd)
        self.jobs[pid] = (conn, time.monotonic(), _arg(request["argv"], "--out"))
        self.sel.register(conn, selectors.EVENT_READ)
        self.event(
            "cell",
            pid=pid,
            argv=request["argv"][:1],
            out=self.jobs[pid][2],
            **({"model": spec.get("model"), "method": spec.get("method")} if spec else {}),
        )
        self.evict(keep=key)

    def preload(self, request):
        """(cache key, spec) of a cell; its model loaded (once) in this process. A request this
        cannot parse or load gets no model: its child fails exactly as the cold command does."""
        from ropelens import cli, models

        try:
            args = cli.build_parser().parse_args(request["argv"])
        except (SystemExit, Exception):
            return None, None
        spec = getattr(args, "spec", None)
        if not isinstance(spec, dict):
            return None, None
        spec = models.at_length(spec, args.length)  # what the cell loads (factor: auto)
        stamp = _source_stamp(request["cwd"], spec)
        key = json.dumps([request["cwd"], spec, stamp], sort_keys=True)
        if key in self.models:
            self.models.move_to_end(key)
            return key, spec
        if not _cpu_cell(spec):
            self.models[key] = ("cold", None, 0)
            return key, spec
        cwd, env = os.getcwd(), dict(os.environ)
        try:
            os.chdir(request["cwd"])
            _set_env(request["env"])
            import torch

            torch.manual_seed(FRESH_SEED)  # a fresh process's generator, then what loading draws
            t0 = time.perf_counter()
            loaded = models.load(spec)
            seconds = time.perf_counter() - t0
            state = torch.get_rng_state()
        except Exception as e:
            self.event("no-load", model=spec.get("model"), error=f"{type(e).__name__}: {e}"[:300])
            return None, spec
        finally:
            os.chdir(cwd)
            _set_env(env)
        size = _model_bytes(loaded.model)
        self.models[key] = (loaded, state, size)
        self.event(
            "load",
            model=spec.get("model"),
            method=spec.get("method"),
            seconds=round(seconds, 3),
            mb=round(size / 2**20, 1),
        )
        return key, spec

    def evict(self, keep) -> None:
        """Least recently used models go while the others exceed the budget (the one in use
        stays: a bundle of cells of one model loads it once, whatever the budget)."""
        while sum(e[2] for k, e in self.models.items() if k != keep) > self.budget:
            victim = next(k for k in self.models if k != keep)
            loaded = self.models.pop(victim)[0]
            if loaded != "cold":
                self.event("evict", model=loaded_name(victim))
            del loaded
            _trim()

    def client_gone(self, conn) -> None:
        """A client's connection is readable while its cell runs: it closed (killed), so is the
        cell."""
        try:
            data = conn.recv(1)
        except OSError:
            data = b""
        if data:
            return
        for pid, job in self.jobs.items():
            if job[0] is conn:
                _kill(pid)
                self.event("client gone", pid=pid)
        self.sel.unregister(conn)

    def reap(self) -> None:
        while self.jobs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.jobs:
                continue
            conn, started, out = self.jobs.pop(pid)
            reply = (
                {"signal": os.WTERMSIG(status)}
                if os.WIFSIGNALED(status)
                else {"exit": os.waitstatus_to_exitcode(status)}
            )
            self.event(
                "done", pid=pid, out=out, seconds=round(time.monotonic() - started, 3), **reply
            )
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn)
            with contextlib.suppress(OSError):
                rc._send(conn, reply)
            conn.close()
            self.last = time.monotonic()

    def shutdown(self) -> None:
        for pid in list(self.jobs):
            _kill(pid)
        deadline = time.monotonic() + 5
        while self.jobs and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)
        except OSError:
            pass
        self.listener.close()
        rc._remove_private(os.path.dirname(self.path))

    def _sockets(self, conn):
        return [self.listener, self.wake, self._wake_w, conn, *(j[0] for j in self.jobs.values())]

    def event(self, name: str, **fields) -> None:
        line = {"event": name, "time": round(time.time(), 3), "runner": os.getpid(), **fields}
        print(json.dumps(line), file=self.log_file, flush=True)


def loaded_name(key: str) -> str:
    spec = json.loads(key)[1]
    return f"{spec.get('model')}/{spec.get('method')}"


# --- the child: the cold command, in a fork -----------------------------------------------------


def _child(parent: int, fds, request, entry, spec, sockets) -> None:
    code = 1
    try:
        _die_with_parent(parent)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s in sockets:
            s.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        _set_env(request["env"])
        sys.argv = ["ropelens", *request["argv"]]
        import torch

        from ropelens import cli, models

        torch.set_num_threads(_fresh_threads(request["env"]))  # until the cell sets its own
        models.PRELOADED.clear()
        if entry is not None:
            loaded, state, _ = entry
            torch.set_rng_state(state)
            models.PRELOADED[models.spec_key(spec)] = loaded
        else:
            torch.manual_seed(FRESH_SEED)
        code = cli.main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the runner dies (it is single-threaded, so its death is the thread's), and
    first in line for the OOM killer: a cell over its memory goes, not the runner."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("500")


# --- helpers -----------------------------------------------------------------------------------

DEFAULT_THREADS = 1


def _prepare() -> None:
    """Import what every cell imports, once; torch at one thread in this process."""
    global DEFAULT_THREADS
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # asking about CUDA spares forks
    import torch

    DEFAULT_THREADS = torch.get_num_threads()
    torch.set_num_threads(1)
    import importlib

    modules = ["pyarrow.parquet", "pyarrow.dataset", "pandas", "tqdm.auto", "transformers"]
    modules += ["ropelens.cli", "ropelens.models"]
    modules += [f"ropelens.{m}" for m in ("attention", "distributions", "io", "needle", "ppl")]
    modules += ["ropelens.retrieval", "ropelens.schemas", "ropelens.tasks", "ropelens.taskcells"]
    for name in modules:
        importlib.import_module(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    with contextlib.suppress(Exception):  # numba: attention loads it once a cell repays it
        importlib.import_module("ropelens.rowstats")
    importlib.import_module("ropelens.config").schema()


def _fresh_threads(env: dict) -> int:
    """torch's thread count in a fresh process with ``env`` (OMP_NUM_THREADS, else the cores)."""
    try:
        return max(1, int(env.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return DEFAULT_THREADS


def _cpu_cell(spec: dict) -> bool:
    device = (spec.get("runtime") or {}).get("device", "auto")
    if device == "cpu":
        return True
    if device != "auto":
        return False
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps and mps.is_available())


def _source_stamp(cwd: str, spec: dict):
    """Sizes and mtimes of a local model directory's files: a rebuilt model is loaded anew."""
    source = spec.get("source") or {}
    if "path" not in source:
        return None
    folder = Path(cwd, source["path"])
    try:
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir())
    except OSError:
        return None


def _model_bytes(model) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _set_env(env: dict) -> None:
    os.environ.clear()
    os.environ.update(env)


def _arg(argv: list[str], flag: str):
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def _close(conn, fds) -> None:
    for fd in fds:
        os.close(fd)
    conn.close()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _trim() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _os_threads() -> int | None:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return None


def _start_time(pid: int):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start) -> bool:
    if not rc._alive(pid):
        return False
    now = _start_time(pid)
    return start is None or now is None or now == start  # not a reused pid


def serve(path, owner: int, memory_mb: float, idle_s: float, log, lock_fd=None) -> int:
    out = open(log, "a", buffering=1) if log else sys.stderr  # noqa: SIM115 (the runner's life)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    server = Server(path, owner, memory_mb, idle_s, out, lock_fd)  # env fingerprint first
    problem = rc.folder_problem(os.path.dirname(path))
    if problem:
        server.event("exit", reason=f"{problem}: not serving there")
        return 1
    _prepare()
    server.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m ropelens.runner",
        description="serve: import torch once, keep models loaded (under --memory-mb) and run each "
        "cell sent to --socket in a fork of this process (the workflow starts it: runtime.warm, "
        "see docs/runner.md); stop: ask the runner at --socket to exit.",
    )
    p.add_argument("action", choices=["serve", "stop"])
    p.add_argument("--socket", required=True, help="Unix socket path")
    p.add_argument("--owner", type=int, default=os.getppid(), help="exit when this pid is gone")
    p.add_argument("--memory-mb", type=float, default=4000, help="budget of the kept models")
    p.add_argument("--idle-seconds", type=float, default=300, help="exit after this long idle")
    p.add_argument("--log", help="append one JSON line per event here (default: stderr)")
    p.add_argument("--lock-fd", type=int, help="an inherited start lock, released when listening")
    args = p.parse_args(argv)
    if args.action == "stop":
        stopped = rc.stop(args.socket)
        print(f"{args.socket}: {'stopping' if stopped else 'no runner answers'}", file=sys.stderr)
        return 0
    return serve(args.socket, args.owner, args.memory_mb, args.idle_seconds, args.log, args.lock_fd)


if __name__ == "__main__":
    sys.exit(main())
