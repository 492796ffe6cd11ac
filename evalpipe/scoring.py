"""Reasoning-aware answer extraction and grading: pure functions from a response to an outcome.

Only the visible answer is scored: `message.content`, cut after the last `</think>` when the server left the
thinking in it. The card names an extraction ladder (rules below) and an answer type (grader). Every rule finds
the last answer statement of its kind; of the rules that find one, the statement that comes last in the text wins
(the last committed answer: "Answer: A. ... Actually it is C.\n\nC" is C), ties going to the rule listed first.
A hedged answer statement ("Answer: A or B") commits to nothing. Every scored sample records the rule that
fired; `none` when no rule found an answer.

Bump SCORING_VERSION whenever a change here can change an outcome: it is part of every card hash.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from evalpipe.records import Outcome

# 2: mc_final_letter_line no longer reads an echoed option list or initials as a choice (found by crosscheck).
# 3: the last answer statement wins across the ladder; hedged letters ("A or B") are no answer; a trailing remark
#    in words ("34 (not 33)") is not part of a math answer.
SCORING_VERSION = 3

NO_RULE = "none"
HEDGED = "hedged"
# Longer predictions are compared as strings only: symbolic parsing of huge expressions can hang.
MAX_SYMBOLIC_CHARS = 400
MATH_VERIFY_TIMEOUT_S = 5

# A rule's hit: the answer (None: a hedged statement) and the span [start, end) of its answer statement in the
# text it read.
Hit = tuple["str | None", int, int]
Rule = Callable[[str, str], "Hit | None"]


@dataclass(frozen=True)
class Score:
    extracted: str | None
    rule: str
    outcome: Outcome


def visible_answer(content: str | None) -> str:
    """The part of the content a reader sees: after the last `</think>`; nothing if thinking never closed."""
    if not content:
        return ""
    if "</think>" in content:
        return content.rsplit("</think>", 1)[1]
    if "<think>" in content:
        return ""
    return content


# ---------------------------------------------------------------------------------------------------------
# Extraction rules. Each takes (visible text, valid letters) and returns the answer string or None.


def _braced(text: str, open_at: int) -> str | None:
    """Content of the brace group starting at text[open_at] == '{', honouring nesting; None if unbalanced."""
    depth = 0
    for i in range(open_at, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")


def _last_boxed(text: str) -> Hit | None:
    for match in reversed(list(_BOXED.finditer(text))):
        if match.group(1):
            inner = _braced(text, match.start(1))
            end = match.start(1) + len(inner) + 2 if inner is not None else 0
        else:  # `\boxed 5`: one bare token
            token = re.match(r"[^\s$]+", text[match.end() :])
            inner = token.group(0) if token else None
            end = match.end() + len(inner or "")
        if inner is not None and inner.strip():
            return inner.strip(), match.start(), end
    return None


def rule_boxed_last(text: str, letters: str) -> Hit | None:
    """Last `\\boxed{...}` (or `\\fbox{...}`), nested braces kept."""
    return _last_boxed(text)


_ANSWER_LINE = re.compile(r"\b(?i:final\s+answer|answer)\b[*_]*\s*(?:(?i:is)\b\s*:?|[:：])\s*[*_]*\s*(.+)")


def rule_answer_line(text: str, letters: str) -> Hit | None:
    """The rest of the line after the last 'answer is' / 'Answer:' ('so the final answer is 34' after an earlier
    `\\boxed{33}` is 34). A line that only holds a `\\boxed{}` is left to boxed_last, which starts after it."""
    for match in reversed(list(_ANSWER_LINE.finditer(text))):
        value = match.group(1).strip().strip("*_ ").rstrip(".").strip()
        value = value.strip("$").strip()
        value = re.sub(r"^\\[(\[]|\\[)\]]$", "", value).strip().rstrip(".").strip()
        if value:
            return value, match.start(), match.end()
    return None


def _mc_text(text: str) -> str:
    # NFKC maps full-width letters and colons to ASCII; only multiple choice uses it (it would corrupt LaTeX).
    return unicodedata.normalize("NFKC", text)


_LETTER_AFTER_MARKER = re.compile(
    r"[\s*_$(\[{]*(?:\\(?:boxed|text|textbf|mathrm|mathbf)\s*\{[\s(\[]*)*([A-Z])(?![A-Za-z0-9])"
)
# A second option letter joined to the first ("A or B", "A/B", "A, B"): the statement names no single choice.
_HEDGE_AFTER_LETTER = re.compile(r"[\s*_$)\]}]*(?:,|/|\bor\b|\band\b)\s*[*_$(\[{]*([A-Z])(?![A-Za-z0-9])")
_MARKER = re.compile(r"(?i:answer)\s*[*_]*\s*:")


def _letter_after(text: str, start: int, letters: str) -> tuple[str | None, int] | None:
    """(letter, end) for a valid option letter at `start`, (None, end) for a hedge between two, None for neither."""
    match = _LETTER_AFTER_MARKER.match(text, start)
    if not match or match.group(1) not in letters:
        return None
    hedge = _HEDGE_AFTER_LETTER.match(text, match.end())
    if hedge and hedge.group(1) in letters and hedge.group(1) != match.group(1):
        return None, hedge.end()
    return match.group(1), match.end()


def _last_letter_after(pattern: re.Pattern[str], text: str, letters: str) -> Hit | None:
    """The option letter after the last match of `pattern` that is followed by one (None if it is hedged)."""
    for match in reversed(list(pattern.finditer(text))):
        found = _letter_after(text, match.end(), letters)
        if found:
            answer, end = found
            return answer, match.start(), end
    return None


def rule_mc_answer_marker(text: str, letters: str) -> Hit | None:
    """Last 'Answer: X' whose X is a valid option letter (an echoed 'Answer: $LETTER' is skipped)."""
    return _last_letter_after(_MARKER, text, letters)


def rule_mc_boxed(text: str, letters: str) -> Hit | None:
    """Last `\\boxed{...}` whose content is an option letter, e.g. `\\boxed{\\text{(B)}}` or `\\boxed{B) 4}`."""
    boxed = _last_boxed(text)
    if boxed is None:
        return None
    inner, start, end = boxed
    stripped = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{", "", inner).replace("}", "")
    match = re.match(r"[\s(\[*$]*([A-Z])(?:[\s)\].:*$]|$)", stripped + " ")
    if match and match.group(1) in letters:
        return match.group(1), start, end
    return None


_PHRASE = re.compile(r"(?i:answer|option|choice)\s+(?i:is)\s*:?")


def rule_mc_answer_phrase(text: str, letters: str) -> Hit | None:
    """Last 'the answer is (X)' / 'correct option is X'."""
    return _last_letter_after(_PHRASE, text, letters)


_LETTER_LINE = re.compile(r"^[\s*_(\[]*([A-Z])(?:\s*[*_]*\s*$|[)\].:])")
_INITIALS = re.compile(r"^[\s*_(\[]*[A-Z]\.\s*[A-Z]\.")


def rule_mc_final_letter_line(text: str, letters: str) -> Hit | None:
    """The last non-empty line starts with a lone letter: '**C**', '(C)', 'C) 42 J'. Not when the line before it
    starts with another option's letter (the response ends by listing the options: no choice was made), nor for
    initials ('B. F. Skinner was ...')."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    match = _LETTER_LINE.match(lines[-1])
    if not match or match.group(1) not in letters or _INITIALS.match(lines[-1]):
        return None
    previous = _LETTER_LINE.match(lines[-2]) if len(lines) > 1 else None
    if previous and previous.group(1) in letters and previous.group(1) != match.group(1):
        return None
    start = text.rfind(lines[-1])
    return match.group(1), start, start + len(lines[-1])


EXTRACTION_RULES: dict[str, Rule] = {
    "boxed_last": rule_boxed_last,
    "answer_line": rule_answer_line,
    "mc_answer_marker": rule_mc_answer_marker,
    "mc_boxed": rule_mc_boxed,
    "mc_answer_phrase": rule_mc_answer_phrase,
    "mc_final_letter_line": rule_mc_final_letter_line,
}


def extract(ladder: list[str] | tuple[str, ...], text: str, letters: str = "") -> tuple[str | None, str]:
    """The answer of the last answer statement any rule of the ladder finds, and that rule's name; (None, HEDGED)
    when that statement names two options; (None, NO_RULE) when none is found. Hits whose spans overlap the last
    one are the same statement read by several rules ('Answer: \\boxed{B}'): the rule listed first names it.
    With option letters (multiple choice) every rule reads the NFKC-normalised text, so positions compare."""
    if letters:
        text = _mc_text(text)
    hits = [(name, hit) for name in ladder if (hit := EXTRACTION_RULES[name](text, letters)) is not None]
    if not hits:
        return None, NO_RULE
    last_start = max(hit[1] for _, hit in hits)
    name, (answer, _, _) = next((name, hit) for name, hit in hits if hit[2] > last_start or hit[1] == last_start)
    return (answer, name) if answer is not None else (None, HEDGED)


# ---------------------------------------------------------------------------------------------------------
# Graders


_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def _normalize_math(answer: str) -> str:
    s = _TEXT_CMD.sub(r"\1", answer)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace("$", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    return s


@functools.lru_cache(maxsize=4096)
def _parsed_gold(gold: str):
    from math_verify import parse  # imported lazily: it pulls sympy

    # Bare LaTeX is misread by math_verify (e.g. `3\sqrt{2}` -> 3): always wrap in $...$.
    return parse(f"${gold}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)


def math_equal(gold: str, predicted: str) -> bool:
    """String match after light normalisation, else symbolic equivalence with math-verify (with timeouts)."""
    if _normalize_math(gold) == _normalize_math(predicted):
        return True
    if len(predicted) > MAX_SYMBOLIC_CHARS:
        return False
    from math_verify import parse, verify

    gold_parsed = _parsed_gold(gold)
    pred_parsed = parse(f"${predicted}$", parsing_timeout=MATH_VERIFY_TIMEOUT_S)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=MATH_VERIFY_TIMEOUT_S))


def _as_integer(answer: str) -> int | None:
    s = _TEXT_CMD.sub(r"\1", answer)
    s = re.sub(r"[\s$,]|\\[,!; ]|\{,\}", "", s).rstrip(".")
    s = re.sub(r"\^\{?\\circ\}?$", "", s)
    if re.fullmatch(r"[+-]?\d+", s):
        return int(s)
    if re.fullmatch(r"[+-]?\d+\.0*", s):
        return int(float(s))
    return None


def integer_equal(gold: str, predicted: str) -> bool:
    """AIME: integers compared as numbers ('073' == '73'); a non-integer prediction is checked symbolically."""
    gold_int = int(gold)
    as_int = _as_integer(predicted)
    if as_int is not None:
        return as_int == gold_int
    return math_equal(str(gold_int), predicted)


# A parenthetical in words after the answer ("34 (not 33)", "5 (in cm)"): a remark, not part of the answer.
_TRAILING_REMARK = re.compile(r"\s+\(([^()]*)\)\s*$")
_PLAIN_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")


def without_remark(answer: str) -> str:
    """The answer without a trailing remark in words; `\\text{}` is read as its text, so `34 \\text{ (not } 33)` is
    34 (a careful reader does not grade it correct for 33, which math-verify alone would)."""
    plain = _TEXT_CMD.sub(r"\1", answer)
    remark = _TRAILING_REMARK.search(plain)
    if remark and remark.start() > 0 and _PLAIN_WORD.search(remark.group(1)):
        return plain[: remark.start()].strip()
    return answer


def grade(answer_type: str, gold: str, predicted: str) -> bool:
    if answer_type == "multiple_choice":
        return predicted == gold
    predicted = without_remark(predicted)
    if answer_type == "integer":
        return integer_equal(gold, predicted)
    return math_equal(gold, predicted)


def score_response(
    *,
    answer_type: str,
    ladder: list[str] | tuple[str, ...],
    gold: str,
    content: str | None,
    finish_reason: str | None,
    letters: str = "",
) -> Score:
    """Outcome of one response. A truncated response (finish_reason 'length') is never correct."""
    extracted, rule = extract(ladder, visible_answer(content), letters)
    if finish_reason == "length":
        return Score(extracted, rule, "truncated")
    if extracted is None:
        return Score(None, rule, "no_answer")
    return Score(extracted, rule, "correct" if grade(answer_type, gold, extracted) else "wrong")


# ---------------------------------------------------------------------------------------------------------
# Log-likelihood multiple choice (scoring.method: loglikelihood)

LOGLIKELIHOOD_RULE = "loglikelihood"


# A token holding part of a multi-byte character is shown as U+FFFD; a run of m of them stands for 1..m characters.
_PARTIAL_CHARS = re.compile("\ufffd+")


def _texts_match(token_texts: str, text: str) -> bool:
    if "\ufffd" not in token_texts:
        return token_texts == text
    pattern = "".join(
        f"[^\\x00-\\x7f]{{1,{len(piece)}}}" if piece.startswith("\ufffd") else re.escape(piece)
        for piece in re.split(f"({_PARTIAL_CHARS.pattern})", token_texts) if piece
    )
    return re.fullmatch(pattern, text) is not None


def continuation_logprob(logprobs: dict, continuation: str) -> tuple[float, int]:
    """(sum of the continuation's token logprobs, prompt tokens echoed) from an echoed /v1/completions choice whose
    prompt ended with `continuation`, followed by one generated token (the last entry, left out). The continuation's
    tokens are the fewest last prompt tokens whose texts spell it (a character split over several tokens shows as
    U+FFFD in each, so those match any non-ASCII character); counting from the start (`text_offset`) would drift
    at every such split in the context. Raises ValueError when the answer cannot be read that way (no token
    boundary where the continuation starts, a missing logprob)."""
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values) or not tokens:
        raise ValueError("the echoed logprobs have no tokens aligned with token_logprobs")
    prompt_tokens = [t or "" for t in tokens[:-1]]
    first, suffix = None, ""
    for j in range(len(prompt_tokens) - 1, -1, -1):
        suffix = prompt_tokens[j] + suffix
        if len(suffix.replace("\ufffd", "")) > len(continuation):
            break
        if _texts_match(suffix, continuation):
            first = j
            break
    if first is None:
        raise ValueError(f"the echoed tokens do not end with the continuation {continuation!r} on a token boundary "
                         f"(the server's tokenizer merges it with the context), so it cannot be scored alone")
    scored = values[first:len(prompt_tokens)]
    if any(not isinstance(v, (int, float)) for v in scored):
        raise ValueError("a continuation token has no logprob")
    return float(sum(scored)), len(prompt_tokens)


def loglikelihood_choice(option_logprobs: list[float], continuations: list[str]) -> tuple[int, int]:
    """(acc choice, acc_norm choice): the option with the highest log-likelihood, and the one with the highest
    log-likelihood per UTF-8 byte of its continuation (lm-eval's acc_norm). Ties go to the first option."""
    per_byte = [lp / max(len(c.encode("utf-8")), 1) for lp, c in zip(option_logprobs, continuations, strict=True)]
    return (max(range(len(option_logprobs)), key=lambda i: (option_logprobs[i], -i)),
            max(range(len(per_byte)), key=lambda i: (per_byte[i], -i)))
