"""Generation tasks, registered by name. Each turns inputs into flat item records plus rejected entries
with reasons.

Adding a task is one function here decorated with :func:`register` (saying what it reads and, in a
``tunesmith run``, how its items become training material), its config model in ``config/synth.py``
(a field of ``SynthSection`` and a name in ``SynthSection.task``) and its prompt in ``prompts/``.

A task builds its chat requests, sends them through ``ctx.ask`` (cached, retried, parsed into
a pydantic schema) or ``ctx.complete`` (free text), and keeps only what passes its checks;
everything it drops is returned with the reason and the raw reply.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tunesmith.clients.calls import CallFailure, ChatRequest
from tunesmith.config import SynthSection
from tunesmith.errors import ConfigError, DataError
from tunesmith.records import Record
from tunesmith.synth import augment
from tunesmith.synth.gates import copy_problem, question_problem, text_problem
from tunesmith.synth.inputs import SeedInputs, read_input_chunks, read_input_records, read_input_seeds
from tunesmith.synth.structured import Parsed
from tunesmith.synth.text import is_refusal, normalize


@dataclass
class TaskOutput:
    items: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def reject(self, source: str, reason: str, raw=None, **extra) -> None:
        self.rejected.append({"source": source, "reason": reason, "raw": raw, **extra})


@dataclass
class SynthContext:
    cfg: SynthSection
    ask: Callable[..., list[Parsed]]  # ask(requests, schema, max_items=None)
    complete: Callable[[Sequence[ChatRequest]], list]
    say: Callable[[str], None] = print

    template: str | None = None  # the task's prompt template, for the "copied from the prompt" gate

    def problem(self, text: str, min_chars: int | None = None) -> str | None:
        """The quality gates with this task's language and limits (see synth.gates)."""
        c = self.cfg
        return text_problem(text, c.language, c.min_chars if min_chars is None else min_chars, c.script_share,
                            self.template)


@dataclass(frozen=True)
class SynthTask:
    """One synth task: what it reads, how it runs, and in a run how its items become training material."""

    name: str
    run: Callable[[SynthContext, Any], TaskOutput]  # (context, inputs) → kept items and set-aside replies
    read: Callable  # (synth section, say) → (inputs, inputs set aside): see tunesmith.synth.inputs
    to_training: Callable  # (augment.SynthBatch) → augment.Augmented: new train examples or DPO pairs
    on_train_split: Callable | None  # (synth section, arm, records file) → the section reading the train split


_REGISTRY: dict[str, SynthTask] = {}


def register(name: str, *, read: Callable = read_input_records, to_training: Callable = augment.as_examples,
             on_train_split: Callable | None = None):
    """Function decorator: make ``fn(ctx, inputs)`` the synth task ``name``. ``read`` gives its inputs
    (records by default); ``to_training`` turns its items into training material in a run (examples
    through the data section's field names by default); ``on_train_split``, when given, lets a run's
    synth section without an input read the arm's train split instead."""
    def add(fn: Callable[[SynthContext, Any], TaskOutput]):
        if name in _REGISTRY:
            raise ValueError(f"synth task '{name}' is registered twice")
        _REGISTRY[name] = SynthTask(name, fn, read, to_training, on_train_split)
        return fn

    return add


def synth_task(name: str) -> SynthTask:
    if name not in _REGISTRY:
        raise ConfigError(f"synth.task: unknown task '{name}'; known: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered synth task names."""
    return sorted(_REGISTRY)


def reads_train_split() -> list[str]:
    """The tasks that can read a run's train split when the synth section names no input."""
    return [n for n in names() if _REGISTRY[n].on_train_split is not None]


def load_prompt(name: str, language: str, override: Path | None = None) -> string.Template:
    """A task's prompt template: the recipe's file if given, else the packaged one for the language."""
    if override is not None:
        if not Path(override).is_file():
            raise DataError(f"synth.prompt_file not found: {override}")
        return string.Template(Path(override).read_text(encoding="utf-8"))
    text = resources.files("tunesmith.synth").joinpath("prompts", f"{name}.{language}.txt").read_text(encoding="utf-8")
    return string.Template(text)


def request(ctx: SynthContext, prompt: str, seed_offset: int = 0, **overrides) -> ChatRequest:
    s = ctx.cfg.sampling
    params = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "seed": s.seed + seed_offset}
    return ChatRequest.chat([{"role": "user", "content": prompt}], **(params | overrides))


def _field(rec: Record, name: str) -> str:
    value = rec.data.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{rec.source}: field '{name}' is missing or empty")
    return value.strip() if isinstance(value, str) else str(value)


# --- paraphrase ----------------------------------------------------------------------------------


class Paraphrases(BaseModel):
    paraphrases: list[str] = Field(min_length=1)


@register("paraphrase", to_training=augment.as_paraphrases, on_train_split=augment.paraphrase_train_split)
def paraphrase(ctx: SynthContext, records: list[Record]) -> TaskOutput:
    """N rewordings per question with the answer kept; near-duplicates of the original or of each other dropped."""
    t = ctx.cfg.paraphrase
    template = load_prompt("paraphrase", ctx.cfg.language, ctx.cfg.prompt_file)
    ctx.template = template.template
    questions = [_field(r, t.question_field) for r in records]
    parsed = ctx.ask([request(ctx, template.substitute(n=t.n, question=q)) for q in questions], Paraphrases, t.n)
    out = TaskOutput()
    for rec, question, p in zip(records, questions, parsed, strict=True):
        if p.value is None:
            out.reject(rec.source, f"no usable reply after {p.attempts} attempt(s): {p.error}", p.raw)
            continue
        kept: list[str] = []
        for k, cand in enumerate(p.value.paraphrases):
            cand = cand.strip()
            problem = ctx.problem(cand) or copy_problem(cand, question, kept, t.dedup_threshold)
            if problem:
                out.reject(rec.source, f"paraphrase {problem}", cand, original=question)
                continue
            kept.append(cand)
            out.items.append({
                "question": cand, "answer": _field(rec, t.answer_field), "original_question": question,
                "context": rec.data.get("context"), "source": rec.source, "variant": k + 1,
            })
    return out


# --- QA from documents --------------------------------------------------------------------------


class QAPair(BaseModel):
    question: str = Field(min_length=3)
    answer: str = Field(min_length=1)


class QAPairs(BaseModel):
    pairs: list[QAPair] = Field(min_length=1)


@register("qa_from_documents", read=read_input_chunks)
def qa_from_documents(ctx: SynthContext, chunks: list[Record]) -> TaskOutput:
    """Question/answer pairs grounded in each chunk; an answer that is not a span of its chunk is dropped."""
    t = ctx.cfg.qa_from_documents
    if t.method == "cloze":
        parsed = _cloze_replies(ctx, chunks)
    else:
        template = load_prompt("qa_from_documents", ctx.cfg.language, ctx.cfg.prompt_file)
        ctx.template = template.template
        reqs = [request(ctx, template.substitute(n=t.pairs_per_chunk, chunk=c.data["text"])) for c in chunks]
        parsed = ctx.ask(reqs, QAPairs, t.pairs_per_chunk)
    out = TaskOutput()
    for chunk, p in zip(chunks, parsed, strict=True):
        if p.value is None:
            reason = p.error if t.method == "cloze" else f"no usable reply after {p.attempts} attempt(s): {p.error}"
            out.reject(chunk.source, reason, p.raw)
            continue
        text = chunk.data["text"]
        for pair in p.value.pairs:
            problem = ctx.problem(pair.question, max(ctx.cfg.min_chars, 8)) or ctx.problem(pair.answer, 1)
            if problem:
                out.reject(chunk.source, f"question or answer {problem}", pair.model_dump())
                continue
            if problem := question_problem(pair.question, ctx.cfg.language):
                out.reject(chunk.source, f"question {problem}", pair.model_dump())
                continue
            grounded = normalize(pair.answer) in normalize(text)
            if t.require_span and not grounded:
                out.reject(chunk.source, "answer is not a span of its chunk", pair.model_dump())
                continue
            out.items.append({
                "question": pair.question.strip(), "answer": pair.answer.strip(), "context": text,
                "source_file": chunk.data.get("source_file"), "page": chunk.data.get("page"),
                "chunk_id": chunk.source, "grounded": grounded,
            })
    return out


def _cloze_replies(ctx: SynthContext, chunks: list[Record]) -> list[Parsed]:
    """Fill-in-the-blank pairs per chunk (synth.cloze), shaped like parsed model replies so that the same
    gates and grounding check apply; a chunk with no usable sentence is set aside with that reason."""
    from tunesmith.synth.cloze import cloze_pairs

    seen: set[str] = set()
    out = []
    for c in chunks:
        pairs = cloze_pairs(c.data["text"], ctx.cfg.qa_from_documents.pairs_per_chunk, ctx.cfg.language,
                            ctx.cfg.sampling.seed, seen)
        if pairs:
            out.append(Parsed(QAPairs(pairs=[QAPair(**p) for p in pairs]), "", None, 1))
        else:
            out.append(Parsed(None, "", "no new sentence to blank out in the chunk (cloze)", 0))
    return out


# --- questions from seed words, answered from retrieved context ----------------------------------


class Questions(BaseModel):
    questions: list[str] = Field(min_length=1)


@register("seed_questions", read=read_input_seeds)
def seed_questions(ctx: SynthContext, inputs: SeedInputs) -> TaskOutput:
    """Questions about each seed word; with passages, each answered from the ones retrieved for it."""
    seeds, passages, retriever = inputs.seeds, inputs.passages, inputs.retriever
    t = ctx.cfg.seed_questions
    template = load_prompt("seed_questions", ctx.cfg.language, ctx.cfg.prompt_file)
    ctx.template = template.template
    parsed = ctx.ask(
        [request(ctx, template.substitute(n=t.questions_per_seed, seed=s, domain=t.domain)) for s in seeds], Questions,
        t.questions_per_seed,
    )
    out = TaskOutput()
    pending: list[dict] = []
    for seed, p in zip(seeds, parsed, strict=True):
        if p.value is None:
            out.reject(f"seed:{seed}", f"no usable reply after {p.attempts} attempt(s): {p.error}", p.raw)
            continue
        seen: list[str] = []
        for q in (q.strip() for q in p.value.questions):
            problem = ctx.problem(q, max(ctx.cfg.min_chars, 8)) or question_problem(q, ctx.cfg.language)
            if problem or any(normalize(q) == normalize(s) for s in seen):
                out.reject(f"seed:{seed}", f"question {problem or 'repeated'}", q)
                continue
            seen.append(q)
            pending.append({"seed": seed, "question": q})
    if retriever is not None and pending:
        hits = retriever.search([p["question"] for p in pending], t.top_k)
        for item, found in zip(pending, hits, strict=True):
            item["contexts"] = [passages[i] for i, _ in found]
            item["context_scores"] = [round(s, 4) for _, s in found]
            item["retriever"] = retriever.name
    if t.answer and pending and retriever is not None:
        answer_t = load_prompt("answer_from_context", ctx.cfg.language)
        reqs = [request(ctx, answer_t.substitute(context="\n\n".join(i["contexts"]), question=i["question"]),
                        temperature=0.0) for i in pending]
        for item, reply in zip(pending, ctx.complete(reqs), strict=True):
            if isinstance(reply, CallFailure):
                out.reject(f"seed:{item['seed']}", "no answer: " + reply.message, item)
                continue
            problem = ctx.problem(reply.text)
            if problem:
                out.reject(f"seed:{item['seed']}", f"answer {problem}", reply.text, question=item["question"])
                continue
            item["answer"] = reply.text.strip()
            out.items.append(item)
    else:
        out.items.extend(pending)
    return out


# --- Evol-Instruct ------------------------------------------------------------------------------

OPERATIONS = {
    "deepen": "ask about the same topic in more depth and breadth.",
    "broaden": "write a brand-new prompt in the same domain but on a rarer topic, of similar length and difficulty.",
    "reasoning": "rewrite it so that answering explicitly needs several steps of reasoning.",
    "complicate": "add one more concrete constraint or requirement to it.",
}
OPERATIONS_KO = {
    "deepen": "같은 주제를 더 깊고 넓게 묻도록 하세요.",
    "broaden": "같은 분야에서 더 드문 주제로, 길이와 난이도가 비슷한 완전히 새로운 지시문을 쓰세요.",
    "reasoning": "답하려면 여러 단계의 추론이 분명히 필요하도록 바꾸세요.",
    "complicate": "구체적인 제약이나 요구 사항을 하나 더 추가하세요.",
}


class Evolved(BaseModel):
    prompt: str


def evolution_problem(original: str, new: str, op: str, min_chars: int) -> str | None:
    """Why an evolution failed (unchanged, copied prompt, refusal, too short), or None if it is kept."""
    if normalize(new) == normalize(original):
        return "unchanged"
    low = new.casefold()
    if "given prompt" in low or "rewritten prompt" in low or "주어진 지시문" in new:
        return "copied the rewriting instructions"
    if is_refusal(new):
        return "refusal"
    if len(new) < min_chars or (op != "broaden" and len(new) < 0.5 * len(original)):
        return "too short"
    if op != "broaden" and len(new_words(new, original)) < 2:
        return "adds nothing new"  # e.g. the parent cut short with a stray token: 'the given stereotype*M'
    return None


def new_words(text: str, original: str) -> set[str]:
    """Words of two or more characters in ``text`` that ``original`` does not have (case-folded)."""
    def words(t: str) -> set[str]:
        return {w for w in re.findall(r"\w+", t.casefold()) if len(w) > 1}

    return words(text) - words(original)


@register("evol_instruct")
def evol_instruct(ctx: SynthContext, records: list[Record]) -> TaskOutput:
    t = ctx.cfg.evol_instruct
    template = load_prompt("evol_instruct", ctx.cfg.language, ctx.cfg.prompt_file)
    ctx.template = template.template
    ops = OPERATIONS_KO if ctx.cfg.language == "ko" else OPERATIONS
    rng = random.Random(ctx.cfg.sampling.seed)
    out = TaskOutput()
    current = [(r.source, _field(r, t.instruction_field)) for r in records]
    for depth in range(1, t.depth + 1):
        chosen = [rng.choice(t.operations) for _ in current]
        reqs = [request(ctx, template.substitute(operation=ops[op], instruction=text), seed_offset=depth)
                for (_, text), op in zip(current, chosen, strict=True)]
        survivors = []
        for (source, original), op, p in zip(current, chosen, ctx.ask(reqs, Evolved), strict=True):
            if p.value is None:
                out.reject(source, f"no usable reply after {p.attempts} attempt(s): {p.error}", p.raw, depth=depth)
                continue
            new = p.value.prompt.strip()
            problem = ctx.problem(new) or evolution_problem(original, new, op, t.min_chars)
            if problem:
                out.reject(source, f"failed evolution ({problem})", new, depth=depth, operation=op)
                continue
            out.items.append({"instruction": new, "parent": original, "operation": op, "depth": depth, "source": source})
            survivors.append((source, new))
        current = survivors
    return out


# --- preference pairs ---------------------------------------------------------------------------


@register("preference_pairs", to_training=augment.as_dpo_pairs,
          on_train_split=augment.preference_pairs_train_split)
def preference_pairs(ctx: SynthContext, records: list[Record]) -> TaskOutput:
    """chosen = the reference answer; rejected = a model sample or a distractor; equal pairs dropped."""
    t = ctx.cfg.preference_pairs
    out = TaskOutput()
    prompts = [_field(r, t.prompt_field) for r in records]
    chosen = [_field(r, t.chosen_field) for r in records]
    if t.rejected_from == "model":
        replies = ctx.complete([request(ctx, p) for p in prompts])
        rejected = [None if isinstance(r, CallFailure) else r.text.strip() for r in replies]
    else:
        rng = random.Random(ctx.cfg.sampling.seed)
        rejected = [_distractor(r, t.distractor_field, c, rng) for r, c in zip(records, chosen, strict=True)]
    for rec, prompt, good, bad in zip(records, prompts, chosen, rejected, strict=True):
        if not bad:
            out.reject(rec.source, "no rejected answer (call failed, empty sample or no distractor)")
        elif t.rejected_from == "model" and ctx.problem(bad, 1):
            out.reject(rec.source, f"rejected answer {ctx.problem(bad, 1)}", bad, prompt=prompt)
        elif t.drop_equal and normalize(bad) == normalize(good):
            out.reject(rec.source, "rejected equals chosen after normalisation", bad)
        else:
            out.items.append({"prompt": prompt, "chosen": good, "rejected": bad, "rejected_from": t.rejected_from,
                              "source": rec.source})
    return out


def _distractor(rec: Record, name: str, chosen: str, rng: random.Random) -> str | None:
    value = rec.data.get(name)
    options = value if isinstance(value, list) else [value] if value else []
    options = [str(o).strip() for o in options if str(o).strip() and normalize(str(o)) != normalize(chosen)]
    return rng.choice(options) if options else None
