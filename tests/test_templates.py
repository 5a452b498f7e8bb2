"""Judge prompts are package data, versioned by content, rendered in one pass."""

import pytest

from trl_longreward.reward.templates import TEMPLATE_NAMES, PromptTemplate, load_template

EXPECTED_PLACEHOLDERS = {
    "helpfulness": {"question", "response"},
    "logicality": {"question", "response"},
    "faithfulness_break": {"question", "response"},
    "faithfulness_check": {"statement", "passages"},
    "completeness_extract": {"question", "chunk"},
    "completeness_score": {"question", "notes", "response"},
}


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_every_template_ships_with_its_placeholders(name):
    template = load_template(name)
    assert template.placeholders == EXPECTED_PLACEHOLDERS[name]
    assert len(template.version) == 12


@pytest.mark.parametrize("name", ["helpfulness", "logicality", "completeness_score"])
def test_numeric_templates_end_with_the_score_protocol(name):
    tail = load_template(name).text[-400:]
    assert "[[" in tail and "0 to 10" in tail


def test_templates_delimit_untrusted_text():
    for name in TEMPLATE_NAMES:
        text = load_template(name).text
        for placeholder in EXPECTED_PLACEHOLDERS[name]:
            assert f"<{placeholder}>\n{{{placeholder}}}\n</{placeholder}>" in text, (name, placeholder)


def test_render_is_single_pass():
    template = PromptTemplate("t", "Q: {question}\nR: {response}")
    out = template.render(question="what is {response}?", response="{question}")
    assert out == "Q: what is {response}?\nR: {question}"


def test_render_requires_every_placeholder():
    with pytest.raises(KeyError, match="response"):
        PromptTemplate("t", "{question} {response}").render(question="q")


def test_version_changes_with_text(tmp_path):
    a = PromptTemplate("helpfulness", "Rate it. [[N]] {question} {response}")
    b = PromptTemplate("helpfulness", "Rate it carefully. [[N]] {question} {response}")
    assert a.version != b.version
    (tmp_path / "helpfulness.txt").write_text(b.text)
    assert load_template("helpfulness", str(tmp_path)).version == b.version
    with pytest.raises(FileNotFoundError, match="logicality.txt"):
        load_template("logicality", str(tmp_path))
