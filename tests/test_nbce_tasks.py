"""The harder NBCE benchmark tasks (benchmarks/_nbce_tasks.py) ask what their contexts hold: every asked number sits
in the evidence contexts and nowhere else, distractor facts sit elsewhere, dev and test cases never share a seed, and
answers match as whole tokens."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _nbce_common import answers_correct
from _nbce_tasks import TASKS, _fresh, make_task_case

from hf_ext import load_bbc_news, smollm2_path


@pytest.fixture(scope="module")
def articles_and_tokenizer():
    articles = [f"{row['title']}\n{row['text']}" for row in load_bbc_news()]
    return articles, AutoTokenizer.from_pretrained(smollm2_path())


def _holds(text: str, number: str) -> bool:
    return re.search(rf"(?<![0-9]){number}(?![0-9])", text) is not None


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_asked_numbers_sit_in_the_evidence_contexts_and_nowhere_else(articles_and_tokenizer, task, index) -> None:
    articles, tokenizer = articles_and_tokenizer
    case = make_task_case(task, "test", index, articles, tokenizer, context_tokens=192, n=8)
    assert len(case["contexts"]) == 8
    assert len(case["evidence"]) == (1 if task in ("multikey", "longdoc") else len(case["answers"]))
    for number in case["answers"]:
        holding = [k for k, context in enumerate(case["contexts"]) if _holds(context, number)]
        if task == "longdoc":  # overlapping windows: the fact may sit in two neighbours, the first is the evidence
            assert case["evidence"][0] == holding[0] and holding == list(range(holding[0], holding[0] + len(holding)))
        else:
            assert len(holding) == 1 and holding[0] in case["evidence"]
    for k in case["evidence"]:  # every evidence context holds an asked number
        assert any(_holds(case["contexts"][k], number) for number in case["answers"])
    expected = {"multikey": 1, "multivalue": (2, 3, 4), "multiquery": 2, "longdoc": 1}[task]
    assert len(case["answers"]) in (expected if isinstance(expected, tuple) else (expected,))
    if task == "multikey":  # three more facts of the same form, each in another context
        facts = [k for k, c in enumerate(case["contexts"]) if "secret number is" in c]
        assert len(facts) == 4 and case["evidence"][0] in facts
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in case["contexts"]]
    assert max(lengths) <= 192 + 2  # cut to the context budget (decode / re-encode may shift a token)


def test_dev_and_test_cases_differ_and_are_reproducible(articles_and_tokenizer) -> None:
    articles, tokenizer = articles_and_tokenizer
    dev = make_task_case("multikey", "dev", 0, articles, tokenizer, 192, 8)
    test = make_task_case("multikey", "test", 0, articles, tokenizer, 192, 8)
    assert dev["seed"] != test["seed"] and dev["contexts"] != test["contexts"]
    assert make_task_case("multikey", "test", 0, articles, tokenizer, 192, 8) == test


def test_answers_match_as_whole_tokens_and_all_are_needed() -> None:
    assert answers_correct("They are 1234 and 5678.", ["1234", "5678"])
    assert not answers_correct("They are 1234 and 56789.", ["1234", "5678"])
    assert not answers_correct("It is 12345.", ["1234"])
    assert answers_correct("(1234)", ["1234"])


def test_a_drawn_number_the_contexts_already_hold_is_replaced_and_others_are_kept() -> None:
    assert _fresh(["1234", "5678"], ["nothing here", "x 12345 y"]) == ["1234", "5678"]
    replaced = _fresh(["2004", "5678"], ["In 2004 the club was sold."])
    assert replaced[0] != "2004" and replaced[1] == "5678" and len(replaced[0]) == 4


@pytest.mark.parametrize("seed", range(3))
def test_the_written_out_full_sort_reference_picks_the_processors_tokens(seed) -> None:
    """`FullSortNBCE` (the speed part's reference, no package code) and `NBCELogitsProcessor` (the nucleus from a
    top-k) pick the same token at every step, on peaked and on flat rows (nuclei past the first candidates)."""
    import torch
    from nbce_longcontext import FullSortNBCE

    from hf_ext.generation import NBCELogitsProcessor

    generator = torch.Generator().manual_seed(seed)
    reference, fast = FullSortNBCE(), NBCELogitsProcessor(beta=0.25)
    ids = torch.arange(18).view(6, 3)  # distinct rows, as distinct contexts give
    for step in range(12):
        scale = 8.0 if step % 3 else 0.5  # every third step nearly flat: nuclei of thousands of tokens
        scores = torch.randn((6, 2000), generator=generator) * scale
        want, got = reference(ids, scores.clone()), fast(ids, scores.clone())
        token = int(want[0].argmax())
        assert bool(torch.isfinite(got[:, token]).all()) and int(got[0].argmax()) == token, step
        ids = torch.cat([ids, torch.full((6, 1), token)], dim=1)
