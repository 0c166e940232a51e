"""Hypothesis strategies for the wire protocol, derived from each message's FIELDS
(cbor2's habit: strategies in their own module, recursive, with size knobs)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import protocol as M
from protocol import Identity
from protocol._fields import Bool, Bytes, Float, ListOf, Span, Struct, TensorCodec, Text, UInt

IDENTITIES = [Identity.derive(bytes([i]) * 32) for i in range(4)]
MAX_LIST = 3  # keep examples small: the fuzz suite runs in CI


@st.composite
def node_infos(draw):
    ident = draw(st.sampled_from(IDENTITIES))
    addrs = draw(st.lists(st.sampled_from(["127.0.0.1:1", "[::1]:65535", "peer.example:80"]), max_size=3))
    return M.NodeInfo(peer_id=ident.peer_id, public_key=ident.public_key, addrs=tuple(addrs))


@st.composite
def wire_tensors(draw):
    from protocol._tensor import encode_tensor

    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    numel = 1
    for d in shape:
        numel *= d
    values = draw(st.lists(st.floats(-1e4, 1e4, width=32), min_size=numel, max_size=numel))
    dtype = draw(st.sampled_from(["f32", "f16", "bf16", "q8", "nf4"]))
    kwargs = {"blocksize": 64} if dtype in ("q8", "nf4") else {}
    return encode_tensor(torch.tensor(values, dtype=torch.float32).reshape(shape), dtype, **kwargs)


def _text(codec: Text):
    min_size = 1 if codec.nonempty else 0
    return st.text(min_size=min_size, max_size=codec.max // 4).filter(
        lambda s: min_size <= len(s.encode("utf-8", "surrogatepass")) <= codec.max and _utf8(s))


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def for_codec(codec):
    if isinstance(codec, UInt):
        return st.integers(0, codec.max)
    if isinstance(codec, Bytes):
        if codec.size is not None:
            return st.binary(min_size=codec.size, max_size=codec.size)
        return st.binary(max_size=min(codec.max, 64))
    if isinstance(codec, Text):
        return _text(codec)
    if isinstance(codec, Float):
        return st.floats(min_value=codec.min, max_value=1e30, allow_nan=False, allow_infinity=False)
    if isinstance(codec, Bool):
        return st.booleans()
    if isinstance(codec, Span):
        return st.tuples(st.integers(0, codec.max - 1), st.integers(1, codec.max)).filter(lambda s: s[0] < s[1])
    if isinstance(codec, ListOf):
        return st.lists(for_codec(codec.item), max_size=min(codec.max, MAX_LIST)).map(tuple)
    if isinstance(codec, TensorCodec):
        return wire_tensors()
    if isinstance(codec, Struct):
        if codec.cls is M.NodeInfo:
            return node_infos()
        return structures(codec.cls)
    raise TypeError(f"no strategy for {codec!r}")


def _field_strategies(cls):
    return {f.name: (st.none() | for_codec(f.codec)) if f.optional else for_codec(f.codec) for f in cls.FIELDS}


@st.composite
def _model_shaped(draw, cls):
    """A structure whose span must end within num_blocks (ModelDescriptor, Announcement)."""
    fields = {name: draw(strategy) for name, strategy in _field_strategies(cls).items()}
    start, end = fields["span"]
    if fields.get("num_blocks") is not None or cls is M.ModelDescriptor:
        fields["num_blocks"] = draw(st.integers(end, M.MAX_BLOCKS))
    if "hidden_size" in fields and (fields["hidden_size"] is not None or cls is M.ModelDescriptor):
        fields["hidden_size"] = draw(st.integers(1, 1 << 20))
    return cls(**fields)


#: "major.minor" as MODEL_REPORT.versions carries them.
versions = st.builds(lambda a, b: f"{a}.{b}", st.integers(0, 999), st.integers(0, 999))

_SPECIAL = {
    M.ModelDescriptor: lambda: _model_shaped(M.ModelDescriptor),
    M.Announcement: lambda: _model_shaped(M.Announcement),
    M.ModelEntry: lambda: st.builds(M.ModelEntry, model=for_codec(M.ModelEntry.FIELDS[0].codec),
                                    num_blocks=st.integers(1, M.MAX_BLOCKS), hidden_size=st.integers(1, 1 << 20),
                                    source=st.sampled_from(["", "owner/name", "smollm2-135m-instruct"])),
}


def structures(cls):
    if cls in _SPECIAL:
        return _SPECIAL[cls]()
    return st.builds(cls, **_field_strategies(cls))


def message_strategy(cls):
    if cls is M.ModelReport:
        return st.builds(M.ModelReport, versions=st.lists(versions, max_size=MAX_LIST).map(tuple),
                         models=st.lists(structures(M.ModelDescriptor), max_size=MAX_LIST).map(tuple))
    return st.builds(cls, **_field_strategies(cls))


#: Envelope ids (request ids, echoed by responses): 0 is reserved for a connection-level ERROR.
request_ids = st.integers(1, 2**64 - 1)


#: One strategy per message type.
STRATEGIES = {cls: message_strategy(cls) for cls in M.MESSAGE_TYPES.values()}
messages = st.one_of(*STRATEGIES.values())

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.integers(0, 23) | st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)
