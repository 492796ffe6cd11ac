"""A fake server that answers known benchmark questions the way reasoning models end their answers, in any
harness's prompt (ours, EvalScope's, lm-eval's), for cross-checking graders and making import fixtures.

`StyledServer` is the in-repo FakeServer with one change: when the user message contains the text of a known
question (and, for multiple choice, all its options), the reply is written in one of the answer styles below,
picked per (question, sample) with the listed weights, and is correct with a per-question probability whose mean
is `behaviour.accuracy`. For multiple choice the letter is read from the prompt itself (the label printed before
the option's text), so a harness that orders or labels options its own way still gets a consistent answer.

The styles are the endings seen in R1-style outputs and in harness issue threads (../shared/reference/
eval-anchors.md F.1, F.2): plain and decorated boxed answers, a revised answer after an earlier one, answers left
inside unclosed or inline thinking, truncated answers whose content already holds a boxed value, markdown-bold and
bracketed letters, option texts quoted in the explanation, lowercase letters, no marker at all. Their weights are
a synthetic mix, not measured frequencies: agreement rates measured on it show which classes exist, not how often
a real model produces them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from evalpipe.task_plan import TaskPlan
from evalpipe.testing.fake_server import FakeServer, Reply, _unit, _words

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class KnownQuestion:
    task: str
    text: str
    answer_type: str  # math | integer | multiple_choice
    gold: str = ""  # math and integer answers
    options: tuple[str, ...] = ()
    correct_index: int | None = None
    quotable: bool = True  # False for encrypted data (GPQA): its option texts are never written into a response


def known_questions(plans: Iterable[TaskPlan]) -> list[KnownQuestion]:
    return [KnownQuestion(task=plan.name, text=q.text, answer_type=plan.card.scoring.answer_type, gold=q.gold,
                          options=q.options, correct_index=q.correct_index,
                          quotable=plan.card.dataset.local.password is None)
            for plan in plans for q in plan.questions]


@dataclass(frozen=True)
class Shown:
    """What one prompt shows of a question: the right answer and wrong ones, as the prompt labels them."""

    answer: str
    wrong: tuple[str, ...]
    option_of: dict[str, str] | None = None  # letter -> option text (multiple choice, quotable data only)


# ---------------------------------------------------------------------------------------------------------
# Styles: (answer, shown, thinking, rnd) -> Reply. `answer` is the one the model commits to (right or wrong).

Style = Callable[[str, Shown, str, Callable[[str], float]], Reply]


def _other(shown: Shown, answer: str, rnd: Callable[[str], float]) -> str:
    choices = [w for w in (shown.answer, *shown.wrong) if w != answer] or [answer]
    return choices[int(rnd("other") * len(choices))]


MATH_STYLES: dict[str, tuple[float, Style]] = {
    "boxed": (30, lambda a, s, t, r: Reply(content=f"Adding these up, the answer is $\\boxed{{{a}}}$.", reasoning=t)),
    "final_answer_block": (10, lambda a, s, t, r: Reply(
        content=f"**Final Answer**\n\\[\n\\boxed{{{a}}}\n\\]", reasoning=t)),
    "dfrac": (4, lambda a, s, t, r: Reply(content="So the value is $\\boxed{" + a.replace("\\frac", "\\dfrac") + "}$.",
                                          reasoning=t)),
    "variable_equals": (4, lambda a, s, t, r: Reply(content=f"Solving, we find $\\boxed{{x = {a}}}$.", reasoning=t)),
    "text_units": (3, lambda a, s, t, r: Reply(content=f"The length is $\\boxed{{{a}\\text{{ cm}}}}$.",
                                               reasoning=t)),
    "zero_padded": (3, lambda a, s, t, r: Reply(
        content=f"The answer is $\\boxed{{{a.zfill(3) if a.isdigit() else a}}}$.", reasoning=t)),
    "revised": (6, lambda a, s, t, r: Reply(
        content=f"A first attempt gives $\\boxed{{{_other(s, a, r)}}}$. Wait, that double counts; correcting it, "
                f"the answer is $\\boxed{{{a}}}$.", reasoning=t)),
    "think_inline": (8, lambda a, s, t, r: Reply(
        content=f"<think>\n{t} maybe \\boxed{{{_other(s, a, r)}}}?\n</think>\n\nThe answer is $\\boxed{{{a}}}$.")),
    "think_unclosed": (3, lambda a, s, t, r: Reply(content=f"<think>\n{t} so it is \\boxed{{{a}}}")),
    "answer_in_reasoning_only": (3, lambda a, s, t, r: Reply(
        content="I hope this explanation helps.", reasoning=f"{t} so the answer is \\boxed{{{a}}}")),
    "truncated_after_box": (4, lambda a, s, t, r: Reply(
        content=f"{t} which gives \\boxed{{{a}}}. To double check, expand the", finish_reason="length")),
    "answer_line": (5, lambda a, s, t, r: Reply(
        content=f"Therefore, the final answer is: ${a}$. I hope it is correct.", reasoning=t)),
    "last_number_prose": (3, lambda a, s, t, r: Reply(content=f"After simplifying, we get {a}.", reasoning=t)),
    "percent": (2, lambda a, s, t, r: Reply(content=f"That is $\\boxed{{{a}\\%}}$ of the total.", reasoning=t)),
}

MC_STYLES: dict[str, tuple[float, Style]] = {
    "answer_colon": (30, lambda a, s, t, r: Reply(content=f"Weighing the options.\n\nAnswer: {a}", reasoning=t)),
    "bold_marker": (6, lambda a, s, t, r: Reply(content=f"Everything points one way.\n\n**Answer: {a}**",
                                                reasoning=t)),
    "bold_letter": (5, lambda a, s, t, r: Reply(content=f"So the right option is clear.\n\nAnswer: **{a}**",
                                                reasoning=t)),
    "uppercase_marker": (4, lambda a, s, t, r: Reply(content=f"ANSWER: {a}", reasoning=t)),
    "parenthesized": (5, lambda a, s, t, r: Reply(content=f"Answer: ({a})", reasoning=t)),
    "letter_with_option_text": (4, lambda a, s, t, r: Reply(
        content=f"Answer: {a}) {(s.option_of or {}).get(a, '')}".rstrip(), reasoning=t)),
    "boxed_letter": (5, lambda a, s, t, r: Reply(content=f"The answer is $\\boxed{{{a}}}$.", reasoning=t)),
    "boxed_text_letter": (3, lambda a, s, t, r: Reply(content=f"$\\boxed{{\\text{{({a})}}}}$", reasoning=t)),
    "answer_is_phrase": (5, lambda a, s, t, r: Reply(content=f"Therefore, the answer is ({a}).", reasoning=t)),
    "revised": (6, lambda a, s, t, r: Reply(
        content=f"Answer: {_other(s, a, r)}\n\nOn reflection that ignores the second condition.\n\nAnswer: {a}",
        reasoning=t)),
    "quotes_other_option": (6, lambda a, s, t, r: Reply(
        content=(f"Option {_other(s, a, r)} says \"{s.option_of[_other(s, a, r)]}\", which does not hold here."
                 if s.option_of else f"Option {_other(s, a, r)} does not hold here.") + f"\n\nAnswer: {a}",
        reasoning=t)),
    "echoed_format": (3, lambda a, s, t, r: Reply(
        content=f"Answer: {a}\n\n(As requested, the last line reads \"Answer: $LETTER\".)", reasoning=t)),
    "final_letter_line": (4, lambda a, s, t, r: Reply(content=f"Putting it together:\n\n**{a}**", reasoning=t)),
    "lowercase_letter": (3, lambda a, s, t, r: Reply(content=f"answer: {a.lower()}", reasoning=t)),
    "think_inline": (6, lambda a, s, t, r: Reply(
        content=f"<think>\n{t}\nAnswer: {_other(s, a, r)}?\n</think>\n\nAnswer: {a}")),
    "prose_only": (3, lambda a, s, t, r: Reply(content=f"I would pick {a}, since the others fail a basic check.",
                                               reasoning=t)),
    "truncated_after_marker": (3, lambda a, s, t, r: Reply(
        content=f"{t}\nAnswer: {a}\nBut let me verify once more by", finish_reason="length")),
}


def _pick(styles: dict[str, tuple[float, Style]], weights: dict[str, float], u: float) -> tuple[str, Style]:
    total = sum(weights.get(name, w) for name, (w, _) in styles.items())
    for name, (weight, style) in styles.items():
        u -= weights.get(name, weight) / total
        if u < 0:
            return name, style
    return name, style


# ---------------------------------------------------------------------------------------------------------
# Reading the prompt


_LABEL_BEFORE = re.compile(r"\(?([A-J])\s*[).:]\s*$")


def _label_of(prompt: str, option: str) -> str | None:
    """The letter a prompt prints before an option's text ('B) text', '(B) text', 'B. text')."""
    at = prompt.find(option)
    while at != -1:
        match = _LABEL_BEFORE.search(prompt[max(0, at - 8) : at])
        if match:
            return match.group(1)
        at = prompt.find(option, at + 1)
    return None


def shown_in(question: KnownQuestion, prompt: str, rnd: Callable[[str], float]) -> Shown | None:
    if question.answer_type == "integer":
        return Shown(answer=question.gold, wrong=(str((int(question.gold) + 1 + int(rnd("wrong") * 98)) % 1000),))
    if question.answer_type == "math":
        return Shown(answer=question.gold, wrong=(f"{question.gold}+{1 + int(rnd('wrong') * 9)}",))
    labels = [_label_of(prompt, option) for option in question.options]
    if any(label is None for label in labels) or question.correct_index is None:
        return None
    option_of = {label: option for label, option in zip(labels, question.options)}  # type: ignore[misc]
    right = labels[question.correct_index]
    return Shown(answer=right, wrong=tuple(x for x in labels if x != right),
                 option_of=option_of if question.quotable else None)


class StyledServer(FakeServer):
    """FakeServer answering `questions` in realistic styles (see the module docstring); other prompts as usual.
    `weights` overrides style weights by name, e.g. {"truncated_after_box": 50}."""

    def __init__(self, questions: Iterable[KnownQuestion], behaviour: Any = None,
                 weights: dict[str, float] | None = None, **kwargs: Any):
        super().__init__(behaviour, **kwargs)
        self.weights = weights or {}
        # Longest first: a short question that is a substring of another must not capture its prompts.
        self.questions = sorted(questions, key=lambda q: len(q.text), reverse=True)
        self._found: dict[str, KnownQuestion | None] = {}
        self.style_of: dict[tuple[str, Any, int], str] = {}  # (user message key, seed, attempt) -> style

    def _lookup(self, key: str, user: str) -> KnownQuestion | None:
        if key not in self._found:
            self._found[key] = next((q for q in self.questions if q.text in user
                                     and all(option in user for option in q.options)), None)
        return self._found[key]

    def _reply(self, user: str, key: str, seed: Any, attempt: int, max_tokens: int) -> Reply:
        question = self._lookup(key, user)
        if question is None:
            return super()._reply(user, key, seed, attempt, max_tokens)
        salt = f"{question.task}/{question.text[:200]}:{seed}:{attempt}"

        def rnd(what: str) -> float:
            return _unit(what, salt)

        shown = shown_in(question, user, rnd)
        if shown is None:
            return super()._reply(user, key, seed, attempt, max_tokens)
        a = min(max(self.behaviour.accuracy, 1e-9), 1.0)
        p_correct = _unit("difficulty", question.task, question.text[:200]) ** ((1 - a) / a)
        correct = rnd("correct") < p_correct
        answer = shown.answer if correct or not shown.wrong else shown.wrong[int(rnd("pick") * len(shown.wrong))]
        styles = MC_STYLES if question.answer_type == "multiple_choice" else MATH_STYLES
        name, style = _pick(styles, self.weights, rnd("style"))
        self.style_of[(key, seed, attempt)] = f"{'mc' if styles is MC_STYLES else 'math'}:{name}"
        return style(answer, shown, _words(self.behaviour.reasoning_words, salt), rnd)
