"""The plan of a run: every request to send, fully determined by the cards, the questions and the seeds.

A plan is side-independent: the candidate and (later) the baseline are evaluated on the same plan, so both see
identical prompts, option orders and seeds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from evalpipe.cards import TaskCard
from evalpipe.data import LETTERS, Question


@dataclass(frozen=True)
class SampleRequest:
    task: str
    card_hash: str
    question_id: str
    sample_index: int
    seed: int
    messages: tuple[dict[str, str], ...]
    prompt_hash: str
    gold: str
    letters: str
    labels: dict[str, str] = field(default_factory=dict)
    # Log-likelihood cards: the text scored after the prompt for each option, in letter order.
    continuations: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.card_hash, self.question_id, self.sample_index)

    @property
    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


@dataclass(frozen=True)
class TaskPlan:
    card: TaskCard  # as run: sampling overrides applied
    questions: tuple[Question, ...]
    samples: int
    seed: int
    requests: tuple[SampleRequest, ...]

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def card_hash(self) -> str:
        return self.card.card_hash

    @property
    def question_ids(self) -> list[str]:
        return [q.id for q in self.questions]


def sample_seed(task_seed: int, sample_index: int) -> int:
    """The seed sent with a sample: a 31-bit digest of (task seed, sample index), the same for every question."""
    digest = hashlib.sha256(f"{task_seed}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def option_order(salt: str, question_id: str, sample_index: int, n_options: int) -> list[int]:
    """Source indices of the options in the order shown: ranked by sha256(salt:id:sample:i)."""
    return sorted(
        range(n_options),
        key=lambda i: hashlib.sha256(f"{salt}:{question_id}:{sample_index}:{i}".encode()).hexdigest(),
    )


def shown_order(card: TaskCard, question: Question, sample_index: int) -> list[int]:
    """Source indices of a question's options in the order shown for one sample."""
    if card.prompt.shuffle_options:
        return option_order(card.prompt.shuffle_salt, question.id, sample_index, len(question.options))
    return list(range(len(question.options)))


def render_continuations(card: TaskCard, question: Question, sample_index: int) -> tuple[str, ...]:
    """Log-likelihood cards: each option's continuation, in the order shown (letter order); () otherwise."""
    template = card.prompt.continuation
    if template is None:
        return ()
    order = shown_order(card, question, sample_index)
    return tuple(template.replace("{letter}", LETTERS[pos]).replace("{text}", question.options[src])
                 for pos, src in enumerate(order))


def render_prompt(card: TaskCard, question: Question, sample_index: int) -> tuple[str, str, str]:
    """(user message, gold as scored, valid letters) for one sample."""
    prompt = card.prompt
    if not question.options:
        return prompt.template.replace("{question}", question.text), question.gold, ""
    order = shown_order(card, question, sample_index)
    letters = LETTERS[: len(order)]
    lines = [prompt.option_format.format(letter=letters[pos], text=question.options[src])
             for pos, src in enumerate(order)]
    gold = letters[order.index(question.correct_index)]
    text = (
        prompt.template.replace("{question}", question.text)
        .replace("{options}", "\n".join(lines))
        .replace("{letters}", letters)
    )
    return text, gold, letters


def render_messages(card: TaskCard, question: Question, sample_index: int
                    ) -> tuple[tuple[dict[str, str], ...], str, str]:
    """(chat messages, gold as scored, valid letters) of one sample: the card's system prompt, if any, then the
    user turn."""
    user, gold, letters = render_prompt(card, question, sample_index)
    messages: tuple[dict[str, str], ...] = ({"role": "user", "content": user},)
    if card.prompt.system is not None:
        messages = ({"role": "system", "content": card.prompt.system}, *messages)
    return messages, gold, letters


def prompt_hash(messages: tuple[dict[str, str], ...]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()[:16]


def build_task_plan(card: TaskCard, questions: list[Question], *, samples: int, seed: int) -> TaskPlan:
    """Requests ordered sample-major (sample 0 of every question first), so a partial run covers all questions."""
    requests = []
    card_hash = card.card_hash
    for sample_index in range(samples):
        s_seed = sample_seed(seed, sample_index)
        for q in questions:
            messages, gold, letters = render_messages(card, q, sample_index)
            requests.append(
                SampleRequest(
                    task=card.name, card_hash=card_hash, question_id=q.id, sample_index=sample_index, seed=s_seed,
                    messages=messages, prompt_hash=prompt_hash(messages), gold=gold, letters=letters,
                    labels=q.labels, continuations=render_continuations(card, q, sample_index),
                )
            )
    return TaskPlan(card=card, questions=tuple(questions), samples=samples, seed=seed, requests=tuple(requests))
