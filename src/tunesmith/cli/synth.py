"""``tunesmith synth RECIPE`` and the human review of generated items."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from tunesmith.cli import common


class _RecipeOrSubcommand(TyperGroup):
    """``tunesmith synth RECIPE`` runs a recipe; ``tunesmith synth review ...`` is a subcommand."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


synth_app = typer.Typer(rich_markup_mode=None, cls=_RecipeOrSubcommand, no_args_is_help=True,
                        help="Grow data with an LLM: tunesmith synth RECIPE.")
review_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Human review of generated items.")
synth_app.add_typer(review_app, name="review")


@synth_app.command("run", hidden=True)
def synth_run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML with a synth section.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key, e.g. --set synth.limit=10.")] = None,
) -> None:
    """Generate items with the recipe's synth task; every LLM call is cached, so a rerun resumes."""
    from tunesmith.synth.command import run_synth

    cfg = common.recipe_at(recipe, set_ or [])
    common.quiet_libraries()
    from tunesmith.synth.command import summary_table

    res = run_synth(cfg, common.console)
    common.console.print(summary_table(res.summary))
    common.console.print(f"Items: {res.out_dir / 'items.jsonl'}; set aside with reasons: {res.out_dir / 'rejected.jsonl'}; "
                  f"numbers: {res.out_dir / 'stats.json'}")


@review_app.command("export")
def review_export(
    run_dir: Annotated[Path, typer.Argument(help="The run folder, e.g. runs/my-synth.")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write.")] = Path("review.csv"),
) -> None:
    """Write generated items to a CSV with an empty decision column (accept / reject / edit)."""
    from tunesmith.synth.review import export_review

    n = export_review(run_dir / "synth", out)
    common.console.print(f"{n} item(s) → {out}  (fill 'decision' with accept, reject or edit; put edits in 'edited_text')")


@review_app.command("import")
def review_import(
    run_dir: Annotated[Path, typer.Argument(help="The run folder.")],
    review_csv: Annotated[Path, typer.Argument(help="The CSV with decisions.")],
) -> None:
    """Apply review decisions; only accepted and edited items reach synth/accepted.jsonl."""
    from tunesmith.synth.review import import_review

    counts = import_review(run_dir / "synth", review_csv)
    common.console.print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" → {run_dir / 'synth' / 'accepted.jsonl'}")
