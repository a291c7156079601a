"""Quality gates refuse a weak teacher's degenerate output, each refusal with a reason and counted."""

import json

import pytest

from tunesmith.synth.command import run_synth
from tunesmith.synth.gates import copy_problem, is_loop, question_problem, reason_key, text_problem

from .conftest import write_jsonl
from .test_synth_tasks import fake, recipe  # noqa: F401  (fixture)


@pytest.mark.parametrize("text, language, reason", [
    ("...", "ko", "punctuation only"),
    ("  ", "en", "empty"),
    ("[] -", "en", "punctuation only"),
    ("예", "ko", "too short"),
    ("세금 세금 세금 세금 세금 세금 세금", "ko", "repetition loop"),
    ("The capital is Paris. The capital is Paris. The capital is Paris. The capital is Paris.", "en", "repetition loop"),
    ("What is the tax on a lease deposit?", "ko", "wrong script"),
    ("{{달전}}", "ko", "template placeholder"),  # what the embedded model really kept before this gate
])
def test_degenerate_texts_are_refused(text, language, reason):
    problem = text_problem(text, language)
    assert problem is not None and reason_key(problem) == reason


@pytest.mark.parametrize("text, language", [
    ("전세 보증금에 세금이 붙나요?", "ko"),
    ("2024년 KB 부동산 시세는 어디서 보나요?", "ko"),  # a few Latin letters in a Korean sentence
    ("How can I change my PIN code?", "en"),
    ("1998", "en"),
])
def test_good_texts_pass(text, language):
    assert text_problem(text, language, min_chars=3) is None


def test_text_copied_from_the_prompt_instructions_is_refused():
    template = "아래 질문을 $n가지 다른 방식으로 바꾸어 쓰세요. 질문에 답하지는 마세요.\n\n질문: $question"
    assert text_problem("질문에 답하지는 마세요", "ko", template=template) == "copied from the prompt"
    assert text_problem("서울에는 사람이 몇 명 사나요?", "ko", template=template) is None


def test_loops_need_real_repetition():
    assert not is_loop("I paid the fee, then I paid the rent, and then I went home to rest.")
    assert is_loop("ㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋ")


def test_copy_problem_catches_equal_containing_and_close_paraphrases():
    original = "서울의 인구는 얼마인가?"
    assert copy_problem("서울의 인구는 얼마인가", original, [], 0.8) == "equal to the original"
    assert copy_problem("질문: 서울의 인구는 얼마인가? 답하세요", original, [], 0.8) == "copies the original"
    assert copy_problem("서울 인구가 몇 명이지?", original, ["서울 인구가 몇 명이지"], 0.8) == "equal to another paraphrase"
    assert copy_problem("서울에는 사람이 몇 명 사나요?", original, [], 0.8) is None
    assert copy_problem("서울?", original, [], 0.8) == "too short for a paraphrase"


def test_paraphrase_of_dots_is_set_aside_with_reasons_and_counted(tmp_path, fake):  # noqa: F811
    """The replies the embedded model really gave for KorQuAD: '...', word salad in the wrong script, a copy."""
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "바그너는 괴테의 파우스트를 읽고 무엇을 쓰고자 했는가?",
                                               "answer": "교향곡", "context": "1839년 바그너는 괴테의 파우스트을 처음 읽고..."}])
    fake(lambda prompt, r: json.dumps({"paraphrases": [
        "...", "...", "What did Wagner want to write?", "바그너는 괴테의 파우스트를 읽고 무엇을 쓰고자 했는가?",
        "파우스트 파우스트 파우스트 파우스트 파우스트 파우스트", "바그너가 파우스트를 읽은 뒤 작곡하려던 것은?"]}))
    res = run_synth(recipe(tmp_path, {"task": "paraphrase", "input": str(data), "language": "ko",
                                      "paraphrase": {"n": 6}}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [i["question"] for i in items] == ["바그너가 파우스트를 읽은 뒤 작곡하려던 것은?"]
    assert items[0]["context"].startswith("1839년")  # kept items carry their source context
    stats = json.loads((res.out_dir / "stats.json").read_text())
    assert stats["kept"] == 1 and stats["set_aside"] == 5
    assert stats["set_aside_by_reason"] == {"paraphrase punctuation only": 2, "paraphrase wrong script": 1,
                                            "paraphrase equal to the original": 1, "paraphrase repetition loop": 1}


def test_qa_pairs_with_dot_answers_are_refused(tmp_path, fake):  # noqa: F811
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "policy.txt").write_text("Refunds are issued within 30 days of purchase. Contact support to start one.")
    fake(lambda prompt, r: json.dumps({"pairs": [{"question": "...", "answer": "..."},
                                                 {"question": "When are refunds issued?", "answer": "within 30 days"}]}))
    res = run_synth(recipe(tmp_path, {"task": "qa_from_documents", "input": str(docs)}))
    items = [json.loads(x) for x in (res.out_dir / "accepted.jsonl").read_text().splitlines()]
    assert [i["answer"] for i in items] == ["within 30 days"]
    assert "question or answer punctuation only" in (res.out_dir / "rejected.jsonl").read_text()


RECORDED = __import__("pathlib").Path(__file__).parent / "data" / "synth_recorded_kept.jsonl"
TEXT_FIELDS = {"paraphrase": ["question"], "qa_from_documents": ["question", "answer"],
               "seed_questions": ["question", "answer"], "evol_instruct": ["instruction"],
               "preference_pairs": ["rejected"]}


def test_recorded_kept_items_pass_every_gate():
    """Items the embedded model's real runs kept (docs/synth_results.md; CC0/Apache sources only) replayed
    through the gates: each passes, except those a later gate was made for (``rejected_now``)."""
    from tunesmith.synth.generators import evolution_problem

    rows = [json.loads(x) for x in RECORDED.read_text(encoding="utf-8").splitlines()]
    assert rows, "no recorded items"
    for row in rows:
        for name in TEXT_FIELDS[row["task"]]:
            assert text_problem(row["data"][name], row["language"], min_chars=1) is None, row
        if row["task"] == "paraphrase":
            assert copy_problem(row["data"]["question"], row["data"]["original_question"], [], 0.8) is None, row
        if row["task"] == "evol_instruct":
            d = row["data"]
            assert evolution_problem(d["parent"], d["instruction"], d["operation"], 1) == row.get("rejected_now"), row
        if row["task"] == "qa_from_documents":
            assert question_problem(row["data"]["question"], row["language"]) == row.get("rejected_now"), row


@pytest.mark.parametrize("text, language, ok", [
    ("What is the purpose of the appeal form?", "en", True),
    ("4. Spam and Inauthentic Activity on GitHub", "en", False),   # a heading the embedded model wrote
    ("The [GitHub Terms of Service](/site-policy/github-terms),", "en", False),
    ("환불은 며칠 안에 되나요?", "ko", True),
    ("환불은 며칠 안에 처리되나요", "ko", True),                      # an interrogative ending without '?'
    ("환불은 30일 안에 처리됩니다.", "ko", False),
])
def test_generated_questions_must_be_questions(text, language, ok):
    assert (question_problem(text, language) is None) == ok


def test_evolution_must_add_words_unless_it_broadens():
    from tunesmith.synth.generators import evolution_problem

    parent = "Describe a situation in which the given stereotype can harm you."
    assert evolution_problem(parent, "Describe a situation in which the given stereotype*M", "reasoning", 1) == (
        "adds nothing new")
    assert evolution_problem(parent, "Describe a situation in which the given stereotype can harm you, and explain "
                             "step by step how to avoid it.", "reasoning", 1) is None
    assert evolution_problem("고양이를 돌보는 방법을 알려 주세요.", "고양이를 돌보는 방법을 매일 일정과 비용까지 알려 주세요.",
                             "complicate", 1) is None
    assert evolution_problem(parent, "Write a haiku about rain.", "broaden", 1) is None
