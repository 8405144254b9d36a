"""A handle's keys and values, checked, encoded and decoded: :class:`RecordCodec`.

Each :class:`shmstore.Store` holds one. It knows the handle's ``value_type`` (its
msgspec encoder and decoders, its schema fingerprint) and nothing of the handle's
mapping or write session: the sizes it checks against are those of the mapping it is
handed (``key_size``, ``value_size``), and :meth:`RecordCodec.check_schema` is told of
each mapping the handle attaches to. Every check runs in the calling process before
anything is sent to the coordinator, and raises the typed errors of ``_errors``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from . import _layout as L
from ._check_args import key_bytes
from ._errors import (
    InvalidKeyError,
    KeyTooLongError,
    SchemaMismatchError,
    ValueEncodingError,
    ValueTooLargeError,
)
from ._lazy import LazyModule

# get_many's vector path (numpy) comes in with the first get_many (see shmstore._lazy).
if TYPE_CHECKING:
    import numpy as np

    from . import _many
    from ._segment import Segment
else:
    np = LazyModule("numpy")
    _many = LazyModule("shmstore._many")

__all__ = ["RecordCodec"]


class RecordCodec:
    """Keys and values of the store ``name``, typed by ``value_type`` (None: any msgpack)."""

    def __init__(self, name: str, value_type: Any) -> None:
        self.name = name
        self.value_type = value_type
        self.schema_fp = L.schema_fingerprint(value_type)
        self.decode = (msgspec.msgpack.Decoder(value_type) if value_type is not None
                       else msgspec.msgpack.Decoder()).decode
        self.decode_list = (msgspec.msgpack.Decoder(list[value_type]) if value_type is not None
                            else msgspec.msgpack.Decoder(list)).decode
        self.encode = msgspec.msgpack.Encoder().encode
        #: whether the attached mapping's schema is ours (set by check_schema)
        self.writable = False

    def check_schema(self, seg: Segment) -> None:
        have = seg.q[L.H_SCHEMA_FP]
        self.writable = have == self.schema_fp
        if self.value_type is not None and have != self.schema_fp:
            raise SchemaMismatchError(
                f"store {self.name!r} holds values of another type than "
                f"{getattr(self.value_type, '__name__', self.value_type)!r} (schema "
                f"fingerprints differ); connect with the value_type it was served with"
            )

    # -- keys ------------------------------------------------------------------------

    def key(self, key: object, seg: Segment) -> bytes:
        if key.__class__ is str:
            try:
                kb = key.encode()  # type: ignore[union-attr]
            except UnicodeEncodeError:  # a lone surrogate: no UTF-8 bytes
                kb = key_bytes(key)  # raises InvalidKeyError
        elif key.__class__ is bytes:
            kb = key  # type: ignore[assignment]
        else:
            kb = key_bytes(key)  # InvalidKeyError: not str or bytes
        if len(kb) > seg.key_size:
            raise KeyTooLongError(
                f"key {key!r:.80} is {len(kb)} bytes; store {self.name!r} has key_size="
                f"{seg.key_size}. Use shorter keys or recreate the store with a larger key_size."
            )
        if not kb:
            raise InvalidKeyError("the empty key is not allowed")
        return kb

    def many_keys(self, keys: list, seg: Segment) -> tuple[list, np.ndarray, np.ndarray | None]:
        """``get_many``'s keys, checked, as the probe takes them: ``(kbs, lens, words)``.

        With ``words`` (many keys, see ``_many.key_words``) ``kbs`` are the keys as
        given, str or bytes: the probe encodes the few it needs. Without, they are bytes.
        """
        ksz = seg.key_size
        try:
            kw = _many.key_words(keys, ksz) if len(keys) >= _many.MIN_KEYS else None
        except UnicodeEncodeError:  # a str key without UTF-8 bytes: key() below says which
            kw = None
        if kw is not None:
            words, lens = kw
            return keys, lens, words
        try:
            kbs = [k.encode() if k.__class__ is str else self.key(k, seg) for k in keys]
        except UnicodeEncodeError:
            kbs = [self.key(k, seg) for k in keys]  # raises InvalidKeyError
        lens = np.fromiter(map(len, kbs), np.int64, len(kbs))
        if len(kbs) and (lens.min() < 1 or lens.max() > ksz):
            self.key(kbs[int(np.flatnonzero((lens < 1) | (lens > ksz))[0])], seg)  # raises
        return kbs, lens, None

    # -- values ----------------------------------------------------------------------

    def value(self, value: object, seg: Segment) -> bytes:
        if not self.writable:
            raise SchemaMismatchError(
                f"store {self.name!r} is typed; connect with its value_type to write to it"
            )
        try:
            vb = self.encode(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueEncodingError(f"cannot encode a {type(value).__name__} as msgpack: {e}") from e
        except RecursionError:  # nested too deep, or holds itself
            raise ValueEncodingError(
                f"cannot encode a {type(value).__name__} as msgpack: it is nested too deep "
                f"or contains itself; store a flatter value"
            ) from None
        if self.value_type is not None:
            try:
                self.decode(vb)
            except msgspec.ValidationError as e:
                raise ValueEncodingError(
                    f"value does not match value_type {getattr(self.value_type, '__name__', self.value_type)}: {e}"
                ) from e
        if len(vb) > seg.value_size:
            raise ValueTooLargeError(
                f"value encodes to {len(vb)} bytes; store {self.name!r} has value_size="
                f"{seg.value_size}. Store less per key or recreate the store with a larger value_size."
            )
        return vb

    def check_counter(self, seg: Segment) -> None:
        """``incr`` may write here: the schema is ours and ``value_type`` takes integers."""
        if not self.writable:
            self.value(0, seg)  # raises the schema error
        if self.value_type is not None:
            try:
                msgspec.convert(0, self.value_type)
            except msgspec.ValidationError:
                raise ValueEncodingError(
                    f"incr stores integers, which value_type {self.value_type!r} does not accept"
                ) from None

    def decode_probed(self, n: int, fast: np.ndarray, blob: bytes, found: dict, default: Any) -> list:
        """The values of a ``_probe_many`` that found them, in key order (``default``
        for the rest): ``fast`` indexes the values encoded in ``blob``, ``found`` maps
        an index to one encoded value."""
        if len(fast) == n:  # all found by numpy, in key order
            return self.decode_list(blob)
        out = [default] * n
        if len(fast):
            for i, v in zip(fast.tolist(), self.decode_list(blob)):
                out[i] = v
        for i, raw in found.items():
            out[i] = self.decode(raw)
        return out

    def decode_values(self, raw: list, default: Any) -> list:
        """Encoded values (None: missing, ``default``) decoded in one call."""
        out = [default] * len(raw)
        present = [i for i, v in enumerate(raw) if v is not None]
        if present:
            decoded = self.decode_list(_many.array_header(len(present)) + b"".join(raw[i] for i in present))
            for i, v in zip(present, decoded):
                out[i] = v
        return out
