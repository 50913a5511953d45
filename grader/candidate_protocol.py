"""The wire between the grader and the candidate process (stdlib + torch only: copied into the child).

Two :class:`Endpoint` objects, one per process, exchange length-prefixed messages over a pair of
pipes (:class:`multiprocessing.connection.Connection`). A message is a pickle of builtins only
(tuple, list, dict, str, bytes, bytearray, int, float, bool, None): the unpickler refuses every
global (:class:`_NoGlobals`), so no reply can make the receiver import or build a class.
Values cross as follows (:meth:`Endpoint.encode`):

- tensors by value: ``("\\0T", dtype, shape, device, bytes, grad_ref)``; torch.dtype,
  torch.device, torch.Size, numbers, strings, lists, exact tuples, dicts of those by value;
- a large tensor the child sent (>= :data:`REF_BYTES`) is kept there while the grader holds its
  copy; sent back unchanged (a training batch the grader passes on to the model), it crosses as
  its id, not its bytes;
- any other object of the exporting side stays there and crosses as a handle id; the other
  side gets a proxy (the child exports models, trainers, generators ...; the grader exports
  only callables, whose one operation is a call). A proxy sent back resolves to its object.

Calls nest both ways: while the grader waits for a reply it serves the child's callbacks
(a trainer calling the grader's ``get_batch``), and inside a callback it may call the child
again; each side answers the innermost request first. With every message travel the torch
global CPU RNG state, the grad mode and (grader to child) whether the meta device is the
default, so both processes behave as one would; meta tensors cross as dtype and shape.

Autograd across the wire: a tensor that requires grad and is sent by the child while one of the
grader's callbacks runs (the logits inside the grader's ``loss_fn``) becomes a leaf on the
grader's side; a scalar the callback returns that depends on such leaves crosses with its
gradients with respect to them, and the child rebuilds it as ``value + sum((x * g).sum() -
(x.detach() * g).sum())`` over its own tensors x: the same value, and ``backward()`` sends
exactly the grader's gradients g into the child's graph. Such a leaf the grader passes back to
the child unchanged (to a seam method inside the callback) crosses as a reference and resolves
to the child's own tensor, graph and all; a loss the child computed that the callback returns as
it came crosses with gradient 1 (m6's ``loss_fn`` returns ``impl.audio_loss(...)``).
"""

from __future__ import annotations

import collections
import itertools
import numbers
import weakref

import torch

if __package__:  # the grader: grader.candidate_wire; the candidate process: the file beside this one
    from .candidate_wire import TAG, ProtocolError, dumps, exception_record, flat_bytes, loads, rebuild_exception, tensor_from
else:
    from candidate_wire import TAG, ProtocolError, dumps, exception_record, flat_bytes, loads, rebuild_exception, tensor_from

REF_BYTES = 1 << 16  # the child keeps tensors this large it sent, so the grader can send them back by id


# ------------------------------------------------------------------ proxies
class Proxy:
    """An object of the other process. Attribute reads, calls, ``len``, iteration, indexing and
    ``bool`` are forwarded; its own state is kept in slots."""

    __slots__ = ("_ep", "_id", "_type", "_wrap", "__weakref__")

    def __init__(self, ep, oid, typename):
        object.__setattr__(self, "_ep", ep)
        object.__setattr__(self, "_id", oid)
        object.__setattr__(self, "_type", typename)
        object.__setattr__(self, "_wrap", {})  # attribute name -> fn(value) -> value (the grader's hooks)

    def _op(self, op, *args, **kwargs):
        return self._ep.request(op, self, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = self._op("getattr", name)
        wrap = self._wrap.get(name)
        return wrap(value) if wrap else value

    def __setattr__(self, name, value):
        self._op("setattr", name, value)

    def __call__(self, *args, **kwargs):
        return self._op("call", *args, **kwargs)

    def __len__(self):
        return self._op("len")

    def __iter__(self):
        return self._op("iter")

    def __next__(self):
        return self._op("next")

    def __getitem__(self, key):
        return self._op("getitem", key)

    def __setitem__(self, key, value):
        self._op("setitem", key, value)

    def __contains__(self, item):
        return self._op("contains", item)

    def __bool__(self):
        return self._op("bool")

    def __repr__(self):
        return f"<remote {self._type} #{self._id}>"

    def __del__(self):
        try:
            self._ep.released(self._id)
        except Exception:
            pass


CALLABLE_TYPES = ("method", "function", "builtin_function_or_method", "method-wrapper")
OPS = {"method": lambda o, name, *a, **k: getattr(o, name)(*a, **k), "getattr": getattr, "setattr": setattr, "call": lambda f, *a, **k: f(*a, **k), "len": len, "iter": iter,
       "next": next, "getitem": lambda o, k: o[k], "setitem": lambda o, k, v: o.__setitem__(k, v),
       "contains": lambda o, x: x in o, "bool": bool}


# ------------------------------------------------------------------ one side of the wire
class Endpoint:
    """One side: ``conn_in``/``conn_out`` Connections. ``grader``: True on the grader's side, which
    exports only callables and serves only calls of them; the child exports any object and
    serves :data:`OPS`. ``fixed``: objects the other side addresses as ids 0, 1, ... from the
    start. ``timeout``: seconds of silence after which a wait fails (None: wait forever);
    ``on_silence(what)`` / ``on_eof(what)`` / ``on_violation(what, why)`` (a message refused):
    the exceptions raised then; after any of them the endpoint is ``dead``."""

    def __init__(self, conn_in, conn_out, grader: bool, timeout=None, on_silence=None, on_eof=None,
                 on_violation=None, fixed=(), arenas=(None, None)):
        self.cin, self.cout, self.grader = conn_in, conn_out, grader
        self.arena_in, self.arena_out = arenas  # shared memory for tensor bytes (None: inline)
        self.on_violation = on_violation
        self.serves = frozenset({"call"}) if grader else frozenset(OPS)
        self.timeout, self.on_silence, self.on_eof = timeout, on_silence, on_eof
        self.exported: dict[int, list] = {}  # id -> [object, times sent]
        self.by_obj: dict[int, int] = {}  # id(object) -> export id
        self.proxies = weakref.WeakValueDictionary()  # the other side's id -> Proxy
        self.received: dict[int, int] = {}  # the other side's id -> times received (released together)
        self.pending_release: list = []
        self.ids = itertools.count(len(fixed))
        for i, obj in enumerate(fixed):
            self.exported[i] = [obj, float("inf")]
        self.rids = itertools.count(1)
        self.frames: list[dict] = []  # child: tensors sent inside each callback; grader: leaves received
        self.raised: dict[int, BaseException] = {}  # token -> an exception of ours that crossed
        self.tokens = itertools.count(1)
        self.origin: dict[int, tuple] = {}  # grader: id(tensor) -> (the child's id, version, weakref)
        self.stack: list[str] = []  # what is waiting, outermost first (for error messages)
        self.dead = None

    # ---------------------------------------------------------- values
    def encode(self, x, grads=False):
        if x is None or type(x) in (bool, int, float, str, bytes):
            return x
        if not isinstance(x, torch.Tensor):  # numpy scalars and other number or string subclasses: by value
            if isinstance(x, (bool, str, bytes)) or type(x).__name__ == "bool_":
                return (bool if type(x).__name__ == "bool_" else type(x).__mro__[-2])(x)
            if isinstance(x, numbers.Integral):
                return int(x)
            if isinstance(x, numbers.Real):
                return float(x)
        if isinstance(x, torch.Tensor):
            ref = None
            if x.requires_grad and self.frames and not self.grader:
                ref = next(self.ids)
                self.frames[-1]["tensors"][ref] = x
            leaf = self._leaf_ref(x) if self.grader and x.requires_grad and x.grad_fn is None else None
            # a scalar the callback computed from the child's tensors, or one of them returned as it
            # came (a loss the child computed, passed back by the grader's loss_fn): with its gradients
            if grads and x.requires_grad and x.dim() == 0 and self.frames and (x.grad_fn is not None or leaf):
                return self._with_grads(x)
            if leaf is not None:  # the child's requires-grad tensor passed back: its own, graph and all
                return (TAG + "L", leaf)
            if x.device.type == "meta":  # no data: its dtype and shape (a model sized up before it is built)
                return (TAG + "M", str(x.dtype).removeprefix("torch."), tuple(x.shape))
            home = self.origin.get(id(x)) if self.grader else None
            if home is not None and home[2]() is x and x._version == home[1]:
                return (TAG + "r", home[0])  # the child's own tensor, unchanged since: sent back by reference
            oid = None
            if not self.grader and x.numel() * x.element_size() >= REF_BYTES:  # kept while the grader holds it
                oid = self._export(x)
            flat = flat_bytes(x)
            off = self.arena_out.put(flat) if self.arena_out is not None else None
            data = (off, flat.numel()) if off is not None else bytearray(flat.numpy())
            return (TAG + "T", str(x.dtype).removeprefix("torch."), tuple(x.shape), str(x.device), data, ref, oid)
        if isinstance(x, torch.dtype):
            return (TAG + "D", str(x).removeprefix("torch."))
        if isinstance(x, torch.device):
            return (TAG + "V", str(x))
        if isinstance(x, torch.Size):
            return (TAG + "S", tuple(x))
        if type(x) is list:
            return [self.encode(v, grads) for v in x]
        if type(x) is tuple:
            return (TAG + "t", tuple(self.encode(v, grads) for v in x))
        if type(x) in (dict, collections.OrderedDict):  # a state_dict crosses as a dict
            return (TAG + "d", [(self.encode(k), self.encode(v, grads)) for k, v in x.items()])
        if isinstance(x, Proxy) and x._ep is self:
            return (TAG + "r", x._id)  # the other side's own object, back home
        if self.grader and not callable(x):
            raise TypeError(f"{type(x).__name__} cannot cross to the candidate process (only data and callables do)")
        return (TAG + "H", self._export(x), type(x).__name__)

    def _export(self, x) -> int:
        """The id the other side addresses ``x`` by, counted once more as sent."""
        key = self.by_obj.get(id(x))
        if key is None or self.exported.get(key, [None])[0] is not x:
            key = next(self.ids)
            self.by_obj[id(x)], self.exported[key] = key, [x, 0]
        self.exported[key][1] += 1
        return key

    def _leaf_ref(self, x):
        """The grader: the child's ref of ``x`` if ``x`` is a leaf made from one of its
        requires-grad tensors in a callback still running, unchanged since; else None."""
        for frame in reversed(self.frames):
            for ref, t in frame["leaves"].items():
                if t is x:
                    return ref if x._version == frame["versions"][ref] else None
        return None

    def _with_grads(self, x):
        leaves = self.frames[-1]["leaves"]
        refs = [r for r, t in leaves.items()]
        grads = torch.autograd.grad(x, [leaves[r] for r in refs], retain_graph=True, allow_unused=True) if refs else []
        pairs = [(r, self.encode(g)) for r, g in zip(refs, grads) if g is not None]
        return (TAG + "G", self.encode(x.detach()), pairs)

    def decode(self, x):
        if type(x) is list:
            return [self.decode(v) for v in x]
        if type(x) is not tuple or not x or not isinstance(x[0], str) or not x[0].startswith(TAG):
            return x
        tag = x[0][1:]
        if tag == "T":
            data = x[4]
            if isinstance(data, tuple):
                if self.arena_in is None:
                    raise ProtocolError("tensor in shared memory, but there is none")
                flat = self.arena_in.get(*data)
            else:
                flat = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
            t = tensor_from(x[1], x[2], x[3], flat)
            if len(x) > 6 and x[6] is not None and self.grader:  # the child keeps it until this copy dies
                self.origin[id(t)] = (x[6], t._version, weakref.ref(t))
                weakref.finalize(t, self._tensor_gone, id(t), x[6])
            if x[5] is not None and self.frames and self.grader:
                t.requires_grad_(True)
                self.frames[-1]["leaves"][x[5]] = t
                self.frames[-1]["versions"][x[5]] = t._version
            return t
        if tag == "t":
            return tuple(self.decode(v) for v in x[1])
        if tag == "d":
            return {self.decode(k): self.decode(v) for k, v in x[1]}
        if tag == "M":
            return torch.empty(x[2], dtype=self.decode((TAG + "D", x[1])), device="meta")
        if tag == "D":
            dt = getattr(torch, x[1], None)
            if not isinstance(dt, torch.dtype):
                raise ProtocolError(f"not a dtype: {x[1]}")
            return dt
        if tag == "V":
            return torch.device(x[1])
        if tag == "S":
            return torch.Size(x[1])
        if tag == "L" and not self.grader:
            for frame in reversed(self.frames):
                if x[1] in frame["tensors"]:
                    return frame["tensors"][x[1]]
            raise ProtocolError(f"no requires-grad tensor #{x[1]} here (its callback has returned)")
        if tag == "r":
            if x[1] not in self.exported:
                raise ProtocolError(f"no object #{x[1]} here (released?)")
            return self.exported[x[1]][0]
        if tag == "H":
            p = self.proxies.get(x[1])
            if p is None:
                p = self.proxies[x[1]] = Proxy(self, x[1], x[2])
            self.received[x[1]] = self.received.get(x[1], 0) + 1
            return p
        if tag == "G":
            value, tensors = self.decode(x[1]), self.frames[-1]["tensors"] if self.frames else {}
            for ref, g in x[2]:
                t, g = tensors[ref], self.decode(g)
                value = value + ((t * g).sum() - (t.detach() * g).sum())
            return value
        raise ProtocolError(f"unknown tag {tag!r}")

    def _tensor_gone(self, key, oid):
        self.origin.pop(key, None)
        self.pending_release.append((oid, 1))

    def released(self, oid):
        self.pending_release.append((oid, self.received.pop(oid, 0)))

    def _release(self, pairs):
        for oid, n in pairs:
            entry = self.exported.get(oid)
            if entry is not None:
                entry[1] -= n
                if entry[1] <= 0:
                    del self.exported[oid]
                    self.by_obj.pop(id(entry[0]), None)

    # ---------------------------------------------------------- messages
    def _state(self):
        return {"rng": bytes(torch.get_rng_state().numpy()), "grad": torch.is_grad_enabled(),
                "meta": torch.get_default_device().type == "meta"}

    def _apply(self, state):
        torch.set_rng_state(torch.frombuffer(bytearray(state["rng"]), dtype=torch.uint8))
        torch.set_grad_enabled(bool(state["grad"]))
        # the child builds on the meta device while the grader is inside ``with torch.device("meta")``
        # (a checkpoint's model sized up before anything is allocated); never the other way round
        meta = bool(state.get("meta"))
        if not self.grader and meta != (torch.get_default_device().type == "meta"):
            torch.set_default_device("meta" if meta else None)

    def _send(self, msg):
        rel, self.pending_release = self.pending_release, []
        self.cout.send_bytes(dumps((*msg, self._state(), rel)))

    def _recv(self):
        what = " -> ".join(self.stack) or "idle"
        try:
            silent = self.timeout is not None and not self.cin.poll(self.timeout)
            data = None if silent else self.cin.recv_bytes()
        except (EOFError, OSError):
            self.dead = f"connection lost in {what}"
            raise (self.on_eof or EOFError)(what) from None
        if silent:
            self.dead = f"no answer within {self.timeout:g} s in {what}"
            raise (self.on_silence or TimeoutError)(what)
        try:
            msg = loads(data)
            *body, state, rel = msg
            if not isinstance(body[0], str):
                raise ProtocolError(f"not a message: {type(body[0]).__name__}")
        except Exception as e:
            self.dead = f"refused message in {what}: {e}"
            if self.on_violation is None:
                raise ProtocolError(self.dead) from None
            raise self.on_violation(what, str(e)) from None
        self._apply(state)
        self._release(rel)
        return body

    def request(self, op, target, args=(), kwargs=None, label=None):
        """Run ``op`` on the other side's object ``target`` (a Proxy or a fixed id) and wait for
        its reply, serving the other side's nested requests meanwhile."""
        if self.dead:
            raise (self.on_eof or EOFError)(self.dead)
        rid = next(self.rids)
        if self.arena_out is not None:
            self.arena_out.reset()
        tid = target._id if isinstance(target, Proxy) else target
        kind = getattr(target, "_type", target)
        if label is None:  # what the grader waits for, in error messages: "ViT.eval()", "Trainer.step"
            name = args[0] if args and isinstance(args[0], str) else ""
            label = {"getattr": f"{kind}.{name}", "call": f"{kind}()", "method": f"{kind}.{name}()"}.get(
                op, f"{op} on {kind}")
        self.stack.append(label)
        if not self.grader:  # the child: requires-grad tensors it sends inside this callback are kept
            self.frames.append({"leaves": {}, "versions": {}, "tensors": {}})
        try:
            self._send(("req", rid, op, tid, self.encode(list(args)), self.encode(dict(kwargs or {}))))
            while True:
                body = self._recv()
                if body[0] == "req":
                    self._serve(body)
                    continue
                if body[1] != rid:
                    raise ProtocolError(f"reply to request {body[1]} while waiting for {rid}")
                if body[0] == "ok":
                    value = self.decode(body[2])
                    if op == "getattr" and isinstance(value, Proxy) and value._type in CALLABLE_TYPES:
                        object.__setattr__(value, "_type", f"{kind}.{args[0]}")  # "ViT.eval" in messages
                    return value
                exc = self.raised.pop(body[2].get("token"), None)
                raise exc if exc is not None else rebuild_exception(body[2])
        finally:
            self.stack.pop()
            if not self.grader:
                self.frames.pop()

    def _serve(self, body):
        _, rid, op, tid, args, kwargs = body
        grader = self.grader
        if grader:  # our callback runs: requires-grad tensors received inside it become leaves
            self.frames.append({"leaves": {}, "versions": {}, "tensors": {}})
        try:
            if op not in self.serves or op not in OPS:
                raise PermissionError(f"operation {op!r} is not served here")
            if tid not in self.exported:
                raise ProtocolError(f"no object #{tid} here")
            target = self.exported[tid][0]
            self.stack.append(f"{getattr(target, '__name__', type(target).__name__)} (callback)")
            try:
                value = OPS[op](target, *self.decode(args), **self.decode(kwargs))
            finally:
                self.stack.pop()
            if self.arena_out is not None:
                self.arena_out.reset()
            reply = ("ok", rid, self.encode(value, grads=grader))
        except Exception as e:
            if self.dead:  # the other side is gone: nothing to answer, the error goes up our own stack
                raise
            token = None
            if grader:  # kept (the last few) so that the same exception is raised if it comes back
                token = next(self.tokens)
                self.raised[token] = e
                for old in list(self.raised)[:-8]:
                    del self.raised[old]
            reply = ("err", rid, exception_record(e, token))
        finally:
            if grader:
                self.frames.pop()
        self._send(reply)

    def serve_forever(self):
        """The child's loop: answer requests until the grader closes the connection."""
        while True:
            try:
                body = self._recv()
            except EOFError:
                return
            if body[0] != "req":
                raise ProtocolError(f"unexpected {body[0]} at top level")
            self._serve(body)

