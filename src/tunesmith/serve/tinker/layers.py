"""The base's layers as the Tinker trainer reads them: which linear layers a LoRA of given choices adapts and their
widths (a run's size before it is made), where a long pass gives other keys' calls their turn, and whether the output
layer may run apart from the decoder."""

from __future__ import annotations

from tunesmith.serve.tinker.losses import TrainingError


def decoder_layers(model) -> list:
    """The base's decoder layers: its longest module list."""
    import torch

    return max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=[])


def turn_points(model) -> list:
    """Where a long pass gives other calls their turn: each decoder layer's parts holding a fifth of its weights or
    more (attention and MLP), so that a stretch without a turn is about half a layer; a layer without such parts,
    whole."""
    points = []
    for layer in decoder_layers(model):
        weights = sum(p.numel() for p in layer.parameters()) or 1
        parts = [part for part in layer.children() if sum(p.numel() for p in part.parameters()) * 5 >= weights]
        points += parts or [layer]
    return points


def head_apart(model) -> bool:
    """Whether the output layer applied to the decoder's last hidden state gives the model's logits (no scaling or
    capping between them), so that a pass may run it a slice at a time; checked once on a few tokens."""
    import torch

    ids = torch.tensor([[1, 2, 3, 4, 5]], device=model.get_input_embeddings().weight.device)
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits
            apart = model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state)
    except Exception:  # noqa: BLE001 - a model of another shape: its output layer runs whole
        return False
    return full.shape == apart.shape and bool(torch.allclose(full.float(), apart.float(), atol=1e-4))


def layer_names(model) -> dict[str, set[str]]:
    """The base's linear layers by kind, by their names' last part: ``attn`` (under an attention module), ``mlp``
    (under an MLP module) and ``unembed`` (the output layer). Read once from the plain base: peft's wrapped layers
    are no longer ``Linear``."""
    import torch

    head = model.get_output_embeddings()
    kinds: dict[str, set[str]] = {"attn": set(), "mlp": set(), "unembed": set()}
    for path, module in model.named_modules():
        parts = path.split(".")
        if module is head:
            kinds["unembed"].add(parts[-1])
        elif isinstance(module, torch.nn.Linear):
            for kind in ("attn", "mlp"):
                if any(kind in p for p in parts[:-1]):
                    kinds[kind].add(parts[-1])
    return kinds


def layer_widths(model) -> dict[str, int]:
    """Inputs plus outputs of the base's linear layers, summed by their names' last part (what a LoRA of rank 1 on
    them holds). Read once from the plain base, as :func:`layer_names`."""
    import torch

    widths: dict[str, int] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = path.rpartition(".")[2]
            widths[name] = widths.get(name, 0) + module.in_features + module.out_features
    return widths


def lora_targets(kinds: dict[str, set[str]], train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
    """The layers a LoRA of these choices adapts."""
    chosen = {"attn": train_attn, "mlp": train_mlp, "unembed": train_unembed}
    names = sorted({n for kind, on in chosen.items() if on for n in kinds[kind]})
    if not names:
        raise TrainingError("lora_config trains nothing: set train_attn, train_mlp or train_unembed")
    return names
