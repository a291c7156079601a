"""Simple baselines that need no LLM: they keep the LLM numbers honest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def majority(train_targets: Sequence[str], n_test: int) -> list[str]:
    """Predict the most frequent training label for every test example."""
    top = Counter(train_targets).most_common(1)[0][0]
    return [top] * n_test


def tfidf_logreg(train_texts: Sequence[str], train_targets: Sequence[str], test_texts: Sequence[str], seed: int):
    """TF-IDF (word 1-2 grams + char 2-4 grams) and logistic regression, fitted on the train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    if len(set(train_targets)) < 2:
        return majority(train_targets, len(test_texts))
    features = make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True),
    )
    model = make_pipeline(features, LogisticRegression(max_iter=2000, C=10.0, random_state=seed))
    model.fit(list(train_texts), list(train_targets))
    return [str(p) for p in model.predict(list(test_texts))]
