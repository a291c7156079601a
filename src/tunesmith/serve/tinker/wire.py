"""The Tinker SDK's binary messages (protobuf, the SDK's ``tinker_public`` schema of version 0.38.0): a forward or
forward_backward request read, its output and a sample's answer written. The SDK sends forward_backward only in this
form and reads these two answers only in it; everything else on its wire is JSON.

A small codec of the protobuf wire format (varints, length-delimited fields, fixed 64-bit numbers) with the field
numbers of the messages we read and write, so that the server needs neither the SDK nor generated code. A malformed
message is a :class:`WireError` naming the field."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

DTYPES = {1: np.float32, 2: np.int64, 3: np.int32}  # the schema's DType values we read
FLOAT32, INT64, INT32 = 1, 2, 3
STOP, LENGTH = 0, 1  # StopReason


class WireError(ValueError):
    """A protobuf message that cannot be read: what and where."""


# --- reading ---------------------------------------------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("a number runs past the end of the message")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("a number is longer than 10 bytes")


def fields(buf: bytes, where: str) -> dict[int, list]:
    """Field number → its values in order (ints for varints and fixed numbers, bytes for length-delimited ones)."""
    out: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, kind = tag >> 3, tag & 7
        if kind == 0:
            value, pos = _varint(buf, pos)
        elif kind == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif kind == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif kind == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise WireError(f"{where}: field {number} has wire type {kind}, which this schema never uses")
        if pos > len(buf):
            raise WireError(f"{where}: field {number} runs past the end of the message")
        out.setdefault(number, []).append(value)
    return out


def _text(values: list | None) -> str:
    return values[-1].decode("utf-8") if values else ""


def _double(raw: bytes) -> float:
    return struct.unpack("<d", raw)[0]


def _ints(values: list | None) -> list[int]:
    """A repeated int64 field, packed or not."""
    out: list[int] = []
    for v in values or []:
        if isinstance(v, int):
            out.append(v)
            continue
        pos = 0
        while pos < len(v):
            n, pos = _varint(v, pos)
            out.append(n - (1 << 64) if n >= 1 << 63 else n)
    return out


def _map(values: list | None, where: str) -> dict[str, bytes | int]:
    """A map field's entries: key (field 1, a string) → the raw value (field 2)."""
    out = {}
    for entry in values or []:
        f = fields(entry, where)
        out[_text(f.get(1))] = (f.get(2) or [b""])[-1]
    return out


def tensor(raw: bytes, where: str) -> np.ndarray:
    """A ``Tensor`` (dense or sparse CSR) as a numpy array of its shape."""
    f = fields(raw, where)
    dtype = DTYPES.get((f.get(3) or [0])[-1])
    if dtype is None:
        raise WireError(f"{where}: dtype {(f.get(3) or [0])[-1]} is not float32, int64 or int32")
    shape = _ints(f.get(4))
    if 2 in f:  # sparse CSR: the listed cells, every other one 0
        csr = fields(f[2][-1], where)
        values = np.frombuffer((csr.get(1) or [b""])[-1], dtype=dtype)
        crow = np.frombuffer((csr.get(2) or [b""])[-1], dtype=np.int64)
        col = np.frombuffer((csr.get(3) or [b""])[-1], dtype=np.int64)
        if len(shape) != 2 or len(crow) != shape[0] + 1 or len(col) != len(values):
            raise WireError(f"{where}: a sparse tensor's shape, row pointers and columns disagree")
        dense = np.zeros(shape, dtype=dtype)
        for row in range(shape[0]):
            dense[row, col[crow[row]:crow[row + 1]]] = values[crow[row]:crow[row + 1]]
        return dense
    data = np.frombuffer((f.get(1) or [b""])[-1], dtype=dtype)
    if shape and int(np.prod(shape)) != data.size:
        raise WireError(f"{where}: shape {shape} does not hold {data.size} values")
    return data.reshape(shape) if shape else data


@dataclass(frozen=True)
class Span:
    """A run of a datum's positions that a provenance span names: ``length`` tokens of sequence ``sequence_id``'s
    prompt (``sampled`` False) or sampled tokens (True), from ``offset``."""

    sampled: bool
    sequence_id: str
    offset: int
    length: int


@dataclass
class Datum:
    tokens: list[int]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    input_spans: list[Span] | None = None  # provenance of model_input (stable_reinforce)
    target_spans: list[Span] | None = None  # provenance of the loss_fn_inputs' positions


@dataclass
class ForwardBackward:
    model_id: str
    seq_id: int
    loss_fn: str
    config: dict[str, float | str]
    forward_only: bool
    data: list[Datum]


def _text_tokens(chunk: dict[int, list], where: str) -> bytes:
    """A model input chunk's text tokens (its ``encoded_text``, field 1), int32 each, as the wire has them."""
    return (fields(chunk[1][-1], where).get(1) or [b""])[-1]


def _datum(raw: bytes, i: int) -> Datum:
    where = f"data[{i}]"
    f = fields(raw, where)
    tokens: list[int] = []
    for j, chunk_raw in enumerate(f.get(1) or []):
        chunk = fields(chunk_raw, f"{where}.model_input[{j}]")
        if 1 not in chunk:
            kind = "an image" if 2 in chunk else "audio" if 3 in chunk else "an unknown chunk"
            raise WireError(f"{where}.model_input[{j}] is {kind}; this server trains on text (encoded_text) only")
        tokens.extend(np.frombuffer(_text_tokens(chunk, f"{where}.model_input[{j}]"), dtype=np.int32).tolist())
    inputs = {name: tensor(raw_t, f"{where}.loss_fn_inputs[{name!r}]")
              for name, raw_t in _map(f.get(2), where).items()}
    spans = [[_span(r, f"{where}.{name}[{j}]") for j, r in enumerate(f.get(number) or [])]
             for number, name in ((3, "model_input_spans"), (4, "loss_fn_input_spans"))]
    if bool(spans[0]) != bool(spans[1]):
        raise WireError(f"{where}: provenance comes as a pair: send both model_input_spans and loss_fn_input_spans "
                        "or neither")
    return Datum(tokens, inputs, spans[0] or None, spans[1] or None)


def _span(raw: bytes, where: str) -> Span:
    """A ``ProvenanceSpan``: its one arm (1: prompt tokens, 2: sampled tokens) with sequence id, offset, length."""
    f = fields(raw, where)
    if bool(f.get(1)) == bool(f.get(2)):
        raise WireError(f"{where}: a provenance span is either prompt_tokens or sampled_tokens")
    sampled = bool(f.get(2))
    arm = fields((f.get(2) or f.get(1))[-1], where)
    sequence_id = _text(arm.get(1))
    offset, length = (arm.get(2) or [0])[-1], (arm.get(3) or [0])[-1]
    if not sequence_id or offset >= 1 << 31 or length >= 1 << 31:
        raise WireError(f"{where}: a provenance span needs a sequence_id and an offset and length >= 0")
    return Span(sampled, sequence_id, offset, length)


def run_and_seq(body: bytes) -> tuple[str, int | None]:
    """A ``ForwardBackwardRequest``'s ``model_id`` and ``seq_id`` (None when unset), its data left unread: what its
    route needs to log the call for the run's holder."""
    f = fields(body, "ForwardBackwardRequest")
    try:
        model_id = _text(f.get(1))
    except UnicodeDecodeError:
        raise WireError("ForwardBackwardRequest.model_id is not UTF-8 text") from None
    seq = (f.get(2) or [None])[-1]
    if seq is not None and not (isinstance(seq, int) and seq < 2**31):
        raise WireError("ForwardBackwardRequest.seq_id must be a number below 2**31")
    return model_id, seq


def token_count(body: bytes) -> int:
    """The tokens of a ``ForwardBackwardRequest``'s datums (their text chunks, int32 each), the rest left unread."""
    total = 0
    for i, raw in enumerate(fields(body, "ForwardBackwardRequest").get(3) or []):
        for j, chunk_raw in enumerate(fields(raw, f"data[{i}]").get(1) or []):
            chunk = fields(chunk_raw, f"data[{i}].model_input[{j}]")
            if 1 in chunk:
                total += len(_text_tokens(chunk, f"data[{i}].model_input[{j}]")) // 4
    return total


def read_forward_backward(body: bytes) -> ForwardBackward:
    """A ``ForwardBackwardRequest`` (the body of /api/v1/forward and /api/v1/forward_backward)."""
    f = fields(body, "ForwardBackwardRequest")
    config: dict[str, float | str] = {k: _double(v) for k, v in _map(f.get(5), "loss_fn_config").items()}
    for k, v in _map(f.get(7), "loss_fn_config").items():  # v2 (numbers or text) wins where both are sent
        value = fields(v, f"loss_fn_config[{k!r}]")
        config[k] = _text(value[2]) if 2 in value else _double((value.get(1) or [bytes(8)])[-1])
    return ForwardBackward(model_id=_text(f.get(1)), seq_id=(f.get(2) or [0])[-1], loss_fn=_text(f.get(4)),
                           config=config, forward_only=bool((f.get(6) or [0])[-1]),
                           data=[_datum(raw, i) for i, raw in enumerate(f.get(3) or [])])


# --- writing ---------------------------------------------------------------------------------------------------

def _put_varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _num(number: int, n: int) -> bytes:
    return _put_varint(number << 3) + _put_varint(n)


def _bytes(number: int, data: bytes) -> bytes:
    return _put_varint(number << 3 | 2) + _put_varint(len(data)) + data


def _str(number: int, text: str) -> bytes:
    return _bytes(number, text.encode("utf-8"))


def _dbl(number: int, x: float) -> bytes:
    return _put_varint(number << 3 | 1) + struct.pack("<d", x)


def forward_backward_output(per_datum: dict[str, list[np.ndarray]], metrics: dict[str, float]) -> bytes:
    """A ``ForwardBackwardOutput``: one ``ArrayRecord`` holding each output (a float32 array per datum, batched with
    byte offsets) and the metrics."""
    n = len(next(iter(per_datum.values()))) if per_datum else 0
    record = _str(1, "ArrayRecord")
    for name, arrays in per_datum.items():
        data = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
        offsets = np.cumsum([0, *(a.nbytes for a in data)], dtype=np.int64)
        batched = _bytes(1, b"".join(a.tobytes() for a in data)) + _bytes(2, offsets.tobytes()) + _num(3, FLOAT32)
        record += _bytes(2, _str(1, name) + _bytes(2, batched))
    record += _num(3, n)
    out = _str(1, "ArrayRecord") + _bytes(2, record)
    for name, value in metrics.items():
        out += _bytes(3, _str(1, name) + _dbl(2, float(value)))
    return out


def _topk(ids: np.ndarray, logprobs: np.ndarray) -> bytes:
    length, k = ids.shape
    return (_bytes(1, ids.astype(np.int32).tobytes()) + _bytes(2, logprobs.astype(np.float32).tobytes())
            + _num(3, k) + _num(4, length))


@dataclass
class Sequence:
    tokens: list[int]
    logprobs: list[float]
    stopped: bool  # ended on a stop token or string (else: max_tokens)
    topk: tuple[np.ndarray, np.ndarray] | None = None  # (ids, logprobs), each [len(tokens), k]


def sample_response(sequences: list[Sequence], prompt_logprobs: list[float | None] | None = None,
                    topk_prompt: tuple[np.ndarray, np.ndarray] | None = None) -> bytes:
    """A ``SampleResponse``: each sequence's tokens and logprobs; the prompt's logprobs (NaN where none) on request."""
    out = b""
    for seq in sequences:
        body = _num(1, STOP if seq.stopped else LENGTH) + _bytes(2, np.asarray(seq.tokens, np.int32).tobytes())
        body += _bytes(3, np.asarray(seq.logprobs, np.float32).tobytes())
        if seq.topk is not None:
            body += _bytes(4, _topk(*seq.topk))
        out += _bytes(1, body)
    if prompt_logprobs is not None:
        values = np.array([np.nan if x is None else x for x in prompt_logprobs], dtype=np.float32)
        out += _bytes(2, values.tobytes())
    if topk_prompt is not None:
        out += _bytes(3, _topk(*topk_prompt))
    return out
