"""Simple baselines that need no LLM: they keep the LLM numbers honest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def majority(train_targets: Sequence[str], n_test: int) -> list[str]:
    """Predict the most frequent training label for every test example."""
    top = Counter(train_targets).most_common(1)[0][0]
    return [top] * n_test


def tfidf_logreg(
    train_texts: Sequence[str], train_targets: Sequence[str], test_texts: Sequence[str], seed: int
):
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


def random_guess(choices: Sequence, n_test: int, seed: int) -> list:
    """Uniform seeded draws: a label from the label set, or a value from the training targets."""
    import random

    rng = random.Random(seed)
    return [rng.choice(list(choices)) for _ in range(n_test)]


def mean_value(train_values: Sequence[float], n_test: int) -> list[float]:
    """Predict the training mean for every test example (the 'mean price' baseline)."""
    mean = sum(train_values) / len(train_values)
    return [mean] * n_test


def tfidf_ridge(
    train_texts: Sequence[str], train_values: Sequence[float], test_texts: Sequence[str]
) -> list[float]:
    """TF-IDF (word 1-2 grams) and ridge regression on log1p(value), so one costly item cannot dominate."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1), Ridge(alpha=1.0))
    model.fit(list(train_texts), np.log1p(np.clip(np.asarray(train_values, dtype=float), 0, None)))
    return [float(v) for v in np.expm1(model.predict(list(test_texts)))]


def _word_char_features():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    return make_union(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=1),
    )


def tfidf_svm(train_texts: Sequence[str], train_targets: Sequence[str], test_texts: Sequence[str], seed: int):
    """TF-IDF word 1-2 grams + char 2-5 grams and a linear SVM: the strongest cheap text classifier we know."""
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    if len(set(train_targets)) < 2:
        return majority(train_targets, len(test_texts))
    model = make_pipeline(_word_char_features(), LinearSVC(C=0.5, random_state=seed))
    model.fit(list(train_texts), list(train_targets))
    return [str(p) for p in model.predict(list(test_texts))]


def _embeddings(train_texts: Sequence[str], test_texts: Sequence[str]):
    """Unit-length sentence embeddings of train and test texts, embedded in one pass (MiniLM for Latin-script
    text, multilingual e5 otherwise: see tunesmith.models.embeddings.pick_model)."""
    from tunesmith.models.embeddings import embed

    vectors = embed(list(train_texts) + list(test_texts))
    return vectors[: len(train_texts)], vectors[len(train_texts) :]


def embed_logreg(train_texts: Sequence[str], train_targets: Sequence[str], test_texts: Sequence[str], seed: int):
    """Sentence embeddings (MiniLM, or multilingual e5 for non-Latin text) + logistic regression."""
    from sklearn.linear_model import LogisticRegression

    if len(set(train_targets)) < 2:
        return majority(train_targets, len(test_texts))
    x_train, x_test = _embeddings(train_texts, test_texts)
    model = LogisticRegression(max_iter=3000, C=10.0, random_state=seed)
    model.fit(x_train, list(train_targets))
    return [str(p) for p in model.predict(x_test)]


def embed_ridge(train_texts: Sequence[str], train_values: Sequence[float], test_texts: Sequence[str]) -> list[float]:
    """Sentence embeddings + ridge regression on log1p(value)."""
    import numpy as np
    from sklearn.linear_model import Ridge

    x_train, x_test = _embeddings(train_texts, test_texts)
    model = Ridge(alpha=1.0).fit(x_train, np.log1p(np.clip(np.asarray(train_values, dtype=float), 0, None)))
    return [float(v) for v in np.expm1(model.predict(x_test))]
