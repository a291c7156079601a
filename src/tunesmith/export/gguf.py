"""Export a trained run as one GGUF file (llama.cpp, Ollama) and an Ollama ``Modelfile`` beside it.

The run is merged into a plain Hugging Face folder (``export/merged.py``), then llama.cpp's own
converter turns that folder into GGUF (``export/llama_cpp.py``): every architecture llama.cpp runs,
with the pre-tokenizer, special tokens and chat template computed as llama.cpp computes them.
f32, f16, bf16 and q8_0 come from the converter; q4_0, q5_0, q4_k_m, q5_k_m and q6_k from llama.cpp's
quantizer (llama-cpp-python) applied to the f16 file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tunesmith.export.llama_cpp import CONVERTER_TYPES, check_gguf_type, convert, quantize

__all__ = ["check_gguf_type", "export_gguf", "modelfile", "to_gguf"]


def export_gguf(run_dir: Path, out: Path, gguf_type: str = "f16") -> Path:
    """Merge the run, write ``out/model-<type>.gguf`` and ``out/Modelfile``; returns the GGUF path."""
    from transformers import AutoTokenizer

    from tunesmith.export.merged import export_merged, export_name, stop_token_ids

    check_gguf_type(gguf_type)
    name, system = export_name(run_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        merged = export_merged(run_dir, Path(tmp) / name)  # the converter reads a plain HF folder
        tokenizer = AutoTokenizer.from_pretrained(merged)
        path = to_gguf(merged, out / f"model-{gguf_type}.gguf", gguf_type)
    (out / "Modelfile").write_text(modelfile(path.name, tokenizer, stop_token_ids(tokenizer), system), encoding="utf-8")
    return path


def to_gguf(hf_dir: Path, path: Path, gguf_type: str) -> Path:
    """A Hugging Face folder as one GGUF of ``gguf_type``: converted directly, or converted to f16 and quantized."""
    check_gguf_type(gguf_type)
    if gguf_type in CONVERTER_TYPES:
        return convert(hf_dir, path, gguf_type)
    f16 = path.with_name(path.stem + ".f16-tmp.gguf")
    try:
        convert(hf_dir, f16, "f16")
        return quantize(f16, path, gguf_type)
    finally:
        f16.unlink(missing_ok=True)


def modelfile(gguf_name: str, tokenizer, stops: list[int], system: str | None) -> str:
    """An Ollama Modelfile: the GGUF, a ChatML TEMPLATE when the model speaks ChatML, stop tokens."""
    lines = [f"FROM ./{gguf_name}", ""]
    if "<|im_start|>" in (tokenizer.chat_template or ""):
        lines += [
            'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
            "{{ .Content }}<|im_end|>",
            "{{ end }}<|im_start|>assistant",
            '"""',
            "",
        ]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(stops)):
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"
