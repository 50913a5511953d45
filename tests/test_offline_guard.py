"""The offline guard (grader/offline.py) refuses every route to the network, in this process and in
the processes it starts, and records each attempt.

Every test aims only at a listener it starts on 127.0.0.1, with loopback taken off the guard's
allow-list for that test (``allow_loopback=False``), and checks the listener saw nothing; no test
ever names an outside address. The guard's audit hook stays installed in this pytest process
(audit hooks cannot be removed) but reads the guard state the ``guard`` fixture swaps in and
restores, so other tests run unguarded.
"""

from __future__ import annotations

import _socket
import argparse
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from grader import offline

WAIT = 0.3  # seconds a listener waits for something that must not arrive


@pytest.fixture
def guard(tmp_path, monkeypatch):
    """Activate the guard for one test (``guard()`` refuses loopback too; ``guard(True)`` keeps
    it open); this process's environment and guard state are restored afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSYS_OFFLINE")}
    monkeypatch.setattr(os, "environ", env)
    monkeypatch.setattr(offline, "_GUARD", offline._Guard())

    def start(allow_loopback: bool = False):
        offline.block_network(allow_loopback=allow_loopback, log=tmp_path / "network.jsonl")
    return start


@pytest.fixture
def tcp_listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(WAIT)
    yield srv
    srv.close()


def saw_nothing(srv: socket.socket) -> bool:
    """No connection reached the listener (the kernel queues completed handshakes for accept)."""
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        return True
    conn.close()
    return False


def events() -> list[str]:
    return [a["event"] for a in offline.attempts()]


def test_socket_connect_refused(guard, tcp_listener):
    guard()
    with socket.socket() as s, pytest.raises(offline.NetworkBlocked, match="offline"):
        s.connect(tcp_listener.getsockname())
    with pytest.raises(offline.NetworkBlocked):
        socket.create_connection(tcp_listener.getsockname(), timeout=2)
    assert saw_nothing(tcp_listener)
    assert "socket.connect" in events()


def test_connect_ex_refused(guard, tcp_listener):
    guard()
    with socket.socket() as s, pytest.raises(offline.NetworkBlocked):
        s.connect_ex(tcp_listener.getsockname())
    assert saw_nothing(tcp_listener)
    assert events() == ["socket.connect"]


def test_bare_socket_module_connect_refused(guard, tcp_listener):
    guard()
    raw = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        with pytest.raises(offline.NetworkBlocked):
            raw.connect(tcp_listener.getsockname())
    finally:
        raw.close()
    assert saw_nothing(tcp_listener)
    assert events() == ["socket.connect"]


def test_udp_sendto_and_sendmsg_refused(guard):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(WAIT)
    guard()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            with pytest.raises(offline.NetworkBlocked):
                tx.sendto(b"x", rx.getsockname())
            with pytest.raises(offline.NetworkBlocked):
                tx.sendmsg([b"x"], [], 0, rx.getsockname())
        with pytest.raises(socket.timeout):
            rx.recvfrom(16)
    finally:
        rx.close()
    assert events() == ["socket.sendto", "socket.sendmsg"]


def test_name_lookups_refused(guard):
    guard()  # "localhost" resolves locally (/etc/hosts); with loopback refused it is refused too
    for lookup in (lambda: socket.getaddrinfo("localhost", 80), lambda: socket.gethostbyname("localhost"),
                   lambda: socket.gethostbyname_ex("localhost"), lambda: socket.gethostbyaddr("127.0.0.1"),
                   lambda: socket.getnameinfo(("127.0.0.1", 80), 0)):
        with pytest.raises(offline.NetworkBlocked):
            lookup()
    assert events() == ["socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname",
                        "socket.gethostbyaddr", "socket.getnameinfo"]


CHILD = """
import os, socket, subprocess, sys
port = int(sys.argv[1])
try:
    socket.create_connection(("127.0.0.1", port), timeout=2)
    print("child connected")
except OSError as e:
    print("child refused", type(e).__name__)
grandchild = '''
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
    print("grandchild connected")
except OSError as e:
    print("grandchild refused", type(e).__name__)
'''
# an environment of its own, without the guard's variables (as torchrun workers of a test get)
done = subprocess.run([sys.executable, "-c", grandchild, str(port)], env={"PATH": os.environ.get("PATH", "")},
                      capture_output=True, text=True)
print(done.stdout.strip(), done.stderr.strip())
"""


def test_child_processes_guarded_and_counted(guard, tcp_listener):
    guard()
    port = tcp_listener.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(port)], env=offline.child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "child refused NetworkBlocked" in proc.stdout and "grandchild refused NetworkBlocked" in proc.stdout, \
        proc.stdout + proc.stderr
    assert saw_nothing(tcp_listener)
    seen = offline.attempts()
    assert len({a["pid"] for a in seen}) == 2 and os.getpid() not in {a["pid"] for a in seen}
    net = offline.record(download_allowed=False)
    assert net["blocked"] and len(net["attempts"]) == 2
    assert "2 attempt(s) refused in 2 process(es)" in net["statement"] and "Java" in net["statement"]


def test_decision_parses_not_prefixes():
    for host in ("localhost.example", "127.0.0.1.example", "localhost-proxy", "10.0.0.1", "192.168.1.1",
                 "::ffff:10.0.0.1", "<broadcast>", "127.1"):
        assert not offline.is_local(host), host
    for host in ("localhost", "LOCALHOST.", b"localhost", "127.0.0.1", "127.8.9.10", "::1",
                 "::ffff:127.0.0.1", "0.0.0.0", None):
        assert offline.is_local(host), host
    assert not offline.is_local("127.0.0.1", allow_loopback=False)


def test_loopback_allowed_by_default(guard, tcp_listener):
    guard(True)  # what the grader does (gloo rendezvous in tests/test_ddp.py uses loopback)
    with socket.create_connection(tcp_listener.getsockname(), timeout=2):
        assert not saw_nothing(tcp_listener)
    socket.getaddrinfo("localhost", 80)
    assert offline.attempts() == []
    assert "0 attempt(s) refused" in offline.record(download_allowed=False)["statement"]


def test_grader_children_get_the_guard(guard, monkeypatch, tmp_path):
    """The shape-test pytest (grader/run.py) and the ``all --jobs`` children (grader/parallel.py)
    are started with the guard's environment."""
    import grader.parallel
    import grader.run
    guard(True)
    envs = []

    def fake_run(cmd, **kw):
        envs.append(kw["env"])
        return subprocess.CompletedProcess(cmd, 0, "1 passed", "")

    class FakePopen:
        def __init__(self, cmd, **kw):
            envs.append(kw["env"])
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(grader.run.subprocess, "run", fake_run)
    monkeypatch.setattr(grader.parallel.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(grader.parallel.time, "sleep", lambda s: None)
    milestone = SimpleNamespace(id="m1", marker="m1", test_files=[])
    grader.run.run_shape_tests(milestone, tmp_path, False, {"bundled": True, "path": "mmsys"})
    args = argparse.Namespace(profile="quick", out=tmp_path / "out", seed=0, device="cpu", data_root=None,
                              impl=None, download=False, skip_tests=True, smoke=False, jobs=2,
                              world_seed=0, require_human=False)
    grader.parallel.grade_in_parallel(["m1", "m2"], args)
    assert len(envs) == 3
    for env in envs:
        assert env[offline.ENV_ON] == "1" and str(tmp_path / "network.jsonl") in env[offline.ENV_LOG]
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(offline.SITE_DIR)
        assert offline.ENV_LOOPBACK not in env  # loopback stays open in the grader's children
