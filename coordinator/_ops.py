"""Decoding and validating requests: the one place a frame or a logged record becomes an op.

Design
------
Every byte a client writes into its ring is untrusted, and so is every payload of a WAL
record whose checksum passes (a forged or buggy record checksums fine). Both become a
typed op here, through a :class:`msgspec.msgpack.Decoder` of a tagged union of
``array_like`` structs, one per op: the wire form stays ``[op, wait, *args]`` (see
``shmstore._channel``), and the op code is the union's tag.

Decoding into these types is the validation of a request's *shape*:

- the nesting depth is bounded by the types (an array nested 200,000 deep fails at its
  first element, without recursing), and every array's length is checked against the
  bytes that are left before anything is allocated;
- every field has its type (no float, bool or string where an int or bytes belongs),
  arity is exact (``forbid_unknown_fields``), unknown op codes are refused;
- integers are in range: expiry words and versions are ``>= 0`` (a msgpack integer is
  at most ``2**64 - 1``, the width of the slot words they go into); ``wait`` is 0 or 1.

What depends on the store (key and value lengths, capacity, a table's rows) is checked
by the engine, before its first store into the segment; a batch is checked whole first.
So a request that reaches the engine can only fail as a whole, never half applied, and
nothing is taken from a free list for a request that is then refused.

Two decoders: :data:`decode_request` for client frames (only the ops a client may
send; ``OP_EXPIRE`` is the coordinator's own) and :data:`decode_logged` for WAL records
and the batch redo area (only the ops that are logged).
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from shmstore import _channel as C

#: an unsigned 64-bit word (msgpack integers stop at 2**64 - 1)
U64 = Annotated[int, msgspec.Meta(ge=0)]
#: a request's ``wait`` flag (clients send ``int(wait)``)
Wait = Union[bool, Annotated[int, msgspec.Meta(ge=0, le=1)]]


class _Op(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True, gc=False):
    """Base of the ops: ``[code, wait, *fields]`` on the wire.

    Indexing gives the wire form's items (``op[0]`` the code, ``op[1]`` wait, ...), as
    the plain lists of before did (tests and tools still index ops); the coordinator
    itself reads the fields by name.
    """

    def as_list(self) -> list:
        return [self.__struct_config__.tag, *(getattr(self, f) for f in self.__struct_fields__)]

    def __getitem__(self, i: int | slice) -> object:
        return self.as_list()[i]

    def __len__(self) -> int:
        return 1 + len(self.__struct_fields__)


class Put(_Op, tag=C.OP_PUT):
    wait: Wait
    key: bytes
    value: bytes
    expiry: U64


class Delete(_Op, tag=C.OP_DELETE):
    wait: Wait
    key: bytes


class Cas(_Op, tag=C.OP_CAS):
    wait: Wait
    key: bytes
    value: bytes
    version: U64
    expiry: U64


class Incr(_Op, tag=C.OP_INCR):
    wait: Wait
    key: bytes
    delta: int


class BatchPut(_Op, tag=C.OP_PUT):
    """A put inside a batch: ``[OP_PUT, key, value]`` or ``[OP_PUT, key, value, expiry]``."""

    key: bytes
    value: bytes
    expiry: U64 = 0


class BatchDelete(_Op, tag=C.OP_DELETE):
    """A delete inside a batch: ``[OP_DELETE, key]``."""

    key: bytes


class Batch(_Op, tag=C.OP_BATCH):
    wait: Wait
    ops: list[Union[BatchPut, BatchDelete]]


class GetMany(_Op, tag=C.OP_GET_MANY):
    wait: Wait
    keys: list[bytes]


class Ping(_Op, tag=C.OP_PING):
    wait: Wait


class Checkpoint(_Op, tag=C.OP_CHECKPOINT):
    wait: Wait


class Backup(_Op, tag=C.OP_BACKUP):
    wait: Wait
    dest: str


class Expire(_Op, tag=C.OP_EXPIRE):
    """Coordinator-made, logged only: these keys expired at ``now`` (ns)."""

    wait: Wait
    keys: list[bytes]
    now: U64


class Evict(_Op, tag=C.OP_EVICT):
    """Coordinator-made, logged only: these keys were evicted to make room."""

    wait: Wait
    keys: list[bytes]


class MovePage(_Op, tag=C.OP_MOVE_PAGE):
    """Coordinator-made, logged only: a page of class ``src`` went to class ``dst``."""

    wait: Wait
    src: Annotated[int, msgspec.Meta(ge=0, lt=64)]
    dst: Annotated[int, msgspec.Meta(ge=0, lt=64)]


class Snapshot(_Op, tag=C.OP_SNAPSHOT):
    wait: Wait


class TableCreate(_Op, tag=C.OP_TABLE_CREATE):
    wait: Wait
    table: str
    dtype: str
    rows: int


class TableWrite(_Op, tag=C.OP_TABLE_WRITE):
    wait: Wait
    table: str
    rows: bytes
    values: bytes


class TableRead(_Op, tag=C.OP_TABLE_READ):
    wait: Wait
    table: str


#: ops that change the store (logged; refused while the WAL cannot be written)
WRITES = (Put, Delete, Cas, Incr, Batch, TableCreate, TableWrite)
Request = Union[Put, Delete, Cas, Incr, Batch, GetMany, Ping, Checkpoint, Backup, Snapshot, TableCreate,
                TableWrite, TableRead]
Logged = Union[Put, Delete, Cas, Incr, Batch, Expire, Evict, MovePage, TableCreate, TableWrite]

#: a client frame -> a typed op; raises ``msgspec.DecodeError`` (``ValidationError``)
decode_request = msgspec.msgpack.Decoder(Request).decode
#: a WAL record's payload (or the redo area's) -> a typed op; raises ``msgspec.DecodeError``
decode_logged = msgspec.msgpack.Decoder(Logged).decode


def epochs_of(op: object) -> int:
    """How many epochs a logged op takes (one per key of a batch or an expiry)."""
    if type(op) is Batch:
        return len(op.ops)
    if type(op) is Expire or type(op) is Evict:
        return len(op.keys)
    return 1


def logged_problem(op: object, key_size: int, value_size: int) -> str | None:
    """What makes a decoded logged op impossible for a store of these sizes (None: nothing).

    ``shmstore.check`` uses it on every WAL record: replay would refuse such a record
    (the engine checks the same), so it is corruption even though its checksum passed.
    """

    def key_bad(kb: bytes) -> bool:
        return not 0 < len(kb) <= key_size

    t = type(op)
    if t is Put or t is Cas:
        if key_bad(op.key) or len(op.value) > value_size:
            return "a key or value length is out of range"
    elif t is Delete or t is Incr:
        if key_bad(op.key):
            return "a key length is out of range"
    elif t is Batch:
        for b in op.ops:
            if key_bad(b.key) or (type(b) is BatchPut and len(b.value) > value_size):
                return "a key or value length in a batch is out of range"
    elif t is Expire or t is Evict:
        if any(key_bad(kb) for kb in op.keys):
            return "a key length is out of range"
    return None


def batch_from_lists(ops: list) -> list:
    """A batch's ops given in the wire form (lists, as tests and tools hold them) as
    typed ops; raises ``msgspec.ValidationError`` for one that is not a put or delete."""
    return msgspec.convert(ops, list[Union[BatchPut, BatchDelete]])
