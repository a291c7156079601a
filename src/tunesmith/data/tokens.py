"""Token counts and cuts for the data stage (``token_length``, the profile): the tokenizer's plain Rust backend,
and for byte-level BPE tokenizers (GPT-2's pre-tokenizer, no normalizer: SmolLM2's) counts summed over pre-tokens.

A byte-level BPE tokenizer splits a text into pre-tokens (words with their leading space, runs of digits or of
punctuation, runs of whitespace) and encodes each alone, so a text's count is the sum of its pre-tokens' counts.
``PieceCounts`` finds the pre-tokens with GPT-2's pattern and encodes each distinct one once: on listings or
reviews, whose words repeat, a tenth of the work of encoding every text, with the same counts. The pattern runs
on a stand-in of the text in which every non-ASCII character is replaced by an ASCII one of its class (letter,
number, whitespace, other), each class asked once of the tokenizer's own pre-tokenizer, so that the pieces are
the tokenizer's whatever the script; a text holding a special token's text is encoded whole.
"""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import numpy as np

_PIECES = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""", re.ASCII)
_OTHER_SPACE = re.compile(r"[^\S ]")  # whitespace other than the space
_CLASSES = ("a", "0", "!", "\t")  # letter, number, other, whitespace (the space itself is ASCII)
_MAX_PIECES = 1_000_000  # distinct pre-tokens remembered (about 100 MB); the cache starts over beyond


_AS_IS = {"TokenizersBackend", "PreTrainedTokenizerFast"}  # transformers classes that use tokenizer.json as it is


def data_tokenizer(name: str):
    """The tokenizer the data stage counts and cuts with: the model folder's ``tokenizer.json`` as a plain Rust
    tokenizer where transformers would use that file as it is (a generic tokenizer class, every added token of
    the config in the file), which spares the data stage importing torch and transformers (about 300 MB);
    else transformers' tokenizer."""
    from tunesmith.models.names import resolve

    try:
        folder = Path(resolve(name))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        file = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        config = file = None
    if config is not None and _as_is(config, file):
        from tokenizers import Tokenizer

        plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
        plain.no_padding()
        plain.no_truncation()
        return plain
    from tunesmith.models.loading import load_tokenizer

    return load_tokenizer(name)


def _as_is(config: dict, file: dict) -> bool:
    added = {t["content"] for t in file.get("added_tokens") or []}
    wanted = {t.get("content") for t in (config.get("added_tokens_decoder") or {}).values()}
    return config.get("tokenizer_class") in _AS_IS and wanted <= added


def plain_backend(tokenizer):
    """The Rust ``tokenizers.Tokenizer`` behind a fast HF tokenizer (None for slow tokenizers), without the
    padding and truncation some tokenizer.json files switch on (all-MiniLM-L6-v2's pads and cuts every text
    to 128 tokens: every count would read 128 and a cut would land in the padding)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):  # already the plain backend (as the Ray engine ships it)
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (backend.padding is None and backend.truncation is None):
        return backend
    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


_COUNTERS: dict[int, tuple[object, object]] = {}  # id(tokenizer) -> (tokenizer, its PieceCounts or None)


def token_counts(texts: list[str], tokenizer, batch: int = 4096) -> np.ndarray:
    """Tokens per text (no special tokens): by pre-token for byte-level BPE tokenizers, else in batches on the
    Rust tokenizer without computing offsets."""
    if id(tokenizer) not in _COUNTERS:
        _COUNTERS[id(tokenizer)] = (tokenizer, PieceCounts.of(plain_backend(tokenizer)))
    counter = _COUNTERS[id(tokenizer)][1]
    if counter is not None:
        return counter(texts)
    return encoded_counts(texts, tokenizer, batch)


def encoded_counts(texts: list[str], tokenizer, batch: int = 4096) -> np.ndarray:
    """Tokens per text, every text encoded."""
    backend = plain_backend(tokenizer)
    out = np.empty(len(texts), dtype=np.int64)
    for lo in range(0, len(texts), batch):
        chunk = texts[lo : lo + batch]
        if backend is not None:
            out[lo : lo + len(chunk)] = [len(e.ids) for e in backend.encode_batch_fast(chunk, add_special_tokens=False)]
        else:
            out[lo : lo + len(chunk)] = [len(ids) for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]]
    return out


def token_offsets(texts: list[str], tokenizer) -> list[list[tuple[int, int]]]:
    """Character offsets of each text's tokens (used only for the texts that get truncated)."""
    backend = plain_backend(tokenizer)
    if backend is not None:
        return [e.offsets for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


class PieceCounts:
    """Token counts of a byte-level BPE tokenizer summed over pre-tokens, each distinct pre-token encoded once."""

    def __init__(self, backend, specials: list[str]):
        self.backend, self.counts, self.spaced = backend, {}, {}  # span -> tokens; word -> tokens of " " + word
        self.special = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.stand_in: dict[int, str | None] = {}  # non-ASCII character -> its class's ASCII stand-in (None: none)

    @classmethod
    def of(cls, backend) -> PieceCounts | None:
        """For a tokenizer whose counts add up over GPT-2 pre-tokens (else None: every text is encoded)."""
        if backend is None:
            return None
        conf = json.loads(backend.to_str())
        pre, model = conf.get("pre_tokenizer") or {}, conf.get("model") or {}
        if (conf.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout")
                or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True)):
            return None
        return cls(backend, [t["content"] for t in conf.get("added_tokens") or []])

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.full(len(texts), -1, dtype=np.int64)
        whole, spaced = self.counts.__getitem__, self.spaced.__getitem__
        unseen: list[tuple[int, list[str], bool]] = []
        for k, text in enumerate(texts):
            if self.special is not None and self.special.search(text):
                continue
            if "   " not in text and not text.endswith("  ") and not _OTHER_SPACE.search(text):
                # words between single (or double) spaces: each space begins a pre-token
                words = text.split(" ")
                try:
                    out[k] = whole(words[0]) + sum(map(spaced, islice(words, 1, None)))
                except KeyError:
                    unseen.append((k, words, True))
                continue
            ps = self._pieces(text)
            if ps is None:
                continue
            try:
                out[k] = sum(map(whole, ps))
            except KeyError:  # a pre-token not met before: encoded below, with the others of the batch
                unseen.append((k, ps, False))
        if unseen:
            self._learn(unseen)
            for k, parts, words in unseen:
                out[k] = (self.counts[parts[0]] + sum(self.spaced[w] for w in parts[1:]) if words
                          else sum(map(self.counts.__getitem__, parts)))
        rest = np.flatnonzero(out < 0)
        if len(rest):
            out[rest] = encoded_counts([texts[k] for k in rest.tolist()], self.backend)
        return out

    def _learn(self, unseen: list[tuple[int, list[str], bool]]) -> None:
        """Encode the spans of the unseen texts not met before (all of them when the caches start over): a text's
        pre-tokens, or the first word of a text of words and each other word with its space."""
        def needed(every: bool) -> tuple[set, set]:
            alone = {p for _, ps, words in unseen for p in (ps[:1] if words else ps) if every or p not in self.counts}
            after = {w for _, ws, words in unseen if words for w in ws[1:] if every or w not in self.spaced}
            return alone, after

        alone, after = needed(False)
        if len(self.counts) + len(self.spaced) + len(alone) + len(after) > _MAX_PIECES:
            self.counts.clear()
            self.spaced.clear()
            alone, after = needed(True)
        for cache, keys, prefix in ((self.counts, list(alone), ""), (self.spaced, list(after), " ")):
            for lo in range(0, len(keys), 4096):
                chunk = keys[lo : lo + 4096]
                encoded = self.backend.encode_batch_fast([prefix + k for k in chunk], add_special_tokens=False)
                cache.update(zip(chunk, (len(e.ids) for e in encoded), strict=True))

    def _pieces(self, text: str) -> list[str] | None:
        """The text's pre-tokens, or None when it must be encoded whole (a special token's text in it, or a
        character the pre-tokenizer does not class as one of the four)."""
        if self.special is not None and self.special.search(text):
            return None
        if text.isascii():
            return _PIECES.findall(text)
        stand_in = text.translate(self.stand_in)
        if not stand_in.isascii():
            for ch in {c for c in stand_in if not c.isascii()}:
                self.stand_in[ord(ch)] = self._class_of(ch)
            stand_in = text.translate(self.stand_in)
        if len(stand_in) != len(text):  # a character of no class (dropped by its stand-in)
            return None
        out, at = [], 0
        for piece in _PIECES.findall(stand_in):
            out.append(text[at : at + len(piece)])
            at += len(piece)
        return out

    def _class_of(self, ch: str) -> str | None:
        """The ASCII character of ``ch``'s class: the one class whose character forms a single pre-token with it
        on either side (None for a character of no such class: its texts are encoded whole)."""
        split = self.backend.pre_tokenizer.pre_tokenize_str
        fits = [c for c in _CLASSES if len(split(c + ch)) == 1 and len(split(ch + c)) == 1]
        return fits[0] if len(fits) == 1 else None
