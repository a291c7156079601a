"""Where the local engine's curated rows go: set-aside rows to ``rejected.jsonl``, kept examples to
``examples.jsonl`` with their training lines and split hashes in work files, and the split files cut from them at the
end (:class:`LocalOutput`); the line formats are shared with the Ray engine's workers (:func:`example_lines`,
:func:`reject_lines`), and :class:`SpooledSplits` reads a split back without holding it."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from tunesmith.data.steps.split import SPLITS, SplitKeys, content_hash, content_key
from tunesmith.records import Example, Rejected


class Codes:
    """A value per position stored as a small integer code (labels, groups: few distinct values)."""

    def __init__(self):
        from array import array

        self.of: dict = {}
        self.values: list = []
        self.codes = array("i")

    def extend(self, values) -> None:
        for v in values:
            code = self.of.get(v)
            if code is None:
                code = self.of[v] = len(self.values)
                self.values.append(v)
            self.codes.append(code)

    def array(self, lo: int, hi: int) -> np.ndarray:
        return np.frombuffer(self.codes, dtype=np.int32)[lo:hi].astype(np.int64)


def example_lines(examples: list[Example], cfg, seed: int) -> tuple[list[bytes], list[bytes], np.ndarray]:
    """Each example's line in ``examples.jsonl``, its training line (``{"id", "messages"}``) and its split hash
    (of its content with the seed): what every engine writes for it, made once."""
    from tunesmith.data.formats.messages import chat_messages

    spool, train, hashes = [], [], np.empty(len(examples), dtype=np.uint64)
    for k, e in enumerate(examples):
        content = content_key(e.inputs, e.target)
        hashes[k] = content_hash(content, seed)
        spool.append(f"[{_dumps(e.id)}, {content[1:-1]}, {_dumps(e.meta)}]\n".encode("utf-8", "surrogatepass"))
        messages = chat_messages(e, cfg) + [{"role": "assistant", "content": e.target}]
        train.append((_dumps({"id": e.id, "messages": messages}) + "\n").encode("utf-8", "surrogatepass"))
    return spool, train, hashes


_dumps = json.JSONEncoder(ensure_ascii=False, default=str).encode  # json.dumps(..., ensure_ascii=False, default=str)


def reject_lines(rejected: list[Rejected]) -> str:
    """``rejected.jsonl`` lines: each ``Rejected.to_json()``, its fields taken as they are (no deep copy)."""
    names = [f.name for f in fields(Rejected)]
    return "".join(_dumps({n: getattr(r, n) for n in names}) + "\n" for r in rejected)


def rejects_from(path: str) -> bytes:
    """The start of every ``rejected.jsonl`` line (as :func:`reject_lines` writes it) of a row read from ``path``."""
    return ('{"source": ' + _dumps(f"{path}:")[:-1]).encode("utf-8", "surrogatepass")


class LocalOutput:
    """Where the local engine's curated rows go as they come: set-aside rows to ``rejected.jsonl``, kept examples
    to ``examples.jsonl`` with their training lines and split hashes (8 bytes) to work files, and small label and
    group codes in memory; :meth:`split` cuts the split files from them at the end."""

    def __init__(self, data_dir: Path, work: Path, cfg, seed: int, split_cfg):
        self.data_dir, self.cfg, self.seed = data_dir, cfg, seed
        self.examples = open(data_dir / "examples.jsonl", "wb")  # noqa: SIM115 - closed by close()
        self.train_lines = open(work / "messages.jsonl", "wb+")  # noqa: SIM115
        self.rejected = open(data_dir / "rejected.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.hashes = open(work / "hashes.bin", "wb+")  # noqa: SIM115 - 8 bytes an example, read at the split
        self.n = 0
        self.labels = Codes() if split_cfg.stratify or split_cfg.stratify_field else None
        self.groups = Codes() if split_cfg.group_field else None
        from tunesmith.data.steps.split import example_keys

        self.keys = example_keys(split_cfg)

    def write(self, examples: list[Example], rejected: list[Rejected]) -> None:
        self.rejected.write(reject_lines(rejected))
        spool, train, hashes = example_lines(examples, self.cfg, self.seed)
        self.examples.write(b"".join(spool))
        self.train_lines.write(b"".join(train))
        self.hashes.write(hashes.tobytes())
        self.n += len(hashes)
        if self.labels is not None:
            self.labels.extend(self.keys.label(e) for e in examples)
        if self.groups is not None:
            self.groups.extend(self.keys.group(e) for e in examples)

    def __len__(self) -> int:
        return self.n

    def split_keys(self, part: range) -> SplitKeys:
        lo, hi = part.start, part.stop
        labels = (self.labels.array(lo, hi), self.labels.values) if self.labels else (None, None)
        groups = (self.groups.array(lo, hi), self.groups.values) if self.groups else (None, None)
        self.hashes.flush()
        hashes = np.fromfile(self.hashes.name, dtype=np.uint64, count=hi - lo, offset=8 * lo)
        return SplitKeys(hashes, *labels, *groups, where=lambda i: self._source(lo + i))

    def _source(self, i: int) -> str:
        self.examples.flush()
        with open(self.data_dir / "examples.jsonl", "rb") as fh:
            for k, line in enumerate(fh):
                if k == i:
                    return json.loads(line)[3].get("source", i)
        return str(i)

    def split(self, parts: dict[str, range], assign) -> tuple[SpooledSplits, dict]:
        """Split codes from ``assign(parts, split_keys)``, written beside ``examples.jsonl``; the split files cut
        from the training lines in read order."""
        codes, notes = assign(parts, self.split_keys)
        self.examples.flush()
        self.train_lines.flush()
        self.train_lines.seek(0)
        splits = write_splits(codes, iter(self.train_lines), self.data_dir)
        return splits, notes

    def close(self) -> None:
        for fh in (self.examples, self.train_lines, self.rejected, self.hashes):
            fh.close()


def write_splits(codes: np.ndarray, lines, data_dir: Path) -> SpooledSplits:
    """``examples.split`` (one code a byte) and train/val/test.jsonl from the examples' training lines in order."""
    (data_dir / "examples.split").write_bytes(codes.astype(np.uint8).tobytes())
    files = [open(data_dir / f"{name}.jsonl", "wb") for name in SPLITS[:3]]  # noqa: SIM115
    try:
        for code, line in zip(codes.astype(np.uint8).tobytes(), lines, strict=True):
            if code < 3:
                files[code].write(line)
    finally:
        for fh in files:
            fh.close()
    counts = np.bincount(codes, minlength=len(SPLITS)).tolist()
    return SpooledSplits(data_dir / "examples.jsonl", dict(zip(SPLITS, counts, strict=True)))


def _example(line: bytes) -> Example:
    ex_id, inputs, target, meta = json.loads(line)
    return Example(ex_id, inputs, target, meta)


@dataclass
class SpooledSplits(Mapping):
    """train/val/test/unused of the examples in ``examples.jsonl``, by the one-byte codes of ``examples.split``
    beside it: a split's ``Example`` list is read from the files the first time it is asked for, so the data
    stage itself never holds the examples."""

    path: Path
    counts: dict[str, int]
    _lists: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> list[Example]:
        if name not in self.counts:
            raise KeyError(name)
        if name not in self._lists:
            self._lists[name] = list(self.iter(name))
        return self._lists[name]

    def __iter__(self):
        return iter(self.counts)

    def __len__(self) -> int:
        return len(self.counts)

    def count(self, name: str) -> int:
        return self.counts[name]

    def iter(self, name: str) -> Iterator[Example]:
        """The split's examples in read order, one read at a time."""
        want = SPLITS.index(name)
        with open(self.path, "rb") as fh, open(self.path.with_suffix(".split"), "rb") as codes:
            for line in fh:
                if codes.read(1)[0] == want:
                    yield _example(line)

    def __getstate__(self):  # the cache pickles the counts, never the loaded lists
        return {"path": self.path, "counts": self.counts}

    def __setstate__(self, state):
        self.__init__(**state)

    def moved(self, path: Path) -> SpooledSplits:
        return SpooledSplits(path, self.counts)
