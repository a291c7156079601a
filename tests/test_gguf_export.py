"""GGUF export: the file loads back with transformers (`gguf_file=`), gives the merged model's greedy
answers, stops at the end-of-turn token, and carries an Ollama Modelfile; bad input is named."""

from pathlib import Path

import pytest
import torch

from .conftest import banking_rows
from .test_train_export import LABELS, _train


def _chats(tok, n=20):
    """``n`` held-out BANKING77 messages (not in the training rows) as ChatML prompts."""
    seen = banking_rows(LABELS, 14)
    rows = [r for r in banking_rows(LABELS, 14 + n) if r not in seen][:n]
    for row in rows:
        msgs = [{"role": "system", "content": "Classify."}, {"role": "user", "content": row["text"]}]
        yield tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def _greedy(model, ids, **kw):
    with torch.no_grad():
        return model.generate(**ids, max_new_tokens=24, do_sample=False, **kw)[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """A LoRA run (merged at export) and a full fine-tune, each exported as a merged folder and as
    f16 and q8_0 GGUFs: ``{run: {"run", "merged", "f16", "q8_0"}}``."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    import tunesmith.cli as cli_mod

    def cli(args):
        buf = io.StringIO()
        with redirect_stdout(buf), redirect_stderr(buf):
            return cli_mod.main(args), buf.getvalue()

    tmp = tmp_path_factory.mktemp("gguf")
    runs = {"lora": _train(cli, tmp, tiny_model_dir, "lora", max_steps=12, learning_rate=1e-2),
            "full": _train(cli, tmp, tiny_model_dir, "full", adapter="full", max_steps=40, learning_rate=3e-3)}
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


def _load(path):
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_gguf_f16_of_a_merged_lora_round_trips_weights_tokenizer_and_greedy_answers(exported):
    from transformers import AutoTokenizer

    paths = exported["lora"]
    hf, back = _load(paths["merged"]), _load(paths["f16"])
    got, want = back.state_dict(), hf.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():  # q/k permuted and un-permuted exactly; norms kept f32, the rest f16
        assert torch.equal(got[key], value if value.ndim == 1 else value.half().float()), key

    tok = AutoTokenizer.from_pretrained(paths["merged"])
    gtok = AutoTokenizer.from_pretrained(paths["f16"].parent, gguf_file=paths["f16"].name)
    assert gtok.chat_template == tok.chat_template and gtok.eos_token == "<|im_end|>"
    for ids in _chats(tok):
        text = tok.decode(ids["input_ids"][0])
        assert gtok(text, add_special_tokens=False)["input_ids"] == ids["input_ids"][0].tolist(), text
        a, b = _greedy(hf, ids), _greedy(back, ids)
        assert a == b, (tok.decode(a), tok.decode(b))


def test_gguf_f16_answers_like_the_merged_model_and_stops_at_end_of_turn(exported):
    from transformers import AutoTokenizer

    paths = exported["full"]
    hf, back = _load(paths["merged"]), _load(paths["f16"])
    tok = AutoTokenizer.from_pretrained(paths["merged"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answers = []
    for ids in _chats(tok):
        a, b = _greedy(hf, ids), _greedy(back, ids)  # the GGUF's own eos: no eos_token_id passed
        assert a == b, (tok.decode(a), tok.decode(b))
        assert b[-1] == im_end and len(b) < 24, tok.decode(b)
        answers.append(tok.decode(b[:-1]))
    assert set(answers) <= set(LABELS), answers


@pytest.mark.parametrize("run", ["lora", "full"])
def test_gguf_q8_0_is_smaller_and_mostly_agrees(exported, run):
    from transformers import AutoTokenizer

    paths = exported[run]
    assert paths["q8_0"].stat().st_size < paths["f16"].stat().st_size
    hf, back = _load(paths["merged"]), _load(paths["q8_0"])
    tok = AutoTokenizer.from_pretrained(paths["merged"])
    pairs = [(_greedy(hf, ids), _greedy(back, ids)) for ids in _chats(tok)]
    agree = sum(a == b for a, b in pairs)
    print(f"{run}: q8_0 greedy agreement with the merged model: {agree}/{len(pairs)}")
    assert agree >= 18, [(tok.decode(a), tok.decode(b)) for a, b in pairs if a != b]


def test_gguf_folder_has_an_ollama_modelfile(exported):
    text = (exported["full"]["q8_0"].parent / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'SYSTEM """Classify."""' in text


def test_gguf_export_bad_input(cli, tmp_path, exported):
    run = exported["lora"]["run"]
    code, out = cli(["export", str(run), "--gguf", str(tmp_path / "g"), "--gguf-type", "q4_k"])
    assert code == 2 and "f16, q8_0" in out, out
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "config.resolved.yaml").write_text((run / "config.resolved.yaml").read_text())
    code, out = cli(["export", str(empty), "--gguf", str(tmp_path / "g")])
    assert code == 3 and "train/adapter" in out and "merged model" in out, out
    code, out = cli(["export", str(run), "--arm", "nope", "--gguf", str(tmp_path / "g")])
    assert code == 3 and "no arm 'nope'" in out, out


def test_gguf_export_names_an_unsupported_architecture():
    from transformers import GPT2Config

    from tunesmith.errors import ModelError
    from tunesmith.train.gguf_export import check_architecture

    with pytest.raises(ModelError, match="architecture 'gpt2'"):
        check_architecture(GPT2Config())


def test_models_add_registers_an_exported_gguf_that_answers_like_it(cli, home, exported):
    """A user's GGUF teacher: `models add` converts it once, records its sha256, and `model.name: NAME`
    resolves to a folder whose greedy answers match the GGUF's."""
    import hashlib
    import json

    from transformers import AutoTokenizer

    from tunesmith.models.registry import MARKER, resolve

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
    added, original = _load(folder), _load(gguf)
    for text in ("my card has not arrived", "pin blocked", "exchange rate"):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            a = added.generate(ids, max_new_tokens=8, do_sample=False)
            b = original.generate(ids, max_new_tokens=8, do_sample=False)
        assert a.tolist() == b.tolist()
