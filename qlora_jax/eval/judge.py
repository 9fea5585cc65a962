"""Pairwise judges for the Elo tournament: verdict files and OpenAI-compatible chat endpoints.

A judge answers one `Match` (one prompt, two models) with a `Judgment` whose `winner` is
``"a"``, ``"b"`` or ``"tie"``. `FileJudge` looks verdicts up in a JSONL file (human or LLM
ratings, or the ``judgments.jsonl`` a previous run wrote); `OpenAIJudge` asks a chat-completions
endpoint with a pairwise prompt like the paper's GPT-4 judge, in both orders of the two answers,
and keeps a winner only when both orders agree (QLoRA §5.1: this cancels position bias).

Verdict file schema, one JSON object per line::

    {"prompt_id": "...", "model_a": "...", "model_b": "...", "winner": "a"}

``question_id`` is accepted for ``prompt_id``. ``winner`` is, case-insensitively, one of
``a``/``b``/``tie``, the paper-style labels ``[[A]]``/``[[B]]``/``[[C]]`` (C is a tie),
``model_a``/``model_b``, ``tie (bothbad)``, ``draw``, or the winning model's name. Several verdicts
for the same prompt and pair (both orders, several raters) are combined by `combine_winners`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

WINNERS = ("a", "b", "tie")
_LABELS = {
    "a": "a", "[[a]]": "a", "model_a": "a",
    "b": "b", "[[b]]": "b", "model_b": "b",
    "tie": "tie", "c": "tie", "[[c]]": "tie", "draw": "tie",
    "tie (bothbad)": "tie", "tie (both bad)": "tie",
}
_FLIP = {"a": "b", "b": "a", "tie": "tie"}



def read_jsonl_objects(path: Path, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("file:line", object)`` for every non-blank line of a JSONL file; ``ValueError`` naming the
    file and line for a missing file, bad JSON or a line that is not a JSON object."""
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec

class JudgeError(RuntimeError):
    """The judge could not give a verdict (HTTP failure, malformed response)."""


@dataclasses.dataclass(frozen=True, order=True)
class Match:
    """One pairwise comparison: the answers of ``model_a`` and ``model_b`` to one prompt."""

    prompt_id: str
    model_a: str
    model_b: str


@dataclasses.dataclass(frozen=True)
class Judgment:
    """A judged match. ``winner`` is "a", "b" or "tie"; ``detail`` holds judge-specific extras."""

    prompt_id: str
    model_a: str
    model_b: str
    winner: str
    detail: dict[str, Any] | None = None

    def __post_init__(self):
        if self.winner not in WINNERS:
            raise ValueError(f"winner={self.winner!r} must be one of {WINNERS}")
        if self.model_a == self.model_b:
            raise ValueError(f"a model cannot play itself: {self.model_a!r}")

    @property
    def score_a(self) -> float:
        """Elo score of ``model_a``: 1 win, 0.5 tie, 0 loss."""
        return {"a": 1.0, "b": 0.0, "tie": 0.5}[self.winner]

    def to_json(self) -> dict[str, Any]:
        out = {"prompt_id": self.prompt_id, "model_a": self.model_a, "model_b": self.model_b,
               "winner": self.winner}
        if self.detail:
            out["detail"] = self.detail
        return out


class Judge(Protocol):
    """Anything that judges a match given the question and both answers."""

    def judge(self, match: Match, question: str, answer_a: str, answer_b: str) -> Judgment: ...


def parse_winner(label: Any, model_a: str, model_b: str) -> str:
    """Normalizes a verdict label (see the module docstring) to "a", "b" or "tie"."""
    if isinstance(label, str):
        key = label.strip().lower()
        if key in _LABELS:
            return _LABELS[key]
        if label.strip() == model_a:
            return "a"
        if label.strip() == model_b:
            return "b"
    raise ValueError(f"unknown winner {label!r}: expected a/b/tie, [[A]]/[[B]]/[[C]], "
                     f"model_a/model_b or a model name ({model_a!r} or {model_b!r})")


def combine_winners(winners: Sequence[str]) -> str:
    """The most frequent verdict; a tie when verdicts disagree with no single most frequent one.

    For the two orders of one pair this is the paper's rule: agreement keeps the winner,
    disagreement (including one tie) is a tie.
    """
    if not winners:
        raise ValueError("no verdicts to combine")
    counts = collections.Counter(winners).most_common()
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "tie"
    return counts[0][0]


class FileJudge:
    """Verdicts read from a JSONL file; `judge` looks a match up in either orientation."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        # (prompt_id, first model, second model) with models sorted -> winners in that orientation.
        self._verdicts: dict[tuple[str, str, str], list[str]] = {}
        for where, rec in read_jsonl_objects(self.path, "judgments file"):
            pid = rec.get("prompt_id", rec.get("question_id"))
            missing = [k for k, v in (("prompt_id", pid), ("model_a", rec.get("model_a")),
                                      ("model_b", rec.get("model_b")),
                                      ("winner", rec.get("winner"))) if v is None]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}; a verdict needs "
                                 "prompt_id, model_a, model_b, winner")
            a, b = str(rec["model_a"]), str(rec["model_b"])
            if a == b:
                raise ValueError(f"{where}: model_a and model_b are both {a!r}")
            try:
                w = parse_winner(rec["winner"], a, b)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if a > b:
                a, b, w = b, a, _FLIP[w]
            self._verdicts.setdefault((str(pid), a, b), []).append(w)
        if not self._verdicts:
            raise ValueError(f"{self.path}: no verdicts")

    def __len__(self) -> int:
        return len(self._verdicts)

    def has(self, match: Match) -> bool:
        a, b = sorted((match.model_a, match.model_b))
        return (match.prompt_id, a, b) in self._verdicts

    def judge(self, match: Match, question: str = "", answer_a: str = "",
              answer_b: str = "") -> Judgment:
        """The combined verdict of the file for this prompt and pair, oriented like ``match``."""
        a, b = sorted((match.model_a, match.model_b))
        key = (match.prompt_id, a, b)
        if key not in self._verdicts:
            raise ValueError(f"{self.path} has no verdict for prompt {match.prompt_id!r}: "
                             f"{match.model_a!r} vs {match.model_b!r}")
        w = combine_winners(self._verdicts[key])
        if match.model_a != a:
            w = _FLIP[w]
        return Judgment(match.prompt_id, match.model_a, match.model_b, w)

    def judgments(self) -> list[Judgment]:
        """One combined judgment per prompt and pair in the file, in sorted order."""
        return [Judgment(pid, a, b, combine_winners(ws))
                for (pid, a, b), ws in sorted(self._verdicts.items())]


# A pairwise judging prompt in the style of the paper's GPT-4 judge (the Vicuna / MT-bench
# pairwise template): explanation first, then a strict final verdict.
SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two "
    "AI assistants to the user question displayed below. Choose the assistant that follows the "
    "user's instructions and answers the user's question better, considering helpfulness, "
    "relevance, accuracy, depth, creativity and level of detail. Begin your evaluation by "
    "comparing the two responses and give a short explanation. Avoid any position bias: the order "
    "in which the responses are presented must not influence your decision. Do not let the length "
    "of the responses or the names of the assistants influence you. Be as objective as possible. "
    "After your explanation, output your final verdict by strictly following this format: "
    '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.'
)
USER_TEMPLATE = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def question_text(prompt: str) -> str:
    """The user's turn(s) of a Guanaco-format prompt, as shown to the judge.

    Drops a system preamble before the first "### Human:" and the trailing "### Assistant:";
    a single turn also loses its "### Human:" tag. Other prompts are returned stripped.
    """
    q = prompt.strip()
    start = q.find("### Human:")
    if start < 0 or not q.endswith("### Assistant:"):
        return q
    q = q[start:-len("### Assistant:")].strip()
    if q.count("### Human:") == 1 and "### Assistant:" not in q:
        q = q[len("### Human:"):].strip()
    return q


def parse_verdict(text: str) -> str | None:
    """"a", "b" or "tie" from the last [[A]]/[[B]]/[[C]] in a judge's reply; None if absent."""
    found = _VERDICT.findall(text)
    return {"A": "a", "B": "b", "C": "tie"}[found[-1]] if found else None


class OpenAIJudge:
    """An OpenAI-compatible chat-completions endpoint as the judge, asked in both orders.

    Args:
      base_url: the API root, e.g. ``http://host:8000/v1`` (``/chat/completions`` is appended
        unless the URL already ends with it).
      model: the judge model name sent in each request.
      api_key: sent as ``Authorization: Bearer ...`` when given.
      timeout: seconds per HTTP request.
      max_retries: retries after the first attempt on HTTP 408/409/429/5xx and connection errors,
        with exponential backoff from ``backoff`` seconds (a numeric ``Retry-After`` wins).
      temperature, max_tokens: sampling settings of the judge (None leaves them out, for
        endpoints that reject them).

    A reply without a [[A]]/[[B]]/[[C]] verdict counts as a tie for that order and is recorded
    as "?" in the judgment's ``detail``; HTTP and format errors raise `JudgeError`.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 5, backoff: float = 1.0,
                 temperature: float | None = 0.0, max_tokens: int | None = 1024):
        url = base_url.rstrip("/")
        if not url.endswith("/chat/completions"):
            url += "/chat/completions"
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"judge URL must be http(s)://host[:port]/..., got {base_url!r}")
        self.url, self.model, self.api_key = url, model, api_key
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        # Loopback endpoints never go through an environment proxy.
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def describe(self) -> dict[str, Any]:
        return {"type": "openai", "url": self.url, "model": self.model,
                "temperature": self.temperature}

    def judge(self, match: Match, question: str, answer_a: str, answer_b: str) -> Judgment:
        """Asks A-vs-B and B-vs-A; the winner stands only if both orders agree, else a tie."""
        ab = self.verdict(question, answer_a, answer_b)
        ba = self.verdict(question, answer_b, answer_a)
        w_ab = ab or "tie"
        w_ba = _FLIP[ba or "tie"]
        winner = w_ab if w_ab == w_ba else "tie"
        label = {"a": "A", "b": "B", "tie": "C", None: "?"}
        return Judgment(match.prompt_id, match.model_a, match.model_b, winner,
                        detail={"ab": label[ab], "ba": label[ba]})

    def verdict(self, question: str, answer_a: str, answer_b: str) -> str | None:
        """One order: "a", "b", "tie" for the answers as placed, None if the reply has none."""
        content = self.complete([
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(
                question=question, answer_a=answer_a, answer_b=answer_b)},
        ])
        return parse_verdict(content)

    def complete(self, messages: list[dict[str, str]]) -> str:
        """POSTs one chat completion (with retries) and returns the reply text."""
        request_body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            request_body["temperature"] = self.temperature
        if self.max_tokens is not None:
            request_body["max_tokens"] = self.max_tokens
        body = json.dumps(request_body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            delay = self.backoff * 2**attempt
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode("utf-8", "replace")
                last = f"HTTP {e.code}: {detail}"
                if e.code not in _RETRY_STATUS:
                    raise JudgeError(f"judge at {self.url} answered {last}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                    delay = float(retry_after)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.max_retries:
                time.sleep(min(delay, 60.0))
        else:
            raise JudgeError(f"judge at {self.url} failed after {self.max_retries + 1} "
                             f"attempt(s); last error: {last}")
        try:
            payload = json.loads(raw)
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge at {self.url} sent no chat completion "
                             f"(choices[0].message.content): {raw[:300]!r}") from None
        if not isinstance(content, str):
            raise JudgeError(f"judge at {self.url} sent non-text content: {content!r:.300}")
        return content
