"""A document, a question and three answers whose scripted-judge scores are worked out by hand."""

CONTEXT = (
    "The Alder river floods every spring. The council built a flood barrier in 1998. "
    "The barrier cost four million pounds. Farmers planted willows along the banks in 2003. "
    "The town library opened in 1911."
)
QUESTION = "When was the flood barrier built and what did the barrier cost?"
# Notes (one chunk): the two sentences sharing a 5+ letter word with the question: "built ... barrier", "barrier cost".
GOOD = "The council built a flood barrier in 1998. The barrier cost four million pounds."
# helpfulness 8, logicality 9, faithfulness 10 (2 statements, both verbatim), completeness 10 (2/2 notes) -> 9.25
PARTLY_WRONG = "The council built a flood barrier in 1998. The barrier was paid for by the king."
# faithfulness: Fully + No support ("paid", "king" unsupported) -> 5; others 8, 9, 10 -> 8.0
EVASIVE = "Sorry, I cannot tell from the document!"
# helpfulness 2, logicality 9, no statement (no sentence ends in "."), completeness 0 (no note covered)


def rows(*responses: str) -> dict:
    """Reward-function keyword arguments for the responses, all to the one known prompt."""
    return {
        "prompts": [CONTEXT + "\n\n" + QUESTION] * len(responses),
        "completions": list(responses),
        "context": [CONTEXT] * len(responses),
        "question": [QUESTION] * len(responses),
    }
