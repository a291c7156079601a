"""GGUF exports checked in llama.cpp: size, load time and greedy agreement with transformers, per architecture and type.

    python scripts/gguf_agreement.py [--run runs/NAME] [--types f16 q8_0 q4_k_m] [--prompts 20] [--out DIR]

Rows: the embedded SmolLM2-135M-Instruct (a run's merged fine-tune with ``--run``, else the base model) and
tiny random Qwen2 and Gemma-2 models (tests/gguf_models.py). For each GGUF type: file size, llama.cpp load
time, prompts that llama.cpp tokenizes to transformers' ids, and greedy answers identical to the merged
Hugging Face model's (same prompt ids given to both). Needs llama-cpp-python (``make test-export`` installs it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import gguf_models  # noqa: E402


def hf_greedy(model, ids: list[int], max_new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


def prompts(tok, n: int) -> list[str]:
    chats = [[{"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": m}]
             for m in gguf_models.messages(n)]
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]


def measure(name: str, hf_dir: Path, tok, gguf_type: str, texts: list[str], max_new: int, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from tunesmith.export.gguf import to_gguf
    from tunesmith.export.llama_cpp import greedy, load

    start = time.perf_counter()
    path = to_gguf(hf_dir, out / f"{name}-{gguf_type}.gguf", gguf_type)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    llm = load(path)
    load_s = time.perf_counter() - start
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    same_ids = same = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        same_ids += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        same += hf_greedy(hf, ids, max_new) == greedy(llm, ids, max_new)
    return {"model": name, "type": gguf_type, "bytes": path.stat().st_size, "export_s": export_s, "load_s": load_s,
            "ids": same_ids, "same": same, "n": len(texts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder whose fine-tune is exported (default: the base model)")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from tunesmith.models.registry import cached_path

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.run:
            from tunesmith.export.merged import export_merged

            smol = export_merged(args.run, out / "merged")
        else:
            smol = cached_path(gguf_models.SMOL)
        models = [("smollm2-135m" + ("-" + args.run.name if args.run else ""), smol, "llama")]
        models += [(f"tiny-{arch}", gguf_models.build(arch, out / arch), arch) for arch in ("qwen2", "gemma2")]
        print("| model | type | size | export | llama.cpp load | prompt ids as transformers | greedy answers identical |")
        print("|---|---|---|---|---|---|---|")
        for name, folder, arch in models:
            tok = gguf_models.hf_tokenizer(folder, arch)
            texts = prompts(tok, args.prompts)
            for gguf_type in args.types:
                r = measure(name, folder, tok, gguf_type, texts, args.max_new, out)
                print(f"| {r['model']} | {r['type']} | {r['bytes'] / 1e6:,.1f} MB | {r['export_s']:.1f} s | {r['load_s']:.2f} s "
                      f"| {r['ids']}/{r['n']} | {r['same']}/{r['n']} |", flush=True)


if __name__ == "__main__":
    main()
