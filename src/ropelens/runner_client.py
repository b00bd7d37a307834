"""The client side of the warm runner (``ropelens.runner``): standard library only, no torch.

``python -m ropelens ppl|attention|needle|task ...`` asks the runner of its Snakemake process to run
the cell when ``ROPELENS_RUNNER`` names one (a Unix socket; the workflow sets it, see
:func:`export_for_workflow`): it sends its argv, working directory and environment, and passes
its stdin/stdout/stderr file descriptors over the socket (SCM_RIGHTS), so ``2> {log}`` still
writes the cell's log. It then waits for the cell's exit status and ends the same way: with its
exit code, or killed by the same signal (137 in the shell for SIGKILL). If no runner answers, the
first client starts one (a lock file against races); if none can be started, or the runner says
so (a GPU cell, another environment), the cell runs cold in this process: always correct.

Only this user's runner is used: its folder must be this user's own, closed to others, and not a
symbolic link (:func:`folder_problem`), and the server at the socket must run as this user
(``SO_PEERCRED``, checked before anything is sent); otherwise the cell runs cold and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CELL_COMMANDS = ("ppl", "attention", "needle", "task")  # as ropelens.cli.CELL_COMMANDS
ENV_SOCKET = "ROPELENS_RUNNER"
ENV_OWNER = "ROPELENS_RUNNER_OWNER"
ENV_MEMORY = "ROPELENS_RUNNER_MEMORY_MB"
ENV_IDLE = "ROPELENS_RUNNER_IDLE_SECONDS"
ENV_JOB = "ROPELENS_RUNNER_SLURM_JOB"
START_TIMEOUT = 180.0  # seconds a starting runner may take to import torch on a loaded machine
HEADER = struct.Struct("!I")  # every message: its length, then JSON
PEERCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


# --- the workflow side: one runner per Snakemake process -----------------------------------------


def socket_path(pid: int) -> str:
    """A socket path unique to the Snakemake process ``pid`` on this host (short: <= 100 chars)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    if len(base) > 60 or not os.access(base, os.W_OK):
        base = "/tmp"
    host = socket.gethostname().split(".")[0][:24]
    return f"{base}/ropelens-{os.getuid()}/{host}-{pid}.sock"


def export_for_workflow(runtime: dict, start: bool = False) -> None:
    """Called by rules/common.smk in every Snakemake process: its cells use a runner owned by this
    process (``runtime.warm``), or run cold (``warm: false``, or not on Linux). In a Slurm job,
    the Snakemake of each job step (the jobstep executor runs every cell of a bundle as its own
    ``srun ... snakemake``) keeps the runner of the job's batch Snakemake. ``start``: start the
    runner now, as a child of this process (a Slurm job's batch Snakemake: the runner then lives
    in the job's batch step, not in the step of the cell that would start it)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    inherited = os.environ.get(ENV_SOCKET)
    if job and inherited and os.environ.get(ENV_JOB) == job and _alive(os.environ.get(ENV_OWNER)):
        return
    for key in (ENV_SOCKET, ENV_OWNER, ENV_MEMORY, ENV_IDLE, ENV_JOB):
        os.environ.pop(key, None)  # a Slurm job inherits the submitting process's: never reuse it
    if not runtime.get("warm", True) or not sys.platform.startswith("linux"):
        return
    pid = os.getpid()
    path = private_socket(pid)
    if path is None:
        return
    os.environ[ENV_SOCKET] = path
    os.environ[ENV_OWNER] = str(pid)
    os.environ[ENV_MEMORY] = str(runtime.get("warm_memory_mb", 4000))
    os.environ[ENV_IDLE] = str(runtime.get("warm_idle_seconds", 300))
    os.environ[ENV_JOB] = job
    become_subreaper()
    import atexit

    atexit.register(_remove_private, os.path.dirname(path))  # runs last: after the lock goes
    atexit.register(_remove, f"{path}.lock")  # the start lock ends with us
    if start:
        start_now(path)


def private_socket(pid: int) -> str | None:
    """:func:`socket_path` in a folder only this user can reach: the usual one when it is
    fit (:func:`folder_problem`), else a new private folder beside it (another user made it
    first, say, in /tmp); None if none can be made (the cells run cold). Either says why on
    stderr and in the runner log."""
    path = socket_path(pid)
    folder, name = os.path.split(path)
    problem = folder_problem(folder)
    if problem is None:
        return path
    base, prefix = os.path.split(folder)
    try:
        private = tempfile.mkdtemp(prefix=f"{prefix}-", dir=base)  # mode 0700, a random name
    except OSError as e:
        reason = f"{problem}, and no private folder can be made ({e.strerror})"
        return _note("folder", f"{reason}: cells run cold", pid)
    _note("folder", f"{problem}: the warm runner uses {private} instead", pid)
    return os.path.join(private, name)


def folder_problem(folder: str) -> str | None:
    """Why the runner's socket may not live in ``folder`` (made, mode 0700, if missing), or None:
    it must be a folder, not a symbolic link, owned by this user and closed to everyone else."""
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, 0o700)
        st = os.lstat(folder)
    except OSError as e:
        return f"{folder} cannot be made ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return f"{folder} is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return f"{folder} is not a folder"
    if st.st_uid != os.getuid():
        return f"{folder} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & 0o077:
        return f"{folder} has mode {stat.S_IMODE(st.st_mode):04o}, not 0700 (others can reach it)"
    return None


_STARTED: list = []  # the runner this process started (kept: no ResourceWarning at exit)


def start_now(path: str) -> None:
    """Start the runner without waiting for it. It holds the start lock until it listens, so a
    cell arriving meanwhile waits for it instead of starting another."""
    import fcntl

    if folder_problem(os.path.dirname(path)):
        return
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return os.close(fd)  # being started already
    proc = _start(path, lock_fd=fd)
    os.close(fd)  # the runner's copy keeps the lock
    if proc is not None:
        _STARTED.append(proc)


def become_subreaper() -> None:
    """Orphans below this process (the runner, once the cell that started it ends) are adopted by
    it, not by init: they stay in its process tree, where a Slurm without cgroups
    (proctrack/linuxproc) counts their memory and ends them with the job."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def stop(path: str | None = None) -> bool:
    """Ask the runner at ``path`` (default: this process's) to exit; False if none answered."""
    path = path or os.environ.get(ENV_SOCKET)
    sock = _connect(path) if path else None
    if sock is None:
        return False
    if peer_uid(sock) != os.getuid():  # not this user's runner: nothing to ask of it
        sock.close()
        return False
    with sock:
        try:
            _send(sock, {"op": "stop"})
            return _receive(sock) is not None
        except OSError:
            return False


# --- the cell side -------------------------------------------------------------------------------


def cell_command(argv: list[str]) -> str | None:
    """The subcommand of ``argv`` if it is a cell command (``--debug`` may come first)."""
    words = [a for a in argv if a != "--debug"]
    return words[0] if words and words[0] in CELL_COMMANDS else None


def run(argv: list[str]) -> int | None:
    """Run the cell through the runner; its exit status, or None: run it cold in this process."""
    path = os.environ.get(ENV_SOCKET)
    if not path or cell_command(argv) is None:
        return None
    sock = _trusted_runner(path)
    if sock is None:
        return None
    signal.signal(signal.SIGINT, _interrupted)
    with sock:
        request = {"op": "run", "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
        request.update(python=sys.executable, package=str(Path(__file__).resolve().parent))
        try:
            _send(sock, request, fds=_stdio())
            reply = _receive(sock)
        except OSError:
            reply = None
    if reply is None:  # the runner is gone (killed, or its workflow ended)
        if not _alive(os.environ.get(ENV_OWNER)):
            print("ropelens: error: the workflow that ran this cell has ended", file=sys.stderr)
            return 1
        print("ropelens: the warm runner stopped; running this cell cold", file=sys.stderr)
        return None
    if "cold" in reply:
        return None
    if "signal" in reply:  # end as the cell did: the shell shows 128 + signal
        sig = reply["signal"]
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    return reply["exit"]


def _trusted_runner(path: str) -> socket.socket | None:
    """A connection to this user's runner at ``path`` (started if none answers), or None: run
    the cell cold (said on stderr and in the runner log when the runner is not this user's)."""
    problem = folder_problem(os.path.dirname(path))
    if problem:
        return _note("cold", f"{problem}; running this cell cold")
    sock = _connect_or_start(path)
    if sock is None:
        return None
    uid = peer_uid(sock)
    if uid != os.getuid():  # checked before anything is sent
        sock.close()
        whose = f"uid {uid}, not by you (uid {os.getuid()})"
        return _note("cold", f"{path} is served by {whose}; running this cell cold")
    return sock


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
    except (OSError, AttributeError):  # AttributeError: no SO_PEERCRED (not Linux)
        return None
    return PEERCRED.unpack(creds)[1]


def _note(event: str, reason: str, owner=None) -> None:
    """Why the warm runner is not used as usual: one line on stderr (the job's log) and one in
    the runner log."""
    print(f"ropelens: warm runner: {reason}", file=sys.stderr)
    line = {"event": event, "time": round(time.time(), 3), "client": os.getpid(), "reason": reason}
    log = runner_log(owner)
    with contextlib.suppress(OSError):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            out.write(json.dumps(line) + "\n")


def _stdio() -> list[int]:
    """This process's stdin/stdout/stderr (/dev/null for a closed one)."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _interrupted(signum, frame):
    print("ropelens: interrupted; no output written", file=sys.stderr)
    os._exit(130)  # the runner sees the connection close and kills the cell


def _connect(path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:
        sock.close()
        return None


def _connect_or_start(path: str) -> socket.socket | None:
    sock = _connect(path)
    if sock is not None:
        return sock
    try:
        import fcntl

        lock = open(f"{path}.lock", "w", opener=_private)  # noqa: SIM115 (closed below)
    except OSError:
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter; the others wait, then connect
        sock = _connect(path)
        if sock is not None:
            return sock
        proc = _start(path)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc is not None and proc.poll() is None:
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.05)
    return None


def _start(path: str, lock_fd: int | None = None) -> subprocess.Popen | None:
    """Start a runner for this workflow (its own session: killing a job's process group spares
    it; it ends with its owner). Its output goes to logs/runner/<host>-<owner>.log."""
    owner = os.environ.get(ENV_OWNER) or str(os.getppid())
    log = runner_log(owner)
    cmd = [sys.executable, "-m", "ropelens.runner", "serve", "--socket", path]
    cmd += ["--owner", owner, "--log", str(log)]
    cmd += ["--memory-mb", os.environ.get(ENV_MEMORY, "4000")]
    cmd += ["--idle-seconds", os.environ.get(ENV_IDLE, "300")]
    if lock_fd is not None:
        cmd += ["--lock-fd", str(lock_fd)]
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=() if lock_fd is None else (lock_fd,),
            )
    except OSError:
        return None


def runner_log(owner=None) -> Path:
    """The log of the runner owned by ``owner`` (default: this workflow's), one per host."""
    owner = owner or os.environ.get(ENV_OWNER) or os.getppid()
    return Path("logs/runner") / f"{socket.gethostname().split('.')[0]}-{owner}.log"


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _remove_private(folder: str) -> None:
    """A private folder made for one workflow (``ropelens-<uid>-*``) goes once it is empty."""
    if os.path.basename(folder).startswith(f"ropelens-{os.getuid()}-"):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


# --- messages: a 4-byte length, then JSON; the first one may carry file descriptors ------------


def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    data = HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [data], fds) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


def _receive(sock: socket.socket, data: bytes = b""):
    """The next message (``data``: bytes of it already read); None at end of stream."""
    while True:
        if len(data) >= HEADER.size:
            (n,) = HEADER.unpack(data[: HEADER.size])
            if len(data) >= HEADER.size + n:
                return json.loads(data[HEADER.size : HEADER.size + n])
        more = sock.recv(1 << 16)
        if not more:
            return None
        data += more
