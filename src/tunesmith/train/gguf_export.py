"""Export a trained run as one GGUF file (llama.cpp, Ollama) and an Ollama ``Modelfile`` beside it.

Written with the ``gguf`` package's writer (the one llama.cpp's converter uses), so nothing is
compiled. The file carries the weights (f16, or q8_0 for 2-D weights), the byte-level BPE
tokenizer (tokens, types, merges), the special token ids, the chat template and the end-of-turn
token. Llama's q/k projections are permuted into llama.cpp's rotary layout, as its converter does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.errors import ConfigError, ModelError

GGUF_TYPES = ("f16", "q8_0")
SUPPORTED_ARCHITECTURES = ("llama",)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type!r} is not one of: {', '.join(GGUF_TYPES)}")
    return gguf_type


def export_gguf(run_dir: Path, out: Path, gguf_type: str = "f16") -> Path:
    """Merge the run, write ``out/model-<type>.gguf`` and ``out/Modelfile``; returns the GGUF path."""
    from tunesmith.train.export import load_run_recipe, merged_model, stop_token_ids

    check_gguf_type(gguf_type)
    recipe = load_run_recipe(run_dir)
    model, tokenizer = merged_model(run_dir)
    check_architecture(model.config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model-{gguf_type}.gguf"
    stops = stop_token_ids(tokenizer)
    write_gguf(path, model, tokenizer, gguf_type, stops, name=recipe.name)
    system = recipe.data.system_prompt if recipe.data else None
    (out / "Modelfile").write_text(modelfile(path.name, tokenizer, stops, system), encoding="utf-8")
    return path


def check_architecture(config) -> None:
    """Only what the writer maps tensor by tensor: plain Llama (SmolLM2 is one)."""
    arch = config.model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"GGUF export does not support architecture {arch!r} ({', '.join(config.architectures or [])}); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Use --merged and llama.cpp's converter instead."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export does not support llama with rope_type {rope['rope_type']!r} yet")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ModelError(f"GGUF export does not support llama with {flag}=true yet")


def write_gguf(path: Path, model, tokenizer, gguf_type: str, stops: list[int], *, name: str) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    add_tokenizer(writer, tokenizer, cfg.vocab_size, stops)
    for gguf_name, array in llama_tensors(model):
        add_tensor(writer, gguf_name, array, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_tensors(model):
    """``(gguf name, float32 array)`` for every weight; q/k rows permuted for llama.cpp's rope."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}")
        array = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = permute_rope(array, cfg.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = permute_rope(array, cfg.num_key_value_heads)
        yield gguf_name, array


def permute_rope(weights, n_head: int):
    """HF's rotate-half layout → llama.cpp's interleaved pairs (the inverse of transformers' loader)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def add_tensor(writer, name: str, array, gguf_type: str) -> None:
    """1-D tensors (norms) stay f32; 2-D ones are f16, or q8_0 when the row splits into 32-blocks."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if array.ndim == 1:
        writer.add_tensor(name, array.astype(np.float32))
    elif gguf_type == "q8_0" and array.shape[-1] % 32 == 0:
        writer.add_tensor(name, quants.quantize(array, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, array.astype(np.float16))


def add_tokenizer(writer, tokenizer, vocab_size: int, stops: list[int]) -> None:
    """Byte-level BPE as llama.cpp's ``gpt2`` model: tokens, types, merges, special ids, template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or not is_byte_level(spec.get("pre_tokenizer")):
        raise ModelError(
            f"GGUF export supports byte-level BPE tokenizers only; this one is {spec['model']['type']} "
            f"with pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')!r}"
        )
    if len(tokenizer) > vocab_size:
        raise ModelError(f"tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        tokens.append(token)
        types.append(TOKEN_NORMAL if index not in added else TOKEN_CONTROL if added[index]["special"] else TOKEN_USER_DEFINED)
    for index in range(len(tokenizer), vocab_size):  # embeddings rows with no token (padded vocab)
        tokens.append(f"[PAD{index}]")
        types.append(TOKEN_UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_eos_token_id(stops[0])
    writer.add_eot_token_id(stops[-1])  # the token that closes an assistant turn
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def is_byte_level(pre: dict | None) -> bool:
    """Plain GPT-2 byte-level splitting (what llama.cpp calls pre-tokenizer ``gpt2``)."""
    return bool(pre) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")


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
