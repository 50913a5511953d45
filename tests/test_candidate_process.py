"""The candidate process (grader/candidate*.py): the wire between the grader and a child that
imports the implementation. A fake ``mmsys`` whose ``vit.ViT`` builds a test object (:data:`BOX`)
is served through the real seam (``Implementation.vit_build``), so every test crosses the same
pipes, handles and callbacks a grading does."""

import os
import pickle
import sys
import textwrap
import time

import pytest
import torch

from grader.candidate import CandidateCrashed, CandidateError, CandidateProcess, CandidateTimeout
from grader.candidate_wire import ProtocolError, RemoteError, dumps, loads

BOX = '''
import os, sys, time
import torch

class ViTConfig:
    def __init__(self, **kw):
        self.kw = kw

class Box:
    def __init__(self, cfg):
        self.cfg, self.value = cfg, 3
    def add(self, a, b):
        return a + b
    def twice(self, fn, x):
        return fn(fn(x))
    def nested(self, fn):
        return fn(self)                      # the grader gets a handle and calls back into us
    def fail(self):
        raise ValueError("bad value")
    def call(self, fn):
        return fn()
    def rng(self):
        return torch.rand(3)
    def grad_mode(self):
        return torch.is_grad_enabled()
    def train_with(self, loss_fn):
        w = torch.nn.Parameter(torch.arange(3.0))
        loss = loss_fn(w)
        loss.backward()
        return loss.detach(), w.grad
    def zeros(self, n):
        return torch.zeros(n)
    def half_square(self, w):                # a loss the candidate computes (m6's audio_loss)
        return (w * w).sum() / 2, {"n": 3}
    def generator(self, seed):
        return torch.Generator().manual_seed(seed)
    def draw(self, g):
        return torch.rand(2, generator=g)
    def write(self, path):
        with open(path, "w") as f:
            f.write("x")
        return "written"
    def connect(self):
        import socket
        socket.create_connection(("93.184.216.34", 80), timeout=2)
    def spawn(self):
        import subprocess
        return subprocess.run(["true"]).returncode
    def hang(self):
        while True:
            time.sleep(0.1)
    def crash(self):
        print("about to crash", flush=True)
        os._exit(3)
    def evil_reply(self):              # a message that would make the grader import a class
        import collections, pickle
        from multiprocessing.connection import Connection
        fd = int(sys.argv[sys.argv.index("--fd-out") + 1])
        Connection(fd).send_bytes(pickle.dumps(("ok", 1, collections.OrderedDict(), {}, [])))
        time.sleep(30)
    def big(self):
        self._big = torch.zeros(100_000)
        return self._big
    def is_big(self, t):
        return t is self._big
    def __len__(self):
        return 5
    def __getitem__(self, i):
        return i * 10
    def __iter__(self):
        return iter([1, 2])

def ViT(cfg):
    return Box(cfg)
'''


def fake_impl(root):
    (root / "mmsys").mkdir(parents=True)
    (root / "mmsys" / "__init__.py").write_text("")
    (root / "mmsys" / "vit.py").write_text(textwrap.dedent(BOX))
    return root


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    c = CandidateProcess(fake_impl(tmp_path_factory.mktemp("impl")), threads=1, timeout=60).start()
    yield c
    c.close()


@pytest.fixture
def box(child):
    return child.call("vit_build", {"a": 1})


@pytest.mark.integration
def test_remote_calls_with_tensors_and_handles(box):
    assert box.value == 3 and box.cfg.kw == {"a": 1}
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(box.add(x, x), 2 * x)
    assert box.add(torch.tensor([True]), torch.tensor([False])).dtype == torch.bool
    assert box.add((1, "a"), (2.5,)) == (1, "a", 2.5)
    assert len(box) == 5 and box[4] == 40 and list(box) == [1, 2]
    assert "Box" in repr(box)
    g = box.generator(7)  # a torch.Generator stays in the child; the handle goes back as itself
    assert torch.equal(box.draw(g), torch.rand(2, generator=torch.Generator().manual_seed(7)))


def test_callbacks_and_nested_callbacks(box):
    assert box.twice(lambda v: v + 1, 1) == 3
    seen = []

    def inner(handle):  # called by the child with a handle to the child's own object
        seen.append(handle.value)
        return handle.twice(lambda v: v * 2, 5)  # ... which calls the child, which calls us again

    assert box.nested(inner) == 20 and seen == [3]


def test_errors_cross_with_their_class_and_the_grader_gets_its_own_back(box):
    with pytest.raises(ValueError, match="bad value") as e:
        box.fail()
    assert isinstance(e.value, RemoteError) and "ValueError" in e.value.remote_traceback
    mine = KeyError("the grader's")

    def raiser():
        raise mine

    with pytest.raises(KeyError) as e:
        box.call(raiser)
    assert e.value is mine


def test_rng_state_and_grad_mode_travel_with_the_call(box):
    torch.manual_seed(0)
    remote, after = box.rng(), torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(remote, torch.rand(3)) and torch.equal(after, torch.rand(1))
    assert box.grad_mode() is True
    with torch.no_grad():
        assert box.grad_mode() is False


def test_gradients_cross_from_a_grader_loss_into_the_child_graph(box):
    loss, grad = box.train_with(lambda w: (w * w).sum() / 2 + w[0])  # computed here, backward there
    assert loss.item() == 2.5 and torch.equal(grad, torch.tensor([1.0, 1.0, 2.0]))


def test_the_meta_device_travels_to_the_child(box):
    # load_into sizes a checkpoint's model up on the meta device before building it for real
    with torch.device("meta"):
        t = box.zeros(1 << 40)  # 4 TiB if it were allocated
    assert t.device.type == "meta" and t.shape == (1 << 40,)
    assert box.zeros(2).device.type == "cpu"


def test_a_loss_the_child_computed_goes_back_through_a_grader_callback_with_its_graph(box):
    # the grader's loss_fn returns the candidate's own loss as it came (m6: impl.audio_loss)
    loss, grad = box.train_with(lambda w: box.half_square(w)[0])
    assert loss.item() == 2.5 and torch.equal(grad, torch.tensor([0.0, 1.0, 2.0]))


def test_restricted_unpickling():
    assert loads(dumps(("ok", 1, [b"x", {"a": (1.5, None)}], {}, []))) == ("ok", 1, [b"x", {"a": (1.5, None)}], {}, [])
    for evil in (pickle.dumps(os.system), pickle.dumps(torch.ones(1)), pickle.dumps(ProtocolError("x"))):
        with pytest.raises(ProtocolError, match="refused"):
            loads(evil)


@pytest.mark.integration
def test_a_reply_that_would_import_a_class_is_refused(tmp_path):
    c = CandidateProcess(fake_impl(tmp_path), threads=1, timeout=60).start()
    try:
        with pytest.raises(CandidateError, match="refuses.*collections.OrderedDict"):
            c.call("vit_build", {}).evil_reply()
        assert c.proc.poll() is not None  # killed
    finally:
        c.close()


@pytest.mark.integration
def test_a_hang_times_out_naming_the_call(tmp_path):
    c = CandidateProcess(fake_impl(tmp_path), threads=1, timeout=3).start()
    try:
        box, t = c.call("vit_build", {}), time.time()
        with pytest.raises(CandidateTimeout, match=r"within 3 s in .*hang"):
            box.hang()
        assert time.time() - t < 20 and c.proc.poll() is not None
    finally:
        c.close()


@pytest.mark.integration
def test_a_crash_says_where_and_what_it_printed(tmp_path):
    c = CandidateProcess(fake_impl(tmp_path), threads=1, timeout=60).start()
    try:
        with pytest.raises(CandidateCrashed, match=r"(?s)code 3\) in .*crash.*about to crash"):
            c.call("vit_build", {}).crash()
        with pytest.raises(CandidateCrashed):  # and every later call fails at once
            c.call("vit_build", {})
    finally:
        c.close()


def test_the_child_sees_nothing_of_the_grader(child):
    hello = child.hello
    assert hello["importable"] == {"grader": False, "milestones": False, "eval": False}
    repo = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    assert not any(p == repo or p.startswith(repo + os.sep) for p in hello["sys_path"])
    if os.geteuid() == 0 and child.drop:
        assert hello["uid"] != 0


def test_the_guard_refuses_and_records(box, child, tmp_path):
    with pytest.raises(PermissionError):
        box.write(str(tmp_path / "report.json"))
    assert not (tmp_path / "report.json").exists()
    with pytest.raises(PermissionError):
        box.connect()
    with pytest.raises(PermissionError):
        box.spawn()
    assert box.write("inside.txt") == "written"  # its own folder is writable
    events = [a["event"] for a in child.isolation()["attempts"]]
    assert {"open for writing", "start a program"} <= set(events)
    assert set(events) & {"network socket", "socket.getaddrinfo", "socket.connect"}, events


def test_a_large_tensor_goes_back_by_reference_while_unchanged(box):
    t = box.big()
    assert box.is_big(t) is True and box.is_big(t.clone()) is False
    t.add_(1)  # changed here: by value again
    assert box.is_big(t) is False


def test_only_data_and_callables_cross_from_the_grader(box):
    with pytest.raises(TypeError, match="cannot cross"):
        box.add(object(), object())


def test_overhead_of_a_round_trip(box):
    x = torch.randn(128, 3, 32, 32)
    t = time.perf_counter()
    for _ in range(20):
        box.add(x, 0)
    per_call = (time.perf_counter() - t) / 20
    print(f"round trip with 1.5 MB each way: {per_call * 1e3:.1f} ms", file=sys.stderr)
    assert per_call < 0.5


@pytest.mark.integration
def test_without_dropping_privileges_the_guard_still_refuses(tmp_path):
    """Not root, or no setpriv/unshare: the child runs as the grader's user; the audit hook is
    what stops it writing the grader's files, and the report says so."""
    c = CandidateProcess(fake_impl(tmp_path / "impl"), threads=1, timeout=60, drop=False).start()
    try:
        assert c.hello["uid"] == os.getuid() and c.hello["importable"]["grader"] is False
        with pytest.raises(PermissionError):
            c.call("vit_build", {}).write(str(tmp_path / "report.json"))
        assert not (tmp_path / "report.json").exists()
        iso = c.isolation()
        assert any("audit hook is the only barrier" in p for p in iso["protections"]) and iso["refused"] == 1
    finally:
        c.close()
