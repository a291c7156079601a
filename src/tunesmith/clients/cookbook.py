"""tinker-cookbook's recipes, unchanged, against ``tunesmith serve``'s Tinker API.

The cookbook looks a model up in a table of the organisations it knows (its renderer, its tokenizer from the hub);
a base tunesmith serves is not in it, so a recipe stops at ``Unknown model``. :func:`run` adds each base the server
serves to the cookbook's registries first: its tokenizer from the local model (no hub), and the cookbook renderer
that renders a conversation exactly as the base's own chat template does (``role_colon`` when none does). Then the
recipe runs as its own ``__main__`` with its own arguments, as ``python -m <recipe> …`` would.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from dataclasses import dataclass, field

from tunesmith.errors import TunesmithError

# the cookbook's renderers tried in turn against the base's chat template; role_colon renders any tokenizer
RENDERERS = ("qwen3_instruct", "llama3", "role_colon")
PROBE = [{"role": "system", "content": "Sort each message."}, {"role": "user", "content": "my card has not arrived"}]


class CookbookError(TunesmithError):
    """The recipe, the server or the cookbook could not be reached or set up."""


@dataclass(frozen=True)
class Base:
    """A base model the server serves, as the cookbook will know it."""

    name: str
    folder: str
    renderer: str
    tokenizer: object = field(default=None, compare=False, repr=False)  # loaded once, given to every lookup


def served_bases(base_url: str, api_key: str | None) -> list[str]:
    """The names of the bases the server trains and samples (its ``get_server_capabilities``)."""
    import httpx

    url = base_url.rstrip("/") + "/api/v1/get_server_capabilities"
    try:
        answer = httpx.get(url, headers={"X-API-Key": api_key or ""}, timeout=30)
    except httpx.HTTPError as exc:
        raise CookbookError(f"{url}: {exc}; is `tunesmith serve` running there?") from exc
    if answer.status_code != 200:
        raise CookbookError(f"{url} answered {answer.status_code}: {answer.text[:300]} (TINKER_API_KEY is the key, "
                            "'tml-' and a key of the server)")
    return [m["model_name"] for m in answer.json()["supported_models"]]


def matching_renderer(tokenizer) -> str:
    """The first of :data:`RENDERERS` whose generation prompt for :data:`PROBE` is the base's chat template's, token
    for token; ``role_colon`` (plain ``User:`` / ``Assistant:`` turns) for a tokenizer without a template."""
    from tinker_cookbook import renderers

    if not getattr(tokenizer, "chat_template", None):
        return "role_colon"
    text = tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    own = tokenizer.encode(text, add_special_tokens=False)
    for name in RENDERERS[:-1]:
        try:
            rendered = renderers.get_renderer(name, tokenizer).build_generation_prompt(PROBE).to_ints()
        except Exception:  # noqa: BLE001 - a renderer needing tokens this tokenizer lacks does not match
            continue
        if rendered == own:
            return name
    return "role_colon"


def describe(name: str) -> Base:
    """The base ``name`` as the cookbook will know it: its local folder and its renderer."""
    from transformers import AutoTokenizer

    from tunesmith.models.names import resolve

    try:
        folder = resolve(name)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - said with what to do
        raise CookbookError(f"the served base {name!r} has no tokenizer on this machine ({exc}); run the recipe "
                            "where `tunesmith serve` runs, or `tunesmith models pull` it here") from exc
    return Base(name, folder, matching_renderer(tokenizer), tokenizer)


def register(bases: list[Base]) -> None:
    """Each base added to the cookbook's tokenizer registry and model table (a name it knows keeps its own entry)."""
    from tinker_cookbook import model_info, tokenizer_utils

    known = {b.name: b for b in bases}
    looked_up = model_info.get_model_attributes
    if getattr(looked_up, "tunesmith_bases", None) is not None:
        known = looked_up.tunesmith_bases | known
        looked_up = looked_up.__wrapped__

    def attributes(model_name: str):
        base = known.get(model_name.split(":", 1)[0])
        if base is None:
            return looked_up(model_name)
        org, _, version = base.name.rpartition("/")
        return model_info.ModelAttributes(organization=org or "local", version_str=version, size_str=version,
                                          is_chat=True, recommended_renderers=(base.renderer,))

    attributes.tunesmith_bases = known
    attributes.__wrapped__ = looked_up
    model_info.get_model_attributes = attributes
    for base in bases:
        tokenizer_utils.register_tokenizer(base.name, lambda tokenizer=base.tokenizer: tokenizer)


def argument(args: list[str], key: str) -> str | None:
    """The value of a recipe's ``key=value`` argument (chz's form), or None."""
    for arg in args:
        if arg.startswith(f"{key}="):
            return arg.split("=", 1)[1]
    return None


def run(recipe: str, args: list[str]) -> None:
    """``recipe`` (a module, ``tinker_cookbook.recipes.sl_loop``, or a ``.py`` file) run as ``__main__`` with
    ``args``, after the server's bases are added to the cookbook (the server: ``base_url=`` or
    ``$TINKER_BASE_URL``; the key: ``$TINKER_API_KEY``)."""
    try:
        import tinker_cookbook  # noqa: F401
    except ImportError as exc:
        raise CookbookError("tinker-cookbook is not installed: pip install --no-deps tinker-cookbook==0.6.1 "
                            "(and its dependencies: `make install` has them)") from exc
    base_url = argument(args, "base_url") or os.environ.get("TINKER_BASE_URL")
    if not base_url:
        raise CookbookError("no server: pass base_url=http://HOST:PORT (or set TINKER_BASE_URL)")
    bases = [describe(name) for name in served_bases(base_url, os.environ.get("TINKER_API_KEY"))]
    register(bases)
    for base in bases:  # what a recipe's nested renderer_name / model_name_for_tokenizer arguments take
        print(f"tunesmith cookbook: {base.name}: renderer {base.renderer}, tokenizer from {base.folder}",
              file=sys.stderr)
    saved = sys.argv
    sys.argv = [recipe, *args]
    try:
        with sessions_closed() as closing:
            if recipe.endswith(".py"):
                runpy.run_path(recipe, run_name="__main__")
            else:
                runpy.run_module(recipe, run_name="__main__", alter_sys=True)
            closing.status = "success"
    finally:
        sys.argv = saved


class _Closing:
    status = "errored"  # until the recipe returns


@contextlib.contextmanager
def sessions_closed():
    """Every Tinker session the recipe opens, finished when it ends (recipes leave theirs open: the server would hold
    their runs until an idle hour, and the SDK would beat against a server that may be gone)."""
    import tinker

    opened: list = []
    real = tinker.ServiceClient.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        opened.append(self)

    closing = _Closing()
    tinker.ServiceClient.__init__ = init
    try:
        yield closing
    finally:
        tinker.ServiceClient.__init__ = real
        for client in opened:
            try:
                client.close(closing.status).result(timeout=30)
            except Exception:  # noqa: BLE001 - closed already, or the server is gone: its lease ends the run
                pass
