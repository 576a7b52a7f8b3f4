"""The shipped known facts (``editlens/resources/known_facts.json``) and their loader."""
from __future__ import annotations

import pytest

from editlens.data.known_facts import known_fact_cases, known_facts
from editlens.errors import DataFormatError


def test_shipped_known_facts():
    facts = known_facts()
    assert len(facts) == 6 and facts[0] == ("The capital of {} is", "Japan", "Tokyo", "Madrid")
    cases = known_fact_cases()
    assert [c.case_id for c in cases] == [f"lk{i}" for i in range(6)]
    assert cases[1].rewrite.text == "Romeo and Juliet was written by"
    assert (cases[1].rewrite.target_new, cases[1].rewrite.target_true) == ("Charles Dickens", "William Shakespeare")


@pytest.mark.parametrize("content, match", [
    ("{}", "non-empty JSON list"), ("[1]", "record 0 is not an object"),
    ('[{"template": "{} is", "subject": "x", "true": "a"}]', "record 0: field 'new'"),
    ('[{"template": "is", "subject": "x", "true": "a", "new": "b"}]', "record 0: field 'template' has no"),
    ("[", "cannot read"),
])
def test_bad_known_facts_file_names_record_and_field(tmp_path, content, match):
    p = tmp_path / "facts.json"
    p.write_text(content)
    with pytest.raises(DataFormatError, match=match):
        known_facts(p)
