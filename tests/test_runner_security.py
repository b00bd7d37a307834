"""The warm runner on a shared machine: only its owner may talk to it.

Each check has a test that fails without it: a runner folder that another user owns, that others
can reach or that is a symbolic link is not used (the workflow makes a private one, a cell runs
cold); the runner's socket is owner-only and the runner refuses a connection from another uid; a
cell refuses a server of another uid before sending it anything. The cells refused run cold and
equal a cold cell. Acting as another user (``nobody``) needs root and ``setpriv``: CI runs as root.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ropelens import runner_client

from .test_runner import SHORT, argv, cell_env, events, inputs, run, short_socket, stop_all

__all__ = ["inputs"]  # the fixture, shared with test_runner

OTHER = pwd.getpwnam("nobody")
as_root = pytest.mark.skipif(
    os.getuid() != 0 or not shutil.which("setpriv"),
    reason="acting as another user needs root and setpriv (CI runs as root)",
)
ME = os.getuid()
THEIRS = f"uid {OTHER.pw_uid}, not by you (uid {ME})"

# another user's client: connects, sends a cell request with its stdio, prints the reply (or
# "closed": the connection closed before a reply, or before the request could be sent)
CLIENT = r"""
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
print("connected", flush=True)
data = sys.argv[2].encode()
reply = b""
try:
    socket.send_fds(sock, [struct.pack("!I", len(data)) + data], [0, 1, 2])
    while chunk := sock.recv(65536):
        reply += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
print(reply[4:].decode() or "closed", flush=True)
"""

# another user's server: binds the socket path, becomes that user, listens, prints what it got
SERVER = r"""
import os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.bind(sys.argv[1])
os.setgroups([])
os.setgid(int(sys.argv[3]))
os.setuid(int(sys.argv[2]))
sock.listen(1)  # SO_PEERCRED gives a client the credentials of this call
print("listening", flush=True)
conn, _ = sock.accept()
conn.settimeout(60)
print(len(conn.recv(1 << 16)), flush=True)
"""


@pytest.fixture(scope="module")
def cold(inputs, tmp_path_factory) -> Path:
    """A cold cell: what every refused cell must equal."""
    root = tmp_path_factory.mktemp("cold")
    proc = run(argv(inputs, "ppl", "rope", SHORT, root / "a.parquet"), cell_env(None), root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "a.parquet"


@pytest.fixture
def short_dir():
    """A folder short enough for socket paths (AF_UNIX: 108 characters), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder)


def squat(folder: Path, owner: str, mode: int) -> None:
    """Make ``folder`` as another user (``other``), a careless umask (``me``) or a symbolic link
    to a private folder (``link``) would leave it."""
    if owner == "link":
        target = folder.with_name("elsewhere")
        target.mkdir(mode=mode)
        folder.symlink_to(target)
        return
    folder.mkdir()
    os.chmod(folder, mode)
    if owner == "other":
        os.chown(folder, OTHER.pw_uid, OTHER.pw_gid)


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ropelens: warm runner: ")]


def clean_runner_env(monkeypatch) -> None:
    """Whatever export_for_workflow sets is undone after the test."""
    rc = runner_client
    for key in (rc.ENV_SOCKET, rc.ENV_OWNER, rc.ENV_MEMORY, rc.ENV_IDLE, rc.ENV_JOB):
        monkeypatch.setenv(key, "inherited")


# --- the folder ---------------------------------------------------------------------------------

SQUATS = {
    "theirs, open": ("other", 0o777, f"is owned by {THEIRS}"),
    "theirs, closed": ("other", 0o700, f"is owned by {THEIRS}"),
    "mine, open": ("me", 0o777, "has mode 0777, not 0700 (others can reach it)"),
    "a link": ("link", 0o700, "is a symbolic link"),
}


@pytest.mark.parametrize("case", list(SQUATS))
def test_workflow_makes_a_private_folder_when_its_folder_is_unfit(
    case, short_dir, tmp_path, monkeypatch, capsys
):
    owner, mode, problem = SQUATS[case]
    if owner == "other" and os.getuid() != 0:
        pytest.skip("making another user's folder needs root (CI runs as root)")
    clean_runner_env(monkeypatch)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    monkeypatch.chdir(tmp_path)
    usual = short_dir / f"ropelens-{ME}"
    squat(usual, owner, mode)
    runner_client.export_for_workflow({"warm": True})
    folder = Path(os.environ["ROPELENS_RUNNER"]).parent
    assert folder.parent == short_dir and folder.name.startswith(f"{usual.name}-")
    st = os.lstat(folder)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == ME and stat.S_IMODE(st.st_mode) == 0o700
    why = f"{usual} {problem}: the warm runner uses {folder} instead"
    assert warnings(capsys.readouterr().err) == [f"ropelens: warm runner: {why}"]
    assert [(e["event"], e["reason"]) for e in events(tmp_path)] == [("folder", why)]
    runner_client._remove_private(str(usual))  # at the end: the usual folder stays ...
    runner_client._remove_private(str(folder))  # ... the private one goes
    assert os.path.lexists(usual) and not folder.exists()


def test_workflow_without_a_private_folder_runs_its_cells_cold(
    short_dir, tmp_path, monkeypatch, capsys
):
    clean_runner_env(monkeypatch)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    monkeypatch.chdir(tmp_path)
    usual = short_dir / f"ropelens-{ME}"
    squat(usual, "me", 0o777)

    def denied(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runner_client.tempfile, "mkdtemp", denied)
    runner_client.export_for_workflow({"warm": True})
    assert "ROPELENS_RUNNER" not in os.environ  # the cells run cold
    why = f"{usual} has mode 0777, not 0700 (others can reach it), and no private folder can be "
    why += "made (Permission denied): cells run cold"
    assert warnings(capsys.readouterr().err) == [f"ropelens: warm runner: {why}"]
    assert [(e["event"], e["reason"]) for e in events(tmp_path)] == [("folder", why)]


@as_root
def test_a_cell_in_another_users_folder_runs_cold(inputs, cold, short_dir, tmp_path):
    folder = short_dir / "theirs"
    squat(folder, "other", 0o777)
    out = tmp_path / "a.parquet"
    proc = run(argv(inputs, "ppl", "rope", SHORT, out), cell_env(str(folder / "r.sock")), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    why = f"{folder} is owned by {THEIRS}; running this cell cold"
    assert warnings(proc.stderr) == [f"ropelens: warm runner: {why}"]
    assert [(e["event"], e["reason"]) for e in events(tmp_path)] == [("cold", why)]  # no runner
    assert list(folder.iterdir()) == []  # no lock, no socket of ours in their folder
    assert pq.read_table(out).equals(pq.read_table(cold))


# --- the connection -----------------------------------------------------------------------------


def client(path: str, request: dict, as_other: bool) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", CLIENT, path, json.dumps(request)]
    if as_other:
        ids = [f"--reuid={OTHER.pw_uid}", f"--regid={OTHER.pw_gid}", "--clear-groups"]
        cmd = ["setpriv", *ids, *cmd]
    kwargs = {"capture_output": True, "text": True, "timeout": 300}
    return subprocess.run(cmd, cwd="/", stdin=subprocess.DEVNULL, **kwargs)


@as_root
def test_runner_socket_is_owner_only_and_other_users_are_refused(inputs, cold, tmp_path):
    path = short_socket()
    env = cell_env(path)
    first = run(argv(inputs, "ppl", "rope", SHORT, tmp_path / "a.parquet"), env, tmp_path, umask=0)
    assert first.returncode == 0, first.stderr[-2000:]
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # started under umask 0
        assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(cold))
        # folder and socket opened to others (a squatted folder, a careless chmod)
        os.chmod(os.path.dirname(path), 0o755)
        os.chmod(path, 0o666)
        out = tmp_path / "b.parquet"
        request = {"op": "run", "argv": argv(inputs, "ppl", "rope", SHORT, out)}
        request.update(cwd=str(tmp_path), env=env, python=sys.executable)
        request["package"] = str(Path(runner_client.__file__).resolve().parent)
        theirs = client(path, request, as_other=True)
        assert theirs.stdout.splitlines() == ["connected", "closed"], theirs.stderr[-2000:]
        assert not out.exists()
        assert [e["uid"] for e in events(tmp_path, "refused")] == [OTHER.pw_uid]
        # the same request from this user is served: only the uid was refused
        mine = client(path, request, as_other=False)
        assert json.loads(mine.stdout.splitlines()[-1]) == {"exit": 0}, mine.stderr[-2000:]
        assert pq.read_table(out).equals(pq.read_table(cold))
    finally:
        stop_all(tmp_path, path)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


@as_root
def test_a_cell_refuses_a_server_of_another_user(inputs, cold, tmp_path):
    path = short_socket()
    ids = [str(OTHER.pw_uid), str(OTHER.pw_gid)]
    cmd = [sys.executable, "-c", SERVER, path, *ids]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline() == "listening\n"
        out = tmp_path / "a.parquet"
        proc = run(argv(inputs, "ppl", "rope", SHORT, out), cell_env(path), tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert server.communicate(timeout=60)[0] == "0\n"  # it was sent nothing
        why = f"{path} is served by {THEIRS}; running this cell cold"
        assert warnings(proc.stderr) == [f"ropelens: warm runner: {why}"]
        assert [(e["event"], e["reason"]) for e in events(tmp_path)] == [("cold", why)]
        assert pq.read_table(out).equals(pq.read_table(cold))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(os.path.dirname(path))
