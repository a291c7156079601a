"""What a synth task reads from ``synth.input``: records, document chunks, or seed words with passages to
retrieve from. Each reader takes the synth section and a ``say`` callback and returns the task's inputs
(at most ``synth.limit`` of them) and the inputs it set aside, each ``{"source", "reason", "raw"}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config import SynthSection
from tunesmith.errors import DataError
from tunesmith.records import Record

Say = Callable[[str], None]


def read_input_records(cfg: SynthSection, say: Say) -> tuple[list[Record], list[dict]]:
    """Records (JSONL/CSV/JSON) of ``synth.input``; unreadable lines are set aside."""
    from tunesmith.data.read.readers import read_records

    records, bad = read_records(cfg.input, limit=cfg.limit, on_error="skip")
    return records, [{"source": r.source, "reason": r.reason, "raw": r.record} for r in bad]


def read_input_chunks(cfg: SynthSection, say: Say) -> tuple[list[Record], list[dict]]:
    """Token chunks of the documents (PDF/TXT/Markdown) of ``synth.input``; files without text are set aside,
    and none with text at all is an error that names each file's reason."""
    chunks, bad = read_document_chunks(cfg)
    for r in bad:
        say(f"[yellow]skipped {r.source}:[/] {r.reason}")
    if not chunks:
        listed = "; ".join(f"{r.source} ({r.reason})" for r in bad) or "no files"
        raise DataError(f"{cfg.input}: no document text to generate from: {listed}")
    return chunks[: cfg.limit], [{"source": r.source, "reason": r.reason, "raw": None} for r in bad]


@dataclass
class SeedInputs:
    """Seed words, and the passages (with their retriever) the questions are answered from, if any."""

    seeds: list[str]
    passages: list[str]
    retriever: object | None  # tunesmith.synth.retrieval's retriever over ``passages``


def read_input_seeds(cfg: SynthSection, say: Say) -> tuple[SeedInputs, list[dict]]:
    """The seed-word file of ``synth.input`` and the ``seed_questions.contexts`` passages, if given."""
    seeds = read_seed_words(cfg.input)[: cfg.limit]
    sq = cfg.seed_questions
    passages = read_passages(sq.contexts, sq.context_field, tokenizer_name(cfg)) if sq.contexts else []
    retriever = None
    if passages:
        from tunesmith.synth.retrieval import make_retriever

        retriever = make_retriever(sq.retriever, passages, say, cfg.language)
    return SeedInputs(seeds, passages, retriever), []


def read_seed_words(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"Seed-word file not found: {path}")
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise DataError(f"{path}: no seed words (one per line; lines starting with # are comments)")
    return words


def read_passages(path: Path, field: str, tokenizer: str) -> list[str]:
    """Retrieval passages: token chunks of documents (PDF/TXT/Markdown), or records' ``field``."""
    from tunesmith.data.read.readers import read_records
    from tunesmith.data.read.sources import DOC_SUFFIXES, read_documents

    if path.is_dir() or path.suffix.lower() in DOC_SUFFIXES:
        from tunesmith.config import DocumentsSection
        from tunesmith.models.loading import load_tokenizer

        records, _ = read_documents(path, DocumentsSection(), load_tokenizer(tokenizer), on_error="skip")
        passages = [r.data["text"] for r in records]
    else:
        passages = [str(r.data.get(field, "")).strip() for r in read_records(path)[0]]
    passages = [p for p in passages if p]
    if not passages:
        raise DataError(f"{path}: no passages to retrieve from")
    return passages


def tokenizer_name(cfg: SynthSection) -> str:
    """Chunk with the generating model's tokenizer when it is local, else the embedded one."""
    return cfg.provider.model if cfg.provider.kind == "local" else "smollm2-135m-instruct"


def read_document_chunks(cfg: SynthSection) -> tuple[list[Record], list]:
    from tunesmith.config import DocumentsSection
    from tunesmith.data.read.sources import read_documents
    from tunesmith.models.loading import load_tokenizer

    t = cfg.qa_from_documents
    docs = DocumentsSection(glob=t.glob, chunk_tokens=t.chunk_tokens, overlap_tokens=t.overlap_tokens)
    return read_documents(cfg.input, docs, load_tokenizer(tokenizer_name(cfg)), on_error="skip")
