"""llama.cpp's own tools, used for GGUF export: its HF → GGUF converter and (when installed) its quantizer.

The converter is llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion/`` package and the
``gguf-py`` it was released with, taken from the llama-cpp-python source distribution at a pinned
version — the same llama.cpp source that ``pip install llama-cpp-python==LLAMA_CPP_PYTHON`` builds the
runtime from, so the metadata it writes (architecture, pre-tokenizer, special tokens) is what that
runtime reads. It knows every architecture llama.cpp runs and computes the pre-tokenizer from the
tokenizer itself. It runs in its own process with its own ``gguf-py`` on the path, so it never
clashes with the ``gguf`` package that transformers uses in ours.

Where the converter comes from, first match wins:
1. ``$TUNESMITH_LLAMA_CPP``: a llama.cpp checkout of your own (a folder with ``convert_hf_to_gguf.py``);
2. ``$TUNESMITH_HOME/tools/llama.cpp-<version>``, filled once from the package index
   (``pip download``, sha256 checked) or from a source archive you pass (``--source``).

``python -m tunesmith.export.llama_cpp [--source llama_cpp_python-<version>.tar.gz]`` fetches it ahead of time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tunesmith.errors import ConfigError, ModelError
from tunesmith.hashing import content_hash
from tunesmith.packages import pip_download
from tunesmith.paths import tunesmith_home

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SCRIPT = "convert_hf_to_gguf.py"
# what the converter needs of the vendored llama.cpp tree (prefixes inside vendor/llama.cpp/)
MEMBERS = (SCRIPT, "conversion/", "gguf-py/gguf/", "LICENSE")

# weight types llama.cpp's converter writes itself, and those its quantizer makes from an f16 file
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = {"q4_0": 2, "q5_0": 8, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama_ftype values


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in CONVERTER_TYPES and gguf_type not in QUANTIZER_TYPES:
        known = ", ".join((*CONVERTER_TYPES, *QUANTIZER_TYPES))
        raise ConfigError(f"--gguf-type {gguf_type!r} is not one of: {known}")
    return gguf_type


def converter_dir() -> Path:
    """The folder holding ``convert_hf_to_gguf.py``; fetched into the cache the first time."""
    own = os.environ.get("TUNESMITH_LLAMA_CPP")
    if own:
        folder = Path(own).expanduser()
        if not (folder / SCRIPT).is_file():
            raise ConfigError(f"TUNESMITH_LLAMA_CPP={own}: no {SCRIPT} there; point it at a llama.cpp checkout")
        return folder
    folder = cached_converter()
    return folder if (folder / SCRIPT).is_file() else fetch_converter()


def cached_converter() -> Path:
    return tunesmith_home() / "tools" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def fetch_converter(source: Path | None = None, on_step=print) -> Path:
    """Unpack the converter from llama-cpp-python's source archive (downloaded, or ``source``) into the cache."""
    dest = cached_converter()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(source) if source else _download_sdist(Path(tmp), on_step)
        digest = content_hash(archive)
        if digest != SDIST_SHA256:
            raise ModelError(f"{archive}: sha256 {digest} is not the pinned llama-cpp-python {LLAMA_CPP_PYTHON} "
                             f"source ({SDIST_SHA256}); use llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
        on_step(f"unpacking llama.cpp's converter from {archive.name}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=dest.parent))  # beside dest: the rename below stays on one file system
        _extract_converter(archive, staging)
    if dest.exists():
        shutil.rmtree(dest)
    staging.replace(dest)
    return dest


def _download_sdist(tmp: Path, on_step) -> Path:
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
    on_step(f"downloading the {spec} source archive (llama.cpp's converter; nothing is compiled)")
    failed = pip_download(spec, tmp, binary=False)
    found = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise ModelError(
            f"Could not download {spec}: {failed or 'nothing downloaded'}. Check access to the package index, or download "
            f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz elsewhere and run: "
            "python -m tunesmith.export.llama_cpp --source PATH (or set TUNESMITH_LLAMA_CPP to a llama.cpp checkout)"
        )
    return found[0]


def _extract_converter(archive: Path, out: Path) -> None:
    root = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(root)
                   and m.name[len(root):].startswith(MEMBERS)]
        if not any(m.name == root + SCRIPT for m in members):
            raise ModelError(f"{archive}: no {root}{SCRIPT} inside; not a llama-cpp-python source archive")
        for member in members:
            target = out / member.name[len(root):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:
                target.write_bytes(src.read())


def convert(hf_dir: Path, outfile: Path, outtype: str) -> Path:
    """Run llama.cpp's converter on a Hugging Face folder; its error, if any, becomes a ModelError."""
    folder = converter_dir()
    cmd = [sys.executable, str(folder / SCRIPT), str(hf_dir), "--outfile", str(outfile), "--outtype", outtype]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"} | {"PYTHONPATH": str(folder / "gguf-py")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not outfile.is_file():
        raise ModelError(f"llama.cpp's converter could not convert {hf_dir}: {_converter_error(proc.stderr)}")
    return outfile


def _converter_error(stderr: str) -> str:
    """The converter's last meaningful line (its exception), e.g. "Model X is not supported"."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip() and "Writing:" not in ln]
    for line in reversed(lines):
        if line.startswith(("NotImplementedError", "ValueError", "KeyError", "TypeError", "FileNotFoundError",
                            "ERROR:hf-to-gguf")):
            return line
    return lines[-1] if lines else "no output"


def quantize(source: Path, out: Path, gguf_type: str) -> Path:
    """llama.cpp's own quantizer (through llama-cpp-python) from an f16/f32 GGUF to ``gguf_type``."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConfigError(
            f"--gguf-type {gguf_type} uses llama.cpp's quantizer, which comes with llama-cpp-python: "
            f"pip install 'tunesmith[llama-cpp]' (builds llama.cpp, ~5 minutes on 2 cores); "
            f"or use one of: {', '.join(CONVERTER_TYPES)}"
        ) from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZER_TYPES[gguf_type]
    params.nthread = os.cpu_count() or 1
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if code != 0 or not out.is_file():
        raise ModelError(f"llama.cpp's quantizer failed on {source} → {gguf_type} (code {code})")
    return out


def load(path: Path, n_ctx: int = 512):
    """A GGUF loaded by llama.cpp (llama-cpp-python), CPU threads as many as there are cores."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise ConfigError("loading a GGUF with llama.cpp needs llama-cpp-python: pip install 'tunesmith[llama-cpp]'") from exc
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=os.cpu_count() or 1, verbose=False, seed=0)


def greedy(llm, ids: list[int], max_new: int) -> list[int]:
    """llama.cpp's greedy continuation of token ``ids``, ending after an end-of-generation token."""
    import llama_cpp

    vocab = llm._model.vocab
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) >= max_new:
            break
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Fetch llama.cpp's HF → GGUF converter into tunesmith's cache.")
    parser.add_argument("--source", type=Path, help=f"a llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz already downloaded")
    args = parser.parse_args(argv)
    folder = cached_converter()
    if args.source or not (folder / SCRIPT).is_file():
        folder = fetch_converter(args.source)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
