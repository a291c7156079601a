"""Where records come from: files (``readers.py``), hub datasets, documents; plus derived fields.

``read_source`` reads a source whole (the data stage streams files through ``batches.py`` and hands only hub
datasets and documents to it). Documents are cut into token chunks that overlap; every chunk keeps its source
file and page.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

from tunesmith.config import DataSection, DocumentsSection, HubSource
from tunesmith.data.read.readers import _hf_disk, collect, detect_format, read_records
from tunesmith.errors import DataError
from tunesmith.records import Record, Rejected

DOC_SUFFIXES = {".pdf", ".txt", ".md", ".markdown"}


def read_source(cfg: DataSection, tokenizer: Callable | None = None) -> tuple[list[Record], list[Rejected]]:
    """Read ``data.path`` / ``data.hub`` and add ``data.derive`` fields. ``tokenizer()`` loads one lazily."""
    fmt = cfg.format
    if fmt == "hf_hub" and cfg.hub is None:
        raise DataError("data.format hf_hub needs data.hub: {name: ..., split: ...}")
    if cfg.hub is not None and (cfg.path is None or fmt == "hf_hub"):
        records, rejected = collect(read_hub(cfg.hub), cfg.on_error, cfg.limit)
    elif fmt == "documents" or (fmt == "auto" and _looks_like_documents(Path(cfg.path))):
        if tokenizer is None:
            raise DataError("documents need a tokenizer to be chunked by tokens")
        records, rejected = read_documents(Path(cfg.path), cfg.documents, tokenizer(), cfg.on_error)
        records = records[: cfg.limit] if cfg.limit else records
    elif detect_format(Path(cfg.path), fmt) == "hf_disk":
        split = cfg.hub.split if cfg.hub else "train"
        records, rejected = collect(_hf_disk(Path(cfg.path), split), cfg.on_error, cfg.limit)
    else:
        records, rejected = read_records(cfg.path, fmt, cfg.on_error, cfg.limit)
    if cfg.derive:
        derive_fields(records, cfg.derive)
    return records, rejected


def _looks_like_documents(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() in DOC_SUFFIXES
    if path.is_dir() and not any(
        (path / n).exists() for n in ("dataset_info.json", "dataset_dict.json", "state.json")
    ):
        return any(p.suffix.lower() in DOC_SUFFIXES for p in path.rglob("*"))
    return False


def read_hub(hub: HubSource):
    """Rows of a hub dataset via ``datasets.load_dataset``; offline or unknown names give a DataError."""
    import datasets

    label = (
        f"hub dataset '{hub.name}'"
        + (f" (config '{hub.config}')" if hub.config else "")
        + f", split '{hub.split}'"
    )
    try:
        ds = datasets.load_dataset(hub.name, hub.config, split=hub.split, revision=hub.revision)
    except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load {label}: {first}. If this machine is offline, save the dataset elsewhere with "
            "Dataset.save_to_disk(FOLDER), copy the folder here and set data.path: FOLDER (format hf_disk)."
        ) from None
    for i, row in enumerate(ds):
        yield Record(dict(row), f"{hub.name}[{hub.split}]:row {i + 1}")


# --- documents -------------------------------------------------------------------------------


def read_documents(path: Path, cfg: DocumentsSection, tokenizer, on_error: str = "fail"):
    """Chunk every PDF/TXT/Markdown file under ``path``; returns ``(records, rejected)``."""
    if not path.exists():
        raise DataError(f"Document path not found: {path}")
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.glob(cfg.glob) if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    )
    if not files:
        raise DataError(f"{path}: no .pdf, .txt or .md files match '{cfg.glob}'")
    records: list[Record] = []
    rejected: list[Rejected] = []
    for file in files:
        pages = _pdf_pages(file) if file.suffix.lower() == ".pdf" else [(None, _text_file(file))]
        if not any(text.strip() for _, text in pages):
            what = (
                f"no extractable text on any of its {len(pages)} page(s) (a scan? run OCR first)"
                if file.suffix.lower() == ".pdf"
                else "the file is empty"
            )
            if on_error == "fail":
                raise DataError(f"{file}: {what}. Remove it, or set data.on_error: skip to set it aside.")
            rejected.append(Rejected(str(file), "read", what))
            continue
        for page, text in pages:
            for k, chunk in enumerate(chunk_by_tokens(text, tokenizer, cfg.chunk_tokens, cfg.overlap_tokens)):
                where = f"{file}" + (f":page {page}" if page else "") + f":chunk {k + 1}"
                records.append(
                    Record({"text": chunk, "source_file": str(file), "page": page, "chunk": k + 1}, where)
                )
    return records, rejected


def _text_file(file: Path) -> str:
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{file}:{line}: bytes that are not UTF-8 at offset {exc.start}; re-save as UTF-8"
        ) from None


def _pdf_pages(file: Path) -> list[tuple[int, str]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(file))
        return [(i + 1, page.extract_text() or "") for i, page in enumerate(reader.pages)]
    except (PdfReadError, ValueError, OSError) as exc:
        raise DataError(f"{file}: not a readable PDF ({exc})") from None


def chunk_by_tokens(text: str, tokenizer, size: int, overlap: int) -> list[str]:
    """Windows of ``size`` tokens advancing by ``size - overlap``, cut from the original text by offsets."""
    text = text.strip()
    if not text:
        return []
    from tunesmith.data.tokens import token_offsets

    offsets = token_offsets([text], tokenizer)[0]
    if len(offsets) <= size:
        return [text]
    chunks, step = [], size - overlap
    for start in range(0, len(offsets), step):
        window = offsets[start : start + size]
        chunks.append(text[window[0][0] : window[-1][1]].strip())
        if start + size >= len(offsets):
            break
    return [c for c in chunks if c]


# --- derived fields ------------------------------------------------------------------------------


def derive_fields(records: list[Record], derive: dict[str, str | list[str]], check: bool = True) -> None:
    """Add fields in place: a template over other fields, or a list of fields joined by newlines. A field the
    template names that no record has fails (``check``; the data stage checks once over the whole stream)."""
    if check:
        check_derive(set().union(*(r.data for r in records)) if records else set(), derive)
    for name, spec in derive.items():
        template = derive_template(spec)
        needed = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        for rec in records:
            values = {f: "" if rec.data.get(f) is None else rec.data[f] for f in needed}
            try:
                rec.data[name] = template.format(**values).strip()
            except (ValueError, TypeError, IndexError, KeyError) as exc:
                shown = {f: values[f] for f in needed}
                raise DataError(
                    f"{rec.source}: data.derive.{name}: the template {template!r} does not fit the values {shown} "
                    f"({exc}); a format like {{x:.0f}} needs a number, not text"
                ) from None


def derive_template(spec: str | list[str]) -> str:
    return spec if isinstance(spec, str) else "\n".join("{" + f + "}" for f in spec)


def check_derive(seen: set[str], derive: dict[str, str | list[str]]) -> None:
    """A field a derived field's template names that no record has (``seen``: every record's fields) is a recipe
    mistake: fail with the fields present."""
    if not seen:
        return
    for name, spec in derive.items():
        needed = [f for _, f, _, _ in string.Formatter().parse(derive_template(spec)) if f]
        missing = [f for f in needed if f not in seen]
        if missing:
            raise DataError(f"data.derive.{name}: no record has the field(s) {missing}; fields present: {sorted(seen)}")
        seen = seen | {name}  # a later template may use it
