"""Korean text in plots is drawn with a real font, never as empty boxes (matplotlib's missing-glyph warning)."""

import warnings

from tunesmith.plotting import korean_font, pyplot


def test_korean_labels_and_titles_render_without_missing_glyphs(tmp_path):
    assert korean_font() is not None, "the koreanize-matplotlib wheel (a dependency) ships NanumGothic"
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.bar(["긍정", "부정", "card_arrival"], [3, 1, 2])
    ax.set_title("리뷰 별점 분포 (stars)")
    ax.set_xlabel("레이블")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(tmp_path / "ko.png")
    plt.close(fig)
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == []
    assert (tmp_path / "ko.png").stat().st_size > 1000


def test_without_the_fallback_the_same_plot_warns(tmp_path):
    """The check above can fail: DejaVu Sans alone has no Hangul."""
    import matplotlib

    plt = pyplot()
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}):
        fig, ax = plt.subplots()
        ax.set_title("리뷰")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig.savefig(tmp_path / "plain.png")
        plt.close(fig)
    assert any("missing from font" in str(w.message) for w in caught)
