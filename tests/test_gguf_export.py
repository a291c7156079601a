"""GGUF export through llama.cpp's own converter, checked with llama.cpp itself.

Checks without llama.cpp's runtime (``make test-heavy``, tests/heavy.py): every exported file carries the
tokenizer metadata llama.cpp needs (pre-tokenizer, special tokens, chat template, end of turn) for three
architectures, plus the Modelfile and bad input. Runtime checks (``make test-export``, which builds llama-cpp-python): llama.cpp
loads each file, tokenizes the prompts as transformers does, and answers greedily like the merged
Hugging Face model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tunesmith.models import registry

from . import gguf_models
from .conftest import banking_rows
from .test_train_export import LABELS, _train

needs_smol = pytest.mark.skipif(not registry.is_cached(gguf_models.SMOL),
                                reason=f"{gguf_models.SMOL} not cached; run `tunesmith models pull {gguf_models.SMOL}`")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP,
                                     reason="llama-cpp-python is not installed; `make test-export` builds it and runs these")


def _prompts(tok, n=20, system="Classify."):
    """Chat prompts over ``n`` BANKING77 messages not used for training, as text."""
    seen = banking_rows(LABELS, 14)
    rows = [r for r in banking_rows(LABELS, 14 + n) if r not in seen][:n]
    for row in rows:
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": row["text"]}]
        yield tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def _hf_greedy(model, ids: list[int], max_new=24) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


def _meta(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module", autouse=True)
def llama_cpp_converter():
    """The converter resolved once from the real cache, kept when a test points TUNESMITH_HOME elsewhere."""
    from tunesmith.export.llama_cpp import converter_dir

    patch = pytest.MonkeyPatch()
    patch.setenv("TUNESMITH_LLAMA_CPP", str(converter_dir()))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def smol_tiny(tmp_path_factory) -> Path:
    if not registry.is_cached(gguf_models.SMOL):
        pytest.skip(f"{gguf_models.SMOL} not cached; run `tunesmith models pull {gguf_models.SMOL}`")
    return gguf_models.build("llama", tmp_path_factory.mktemp("smol-tiny"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smol_tiny):
    """A LoRA run (merged at export) and a full fine-tune of a tiny Llama with SmolLM2's tokenizer, each
    exported as a merged folder and as f16 and q8_0 GGUFs: ``{run: {"run", "merged", "f16", "q8_0"}}``."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import tunesmith.cli as cli_mod

    def cli(args):
        buf = io.StringIO()
        with redirect_stdout(buf), redirect_stderr(buf):
            return cli_mod.main(args), buf.getvalue()

    tmp = tmp_path_factory.mktemp("gguf")
    # llama.cpp's answer tests need models that learned the labels; without llama.cpp the tests check files,
    # metadata and round trips, which hold for any weights: two steps each then (about a minute less)
    lora_steps, full_steps = (12, 30) if HAS_LLAMA_CPP else (2, 2)
    runs = {"lora": _train(cli, tmp, smol_tiny, "lora", max_steps=lora_steps, learning_rate=1e-2),
            "full": _train(cli, tmp, smol_tiny, "full", adapter="full", max_steps=full_steps, learning_rate=3e-3)}
    outs = {}
    for name, run in runs.items():
        outs[name] = {"run": run, "merged": tmp / name / "merged"}
        code, out = cli(["export", str(run), "--merged", str(tmp / name / "merged")])
        assert code == 0, out
        for kind in ("f16", "q8_0"):
            code, out = cli(["export", str(run), "--gguf", str(tmp / name / kind), "--gguf-type", kind])
            assert code == 0, out
            outs[name][kind] = tmp / name / kind / f"model-{kind}.gguf"
    return outs


@pytest.fixture(scope="module")
def other_archs(tmp_path_factory):
    """Tiny random Qwen2 and Gemma-2 folders, each converted to f32 and f16: ``{arch: {"hf", "f32", "f16"}}``."""
    from tunesmith.export.gguf import to_gguf

    tmp = tmp_path_factory.mktemp("archs")
    out = {}
    for arch in ("qwen2", "gemma2"):
        hf = gguf_models.build(arch, tmp / arch)
        out[arch] = {"hf": hf} | {kind: to_gguf(hf, tmp / f"{arch}-{kind}.gguf", kind) for kind in ("f32", "f16")}
    return out


# ---- fast checks: what the file says ---------------------------------------------------------------------

@needs_smol
def test_gguf_tokenizer_metadata_is_llama_cpps_for_the_smollm2_tokenizer(exported):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported["lora"]["merged"])
    for kind, file_type in (("f16", 1), ("q8_0", 7)):
        meta = _meta(exported["lora"][kind])
        assert meta["general.architecture"] == "llama" and meta["general.file_type"] == file_type
        assert meta["tokenizer.ggml.model"] == "gpt2"
        assert meta["tokenizer.ggml.pre"] == "smollm"  # what llama.cpp's runtime needs; our old writer said 'gpt2'
        assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
        assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
        assert meta["tokenizer.ggml.add_bos_token"] is False
        assert meta["tokenizer.chat_template"] == tok.chat_template
        assert meta["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(len(tok))))


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_gguf_of_other_architectures_names_them_and_carries_their_tokenizer(other_archs, arch):
    paths = other_archs[arch]
    tok = gguf_models.hf_tokenizer(paths["hf"], arch)
    end = gguf_models.END_OF_TURN[arch]
    for kind, file_type in (("f32", 0), ("f16", 1)):
        meta = _meta(paths[kind])
        assert meta["general.architecture"] == arch and meta["general.file_type"] == file_type
        assert meta["tokenizer.ggml.model"] == "llama"  # SentencePiece
        tokens = meta["tokenizer.ggml.tokens"]
        assert end in tokens and tokens.index(end) == tok.convert_tokens_to_ids(end)
        assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids(end)  # the model's EOS: end of turn
        assert meta["tokenizer.chat_template"] == tok.chat_template
    assert paths["f16"].stat().st_size < paths["f32"].stat().st_size
    if arch == "gemma2":
        meta = _meta(paths["f16"])
        assert meta["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)
        assert meta["gemma2.attention.sliding_window"] == 64


@needs_smol
def test_gguf_f16_weights_round_trip_through_transformers(exported):
    """A second reader: transformers un-permutes the converter's q/k layout back to the merged weights."""
    from transformers import AutoModelForCausalLM

    paths = exported["lora"]
    hf = AutoModelForCausalLM.from_pretrained(paths["merged"])
    back = AutoModelForCausalLM.from_pretrained(paths["f16"].parent, gguf_file=paths["f16"].name, dtype=torch.float32)
    got, want = back.state_dict(), hf.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():  # norms kept f32, the rest f16
        assert torch.equal(got[key], value if value.ndim == 1 else value.half().float()), key


@needs_smol
def test_gguf_folder_has_an_ollama_modelfile(exported):
    text = (exported["full"]["q8_0"].parent / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """Classify."""' in text


@needs_smol
def test_gguf_export_bad_input(cli, tmp_path, exported):
    run = exported["lora"]["run"]
    code, out = cli(["export", str(run), "--gguf", str(tmp_path / "g"), "--gguf-type", "q3_k"])
    assert code == 2 and "f16, bf16, q8_0" in out and "q4_k_m" in out, out
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "config.resolved.yaml").write_text((run / "config.resolved.yaml").read_text())
    code, out = cli(["export", str(empty), "--gguf", str(tmp_path / "g")])
    assert code == 3 and "train/adapter" in out and "merged model" in out, out
    code, out = cli(["export", str(run), "--arm", "nope", "--gguf", str(tmp_path / "g")])
    assert code == 3 and "no arm 'nope'" in out, out


def test_gguf_export_names_an_architecture_llama_cpp_does_not_know(tmp_path, other_archs):
    import json
    import shutil

    from tunesmith.errors import ModelError
    from tunesmith.export.gguf import to_gguf

    folder = tmp_path / "odd"
    shutil.copytree(other_archs["qwen2"]["hf"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(ModelError, match="NoSuchModelForCausalLM"):
        to_gguf(folder, tmp_path / "odd.gguf", "f16")


def test_smaller_types_need_llama_cpps_quantizer(tmp_path, other_archs):
    from tunesmith.errors import ConfigError
    from tunesmith.export.gguf import to_gguf

    out = tmp_path / "q4.gguf"
    if importlib.util.find_spec("llama_cpp") is None:
        with pytest.raises(ConfigError, match=r"tunesmith\[llama-cpp\]"):
            to_gguf(other_archs["qwen2"]["hf"], out, "q4_k_m")
    else:
        to_gguf(other_archs["qwen2"]["hf"], out, "q4_k_m")
        assert _meta(out)["general.file_type"] == 15
        assert out.stat().st_size < other_archs["qwen2"]["f16"].stat().st_size
    assert not list(tmp_path.glob("*f16-tmp*"))


# ---- runtime checks: llama.cpp loads the file and answers like transformers ------------------------------

def _agreement(hf, tok, path: Path, prompts: list[str], max_new=24) -> tuple[int, int, list]:
    """``(same prompt ids, same greedy answers, differing pairs)`` of llama.cpp vs transformers."""
    from tunesmith.export.llama_cpp import greedy, load

    llm = load(path)
    same_ids = same_answers = 0
    differ = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        same_ids += llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        a, b = _hf_greedy(hf, ids, max_new), greedy(llm, ids, max_new)
        same_answers += a == b
        if a != b:
            differ.append((tok.decode(a), tok.decode(b)))
    return same_ids, same_answers, differ


@needs_llama_cpp
@needs_smol
@pytest.mark.parametrize("run", ["lora", "full"])
def test_llama_cpp_loads_the_export_and_answers_like_the_merged_model(exported, run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = exported[run]
    tok = AutoTokenizer.from_pretrained(paths["merged"])
    hf = AutoModelForCausalLM.from_pretrained(paths["merged"]).eval()
    prompts = list(_prompts(tok))
    for kind, floor in (("f16", 20), ("q8_0", 18)):
        same_ids, same, differ = _agreement(hf, tok, paths[kind], prompts)
        print(f"{run} {kind}: llama.cpp prompt ids {same_ids}/20, greedy answers {same}/20")
        assert same_ids == 20
        assert same >= floor, differ
    if run == "full":  # the fine-tune answers a label and llama.cpp stops at <|im_end|> on its own
        from tunesmith.export.llama_cpp import greedy, load

        llm = load(paths["f16"])
        answers = [greedy(llm, tok(p, add_special_tokens=False)["input_ids"], 24) for p in prompts]
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        assert all(a[-1] == im_end for a in answers)
        assert {tok.decode(a[:-1]) for a in answers} <= set(LABELS)


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_llama_cpp_answers_like_transformers_for_other_architectures(other_archs, arch):
    from transformers import AutoModelForCausalLM

    paths = other_archs[arch]
    tok = gguf_models.hf_tokenizer(paths["hf"], arch)
    hf = AutoModelForCausalLM.from_pretrained(paths["hf"]).eval()
    prompts = list(_prompts(tok))
    for kind, floor in (("f32", 20), ("f16", 18)):
        same_ids, same, differ = _agreement(hf, tok, paths[kind], prompts, max_new=16)
        print(f"{arch} {kind}: llama.cpp prompt ids {same_ids}/20, greedy answers {same}/20")
        # Gemma-2's converter writes add_space_prefix=false, as its tokenizer; the test's Qwen2 carries a
        # SentencePiece vocabulary (real Qwen ones are BPE) for which llama.cpp adds a leading space, so
        # there only the model is compared, on the same ids
        if arch == "gemma2":
            assert same_ids == 20
        assert same >= floor, differ


@needs_llama_cpp
@needs_smol
def test_llama_cpp_answers_like_the_embedded_model(tmp_path):
    """The real SmolLM2-135M-Instruct: converted, loaded by llama.cpp, greedy answers as in transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.export.gguf import to_gguf

    folder = registry.cached_path(gguf_models.SMOL)
    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    path = to_gguf(folder, tmp_path / "smollm2-f16.gguf", "f16")
    prompts = list(_prompts(tok, 10, system="Answer in a few words."))
    same_ids, same, differ = _agreement(hf, tok, path, prompts, max_new=32)
    print(f"embedded f16: llama.cpp prompt ids {same_ids}/10, greedy answers {same}/10")
    assert same_ids == 10 and same >= 9, differ


@needs_smol
def test_models_add_registers_an_exported_gguf_that_answers_like_it(cli, home, exported):
    """A user's GGUF teacher: `models add` converts it once, records its sha256, and `model.name: NAME`
    resolves to a folder whose greedy answers match the GGUF's."""
    import hashlib
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.names import resolve
    from tunesmith.models.registry import MARKER

    gguf = exported["full"]["f16"]
    code, out = cli(["models", "add", "my-teacher", str(gguf)])
    assert code == 0, out
    folder = Path(resolve("my-teacher"))
    meta = json.loads((folder / MARKER).read_text())
    assert meta["kind"] == "gguf" and meta["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    code, out = cli(["models", "list"])
    assert code == 0 and "my-teacher" in out, out
    code, out = cli(["models", "add", "my-teacher", str(gguf)])  # the name is taken
    assert code != 0 and "already registered" in out, out

    tok = AutoTokenizer.from_pretrained(folder)
    added = AutoModelForCausalLM.from_pretrained(folder).eval()
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    for text in ("my card has not arrived", "pin blocked", "exchange rate"):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        assert _hf_greedy(added, ids, 8) == _hf_greedy(original, ids, 8)


# ---- a Tinker API sampler checkpoint (a bare adapter folder, its output layer adapted) -------------------------

@pytest.fixture(scope="module")
def tinker_export(tmp_path_factory, smol_tiny):
    """A sampler checkpoint saved by the Tinker API's trainer on the tiny tied-embeddings Llama (LoRA on every linear
    layer and on the output layer), exported with ``tunesmith export <folder>`` as a merged folder and an f16 GGUF."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import numpy as np
    from transformers import AutoTokenizer

    import tunesmith.cli as cli_mod
    from tunesmith.serve.tinker.trainer import Trainer
    from tunesmith.serve.tinker.wire import Datum

    tmp = tmp_path_factory.mktemp("tinker-gguf")
    tok = AutoTokenizer.from_pretrained(smol_tiny)
    trainer = Trainer(str(smol_tiny))
    trainer.create("run", rank=8, seed=0)
    data = []
    for row in banking_rows(LABELS, 6):
        prompt = tok(row["text"] + " ->", add_special_tokens=False)["input_ids"]
        answer = tok(" " + row["category"], add_special_tokens=False)["input_ids"]
        ids = prompt + answer
        data.append(Datum(ids[:-1], {"target_tokens": np.array(ids[1:]),
                                     "weights": np.array([0.0] * (len(prompt) - 1) + [1.0] * len(answer))}))
    for _ in range(10 if HAS_LLAMA_CPP else 2):
        trainer.forward_backward("run", data, "cross_entropy", {}, backward=True)
        trainer.optim_step("run", {"learning_rate": 1e-2})
    folder = tmp / "sampler_weights" / "final"
    folder.mkdir(parents=True)
    trainer.save_adapter("run", folder)
    outs = {"adapter": folder, "merged": tmp / "merged", "f16": tmp / "gguf" / "model-f16.gguf"}
    for args in (["--merged", str(outs["merged"])], ["--gguf", str(tmp / "gguf")]):
        buf = io.StringIO()
        with redirect_stdout(buf), redirect_stderr(buf):
            code = cli_mod.main(["export", str(folder), *args])
        assert code == 0, buf.getvalue()
    return outs


@needs_smol
def test_a_tinker_checkpoint_exports_to_gguf_with_its_own_output_layer(tinker_export, smol_tiny):
    """The GGUF carries the merged weights (read back by transformers), the output layer its own tensor (the
    adapter's change) and the input embeddings the base's."""
    from transformers import AutoModelForCausalLM

    path = tinker_export["f16"]
    assert "output.weight" in {t.name for t in __import__("gguf").GGUFReader(str(path)).tensors}
    merged = AutoModelForCausalLM.from_pretrained(tinker_export["merged"], dtype=torch.float32)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smol_tiny, dtype=torch.float32)
    want, got = merged.state_dict(), back.state_dict()
    for key in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(got[key], want[key].half().float()), key
    assert torch.equal(got["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"].half().float())
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


@needs_llama_cpp
@needs_smol
def test_llama_cpp_answers_a_tinker_checkpoint_like_the_merged_model(tinker_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tinker_export["merged"])
    hf = AutoModelForCausalLM.from_pretrained(tinker_export["merged"]).eval()
    same_ids, same, differ = _agreement(hf, tok, tinker_export["f16"], list(_prompts(tok)))
    print(f"tinker checkpoint f16: llama.cpp prompt ids {same_ids}/20, greedy answers {same}/20")
    assert same_ids == 20 and same == 20, differ
