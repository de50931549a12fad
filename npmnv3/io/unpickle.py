"""An allowlisted pickle interpreter in Python: the opcodes ``torch.save`` writes, nothing else.

``pickle.Unpickler`` (C) believes the numbers in the stream: one ``LONG_BINPUT 808350565`` in a
1.4 KB file makes it grow its memo *array* to 1.6 G slots (12.9 GB) before it finds the file
is corrupt. This interpreter runs the stream one opcode at a time, like torch's weights-only
unpickler (torch/_weights_only_unpickler.py, ``Unpickler.load``), with the same opcode set:

* the memo is a dict; the memo, each stack frame, the MARK nesting, every string and every
  container have a bound (``Limits``); a length field is checked against the bytes left before
  anything is read or allocated. Each opcode consumes at least one byte and makes at most one
  new object, so time and memory grow linearly with the pickle, whatever it says;
* globals, calls (``REDUCE``/``NEWOBJ``), ``BUILD`` and persistent ids are decided by a
  ``Policy``, whose methods refuse everything; the caller's subclass is the allowlist;
* dict keys must be strings, numbers, ``None`` or flat tuples of those: hashing a tuple nested
  through memo references costs 2**depth, and nothing in a state_dict needs one.

Anything else raises ``CheckpointError`` (a ValueError): one line naming the problem, the
opcode's byte offset and which pickle it was in. Protocol: the pickle module's documentation of
the opcodes, ``pickletools.opcodes`` (Lib/pickletools.py), and CPython's Lib/pickle.py
``_Unpickler``, whose semantics each handler below follows.
"""

from __future__ import annotations

import pickle
import pickletools
import struct
from typing import Any, NamedTuple

__all__ = ["CheckpointError", "Limits", "Policy", "unpickle"]


class CheckpointError(ValueError):
    """The file is not a readable torch checkpoint, or it asks for something not allowed."""


class Limits(NamedTuple):
    """Bounds on one pickle. torch's data.pkl of MobileNetV3-Large (46 KB): 2,925 memo entries,
    MARK nesting 3, frames of a few items, the longest string a key of 41 bytes."""

    memo: int = 1 << 20  # memo entries
    stack: int = 1 << 20  # items in one stack frame (between two MARKs)
    marks: int = 100  # MARK nesting
    string: int = 1 << 24  # bytes of one string (16 MiB)
    container: int = 1 << 22  # items of one tuple, list or dict
    line: int = 256  # bytes of a GLOBAL's module or name line


DEFAULT_LIMITS = Limits()
_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}
_ATOMS = frozenset({str, int, float, bool, type(None), bytes})


def _key_ok(key) -> bool:
    """Cheap to hash: an atom or a flat tuple of atoms (see the module docstring)."""
    t = type(key)
    return t in _ATOMS or (t is tuple and len(key) <= 64 and all(type(k) in _ATOMS for k in key))


class Policy:
    """What a pickle may build. Every method refuses; subclass it to allow things."""

    def find_global(self, module: str, name: str) -> Any:
        raise CheckpointError(f"refusing to load global {f'{module}.{name}'!r}")

    def call(self, func, args: tuple) -> Any:  # REDUCE: func(*args)
        raise CheckpointError(f"refusing to call {self.describe(func)}")

    def newobj(self, cls, args: tuple) -> Any:  # NEWOBJ: cls.__new__(cls, *args)
        raise CheckpointError(f"refusing to create an instance of {self.describe(cls)}")

    def build(self, inst, state) -> None:  # BUILD: inst.__setstate__(state)
        raise CheckpointError(f"refusing to BUILD {self.describe(inst)}")

    def persistent_load(self, pid) -> Any:  # BINPERSID
        raise CheckpointError("refusing persistent id")

    def describe(self, obj) -> str:
        """A short name for an object of the pickle (never its repr: that can be huge)."""
        return f"a {type(obj).__name__}"


class _Machine:
    """State of one run: the stream, a position, the stack, its MARK frames and the memo."""

    def __init__(self, data, start: int, policy: Policy, limits: Limits):
        self.data, self.pos, self.end = data, start, len(data)
        self.policy, self.limits = policy, limits
        self.stack: list = []
        self.frames: list[list] = []  # the stacks saved by MARK
        self.memo: dict[int, Any] = {}

    # --- reading the stream; every length is checked before it is used
    def take(self, n: int) -> bytes:
        start, stop = self.pos, self.pos + n
        if stop > self.end:
            raise CheckpointError(f"truncated: needs {n} bytes, {self.end - start} left")
        self.pos = stop
        return self.data[start:stop]

    def unpack(self, fmt: str, n: int):
        if self.pos + n > self.end:
            raise CheckpointError(f"truncated: needs {n} bytes, {self.end - self.pos} left")
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def byte(self) -> int:
        return self.unpack("B", 1)

    def line(self) -> str:
        stop = min(self.end, self.pos + self.limits.line + 1)
        nl = self.data.find(b"\n", self.pos, stop)
        if nl < 0:
            raise CheckpointError(f"GLOBAL name not ended by a newline within "
                                  f"{self.limits.line} bytes")
        raw, self.pos = self.data[self.pos : nl], nl + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError("GLOBAL name is not UTF-8") from None

    def text(self, n: int, errors: str) -> str:
        if n > self.limits.string:
            raise CheckpointError(f"string of {n} bytes, more than {self.limits.string}")
        try:
            return str(self.take(n), "utf-8", errors)
        except UnicodeDecodeError:
            raise CheckpointError("string is not UTF-8") from None

    # --- the stack
    def pop(self):
        if not self.stack:
            raise CheckpointError("stack underflow")
        return self.stack.pop()

    def top(self):
        if not self.stack:
            raise CheckpointError("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.frames:
            raise CheckpointError("no MARK to pop to")
        items, self.stack = self.stack, self.frames.pop()
        return items

    def grow(self, target, n: int, kind: type, what: str):
        if not isinstance(target, kind):
            raise CheckpointError(f"{what} on {self.policy.describe(target)}, not a "
                                  f"{kind.__name__}")
        if len(target) + n > self.limits.container:
            raise CheckpointError(f"container of more than {self.limits.container} items")

    def setitems(self, target, items: list):
        self.grow(target, len(items) // 2, dict, "SETITEM")
        for k in items[::2]:
            if not _key_ok(k):
                raise CheckpointError(f"dict key is {self.policy.describe(k)}: only strings, "
                                      f"numbers, None and flat tuples of them are allowed")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    # --- opcode handlers (Lib/pickle.py _Unpickler.load_*); STOP returns True
    def op_proto(self):
        if self.byte() > pickle.HIGHEST_PROTOCOL:
            raise CheckpointError("unsupported pickle protocol")

    def op_stop(self):
        return True

    def op_global(self):
        module = self.line()
        self.stack.append(self.policy.find_global(module, self.line()))

    def op_newobj(self):
        args, cls = self.pop(), self.pop()
        if type(args) is not tuple:
            raise CheckpointError("NEWOBJ arguments are not a tuple")
        self.stack.append(self.policy.newobj(cls, args))

    def op_reduce(self):
        args, func = self.pop(), self.top()
        if type(args) is not tuple:
            raise CheckpointError("REDUCE arguments are not a tuple")
        self.stack[-1] = self.policy.call(func, args)

    def op_build(self):
        state = self.pop()
        self.policy.build(self.top(), state)

    def op_append(self):
        item = self.pop()
        target = self.top()
        self.grow(target, 1, list, "APPEND")
        target.append(item)

    def op_appends(self):
        items = self.pop_mark()
        target = self.top()
        self.grow(target, len(items), list, "APPENDS")
        target.extend(items)

    def op_setitem(self):
        value, key = self.pop(), self.pop()
        self.setitems(self.top(), [key, value])

    def op_setitems(self):
        items = self.pop_mark()
        if len(items) % 2:
            raise CheckpointError("SETITEMS with an odd number of items")
        self.setitems(self.top(), items)

    def op_mark(self):
        if len(self.frames) >= self.limits.marks:
            raise CheckpointError(f"MARKs nested more than {self.limits.marks} deep")
        self.frames.append(self.stack)
        self.stack = []

    def op_tuple(self):
        items = self.pop_mark()
        if len(items) > self.limits.container:
            raise CheckpointError(f"tuple of more than {self.limits.container} items")
        self.stack.append(tuple(items))

    def tuple_n(self, n: int):
        if len(self.stack) < n:
            raise CheckpointError("stack underflow")
        self.stack[-n:] = [tuple(self.stack[-n:])]

    def op_tuple1(self):
        self.tuple_n(1)

    def op_tuple2(self):
        self.tuple_n(2)

    def op_tuple3(self):
        self.tuple_n(3)

    def op_none(self):
        self.stack.append(None)

    def op_newfalse(self):
        self.stack.append(False)

    def op_newtrue(self):
        self.stack.append(True)

    def op_empty_tuple(self):
        self.stack.append(())

    def op_empty_list(self):
        self.stack.append([])

    def op_empty_dict(self):
        self.stack.append({})

    def op_empty_set(self):  # stays empty: ADDITEMS is not allowed (nor by torch)
        self.stack.append(set())

    def op_binint(self):
        self.stack.append(self.unpack("<i", 4))

    def op_binint1(self):
        self.stack.append(self.byte())

    def op_binint2(self):
        self.stack.append(self.unpack("<H", 2))

    def op_long1(self):
        self.stack.append(int.from_bytes(self.take(self.byte()), "little", signed=True))

    def op_binfloat(self):
        self.stack.append(self.unpack(">d", 8))

    def op_binunicode(self):
        self.stack.append(self.text(self.unpack("<I", 4), "surrogatepass"))

    def op_short_binstring(self):  # a Python 2 str; torch.load decodes it as UTF-8
        self.stack.append(self.text(self.byte(), "strict"))

    def op_binpersid(self):
        self.stack.append(self.policy.persistent_load(self.pop()))

    def get(self, index: int):
        try:
            self.stack.append(self.memo[index])
        except KeyError:
            raise CheckpointError(f"memo index {index} was never stored") from None

    def op_binget(self):
        self.get(self.byte())

    def op_long_binget(self):
        self.get(self.unpack("<I", 4))

    def put(self, index: int):
        if index not in self.memo and len(self.memo) >= self.limits.memo:
            raise CheckpointError(f"more than {self.limits.memo} memo entries")
        self.memo[index] = self.top()

    def op_binput(self):
        self.put(self.byte())

    def op_long_binput(self):
        self.put(self.unpack("<I", 4))

    def run(self, where: str):
        """Interpret up to STOP: (the object, the position after STOP)."""
        ops, data = _OPS, self.data
        at = self.pos
        try:
            while True:
                at = self.pos
                if at >= self.end:
                    raise CheckpointError("truncated: the pickle ends before STOP")
                self.pos = at + 1
                op = ops.get(data[at])
                if op is None:
                    if data[at] not in _NAMES:
                        raise CheckpointError(f"byte 0x{data[at]:02x} is not a pickle opcode")
                    raise CheckpointError(f"refusing pickle opcode {_NAMES[data[at]]}")
                if op(self):
                    return self.pop(), self.pos
                if len(self.stack) > self.limits.stack:
                    raise CheckpointError(f"more than {self.limits.stack} items on the stack")
        except CheckpointError as e:
            name = _NAMES.get(data[at]) if at < self.end else None
            name = f"{name} " if name else ""
            raise CheckpointError(f"{e} ({name}at byte {at} of {where})") from None


_OPS = {getattr(pickle, name.upper())[0]: getattr(_Machine, f"op_{name}") for name in (
    "proto stop global newobj reduce build append appends setitem setitems mark tuple tuple1 "
    "tuple2 tuple3 none newfalse newtrue empty_tuple empty_list empty_dict empty_set binint "
    "binint1 binint2 long1 binfloat binunicode short_binstring binpersid binget long_binget "
    "binput long_binput").split()}  # the opcodes of torch/_weights_only_unpickler.py


def unpickle(data: bytes, policy: Policy, *, start: int = 0, where: str = "the pickle",
             limits: Limits = DEFAULT_LIMITS) -> tuple[Any, int]:
    """Interpret the pickle that begins at ``data[start]``: ``(object, offset after STOP)``.

    ``policy`` decides every global, call, BUILD and persistent id; ``where`` names the pickle
    in error messages. Raises ``CheckpointError`` for anything outside the opcode set or the
    limits, or anything the policy refuses.
    """
    return _Machine(data, start, policy, limits).run(where)
