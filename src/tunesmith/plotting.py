"""matplotlib for every plot: headless (Agg) and able to draw Korean.

The default font (DejaVu Sans) has no Hangul, so Korean labels and titles became empty boxes. The
NanumGothic font shipped in the ``koreanize-matplotlib`` wheel (SIL Open Font License) is registered
as a per-glyph fallback: Latin text keeps DejaVu Sans, Hangul is drawn with NanumGothic. We add the
font file ourselves instead of importing that package (its import changes global settings).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

FALLBACK = "NanumGothic"


def korean_font() -> Path | None:
    """The NanumGothic TTF inside the installed koreanize-matplotlib package, or None."""
    spec = importlib.util.find_spec("koreanize_matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "fonts" / "NanumGothic.ttf"
    return path if path.is_file() else None


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, with the Korean fallback font registered once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager

    font = korean_font()
    if font is not None and FALLBACK not in matplotlib.rcParams["font.family"]:
        font_manager.fontManager.addfont(str(font))
        matplotlib.rcParams["font.family"] = ["DejaVu Sans", FALLBACK]  # a list: per-glyph fallback
    return plt
