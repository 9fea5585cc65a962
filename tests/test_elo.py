"""Elo tournament: generation files, matches, Elo over match orders, judges, CLI."""

from __future__ import annotations

import http.server
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_jax.eval import elo
from qlora_jax.eval.elo import (
    FileJudge,
    Judgment,
    JudgeError,
    Match,
    OpenAIJudge,
    elo_ratings,
    load_generations,
    make_matches,
)
from qlora_jax.eval.judge import USER_TEMPLATE, combine_winners, parse_verdict, question_text

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def oa_records(shared):
    """The first 5 real OASST1 validation prompts (Guanaco format) with their top reply."""
    with open(shared / "data/oasst/qlora_oa_questions.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for _, line in zip(range(5), f)]
    assert all(r["input"].startswith("### Human:") for r in records)
    return records


# Answer quality grows with the level: "long" pads the real reply the most. The fake LLM judge
# below prefers the longer answer, so the true order is long > medium > short.
LEVELS = {"short": 0, "medium": 3, "long": 6}


def answer(record, level: int) -> str:
    return "Indeed. " * level + record["output"][:200]


def write_generations(tmp_path: Path, records, levels=LEVELS) -> list[Path]:
    """One generation file per model, named after the model (records carry no 'model')."""
    paths = []
    for model, level in levels.items():
        path = tmp_path / f"{model}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i, r in enumerate(records):
                f.write(json.dumps({"id": f"oa-{i}", "prompt": r["input"],
                                    "output": answer(r, level)}) + "\n")
        paths.append(path)
    return paths


def bradley_terry_judgments(strengths: dict[str, float], prompts: int, seed: int,
                            tie_prob: float = 0.1) -> list[Judgment]:
    """Every pair on every prompt; P(a beats b) = e^sa / (e^sa + e^sb) among non-ties."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(prompts):
        for a, b in itertools.combinations(sorted(strengths), 2):
            if rng.random() < tie_prob:
                winner = "tie"
            else:
                p_a = 1.0 / (1.0 + np.exp(strengths[b] - strengths[a]))
                winner = "a" if rng.random() < p_a else "b"
            out.append(Judgment(f"p{p}", a, b, winner))
    return out


class FakeChatServer:
    """OpenAI-compatible chat endpoint on 127.0.0.1 (ephemeral port) in a thread.

    ``respond(n, body) -> (status, text_or_bytes[, headers])`` makes each reply (n counts
    requests from 0); text is wrapped as a chat completion. The request loop stops by itself after
    ``max_requests`` requests or ``deadline_s`` seconds, or when the context exits.
    """

    def __init__(self, respond, max_requests: int = 500, deadline_s: float = 60.0):
        self.respond, self.requests = respond, []
        self._lock, self._stop = threading.Lock(), threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    n = len(server.requests)
                    server.requests.append({"path": self.path, "headers": dict(self.headers),
                                            "body": body})
                status, reply, *headers = server.respond(n, body)
                if isinstance(reply, str):
                    reply = json.dumps({"id": f"c{n}", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop"}]}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                for key, value in (headers[0] if headers else {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 0.1
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        end = time.monotonic() + deadline_s

        def loop():
            while (not self._stop.is_set() and len(self.requests) < max_requests
                   and time.monotonic() < end):
                self.httpd.handle_request()

        self.thread = threading.Thread(target=loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(timeout=5)
        self.httpd.server_close()


def answers_in(body) -> tuple[str, str]:
    """The two answers in a judging request built from USER_TEMPLATE."""
    user = body["messages"][-1]["content"]
    a = user.split("[The Start of Assistant A's Answer]\n", 1)[1].split(
        "\n[The End of Assistant A's Answer]", 1)[0]
    b = user.split("[The Start of Assistant B's Answer]\n", 1)[1].split(
        "\n[The End of Assistant B's Answer]", 1)[0]
    return a, b


def prefers_longer(n, body):
    a, b = answers_in(body)
    verdict = "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"
    return 200, f"Assistant {verdict[2]} is more detailed. [[C]] would be unfair. {verdict}"


def always_a(n, body):
    return 200, "Assistant A is better. [[A]]"


# --------------------------------------------------------------------------- generations, matches

def test_load_generations_schema_variants(tmp_path, oa_records):
    """prompt/input and output/completion are both read; model defaults to the file name; records
    without ids line up by the prompt text; one file may hold several models."""
    recs = oa_records[:3]
    (tmp_path / "ref.jsonl").write_text("".join(
        json.dumps({"input": r["input"], "output": r["output"]}) + "\n" for r in recs))
    (tmp_path / "two.jsonl").write_text("".join(
        json.dumps({"model": m, "prompt": r["input"], "completion": m + r["output"][:50]}) + "\n"
        for m in ("x", "y") for r in reversed(recs)))
    gens = load_generations([tmp_path / "ref.jsonl", tmp_path / "two.jsonl"])
    assert gens.models == ["ref", "x", "y"]
    assert len(gens.prompts) == 3
    pid = elo.prompt_id(recs[0]["input"])
    assert gens.prompts[pid] == recs[0]["input"]
    assert gens.outputs["ref"][pid] == recs[0]["output"]
    assert gens.outputs["y"][pid] == "y" + recs[0]["output"][:50]

    # Without ids, a model's second answer to the same prompt text is a second prompt.
    for name in ("p", "q"):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": "### Human: Hola ### Assistant:", "output": f"{name}{i}"}) + "\n"
            for i in range(2)))
    gens = load_generations([tmp_path / "p.jsonl", tmp_path / "q.jsonl"])
    pid = elo.prompt_id("### Human: Hola ### Assistant:")
    assert gens.outputs == {"p": {pid: "p0", pid + "#2": "p1"}, "q": {pid: "q0", pid + "#2": "q1"}}


def test_load_generations_full_real_prompt_file(shared, tmp_path):
    """The 953 real OASST1 prompts load as a model (their reference replies), lined up by
    question_id with another model that answered them in another order and without the file's
    system preamble; the judge sees the question without the preamble and Guanaco tags."""
    ref = shared / "data/oasst/qlora_oa_questions.jsonl"
    records = [json.loads(line) for line in ref.read_text(encoding="utf-8").splitlines()]
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"model": "tiny", "id": r["question_id"],
                                       "prompt": r["input"], "output": f"answer {i}"}) + "\n"
                           for i, r in reversed(list(enumerate(records)))))
    gens = load_generations([ref, gen])
    assert gens.models == ["qlora_oa_questions", "tiny"]
    assert len(gens.prompts) == len(records) == 953
    first = records[0]
    assert gens.outputs["qlora_oa_questions"][first["question_id"]] == first["output"]
    question = question_text(gens.prompts[first["question_id"]])
    assert question == first["input"].removeprefix("### Human:").removesuffix(
        "### Assistant:").strip()


@pytest.mark.parametrize("case, message", [
    ("bad_json", r"medium\.jsonl:2: not valid JSON"),
    ("missing_output", r"medium\.jsonl:1: missing key 'output' or 'completion'"),
    ("non_string", r"medium\.jsonl:1: 'output' must be a string"),
    ("missing_prompt", r"model 'medium' \(from .*medium\.jsonl\) has no answer for 1 prompt"),
    ("duplicate", r"medium\.jsonl:6: model 'medium' already answered prompt 'oa-0' at "
                  r".*medium\.jsonl:1"),
    ("id_conflict", r"medium\.jsonl:1: id 'oa-0' has a different prompt than at .*long\.jsonl:1"),
    ("one_model", r"at least two models"),
    ("no_file", r"generations file not found"),
])
def test_load_generations_bad_inputs(tmp_path, oa_records, case, message):
    """Bad generation files raise a ValueError naming the file, line and key at fault."""
    long, medium, short = sorted(write_generations(tmp_path, oa_records))
    lines = medium.read_text().splitlines()
    rec0 = json.loads(lines[0])
    paths = [long, medium, short]
    if case == "bad_json":
        lines[1] = lines[1][:-1]
    elif case == "missing_output":
        lines[0] = json.dumps({"id": "oa-0", "prompt": rec0["prompt"], "text": "x"})
    elif case == "non_string":
        lines[0] = json.dumps(rec0 | {"output": ["x"]})
    elif case == "missing_prompt":
        del lines[3]
    elif case == "duplicate":
        lines.append(lines[0])
    elif case == "id_conflict":
        lines[0] = json.dumps(rec0 | {"prompt": "### Human: another ### Assistant:"})
    elif case == "one_model":
        paths = [medium]
    elif case == "no_file":
        paths = [long, tmp_path / "nope.jsonl"]
    medium.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_generations(paths)


def test_make_matches_every_pair_seeded_and_order_free():
    """Every unordered pair meets once per prompt; the shown-first model is seeded and does not
    depend on the order models and prompts are given in."""
    models, prompts = ["c", "a", "b", "d"], ["p2", "p0", "p1"]
    matches = make_matches(models, prompts, seed=3)
    assert len(matches) == 3 * 6
    assert {(m.prompt_id, frozenset((m.model_a, m.model_b))) for m in matches} == {
        (p, frozenset(pair)) for p in prompts for pair in itertools.combinations(models, 2)}
    assert make_matches(sorted(models, reverse=True), sorted(prompts), seed=3) == matches
    assert any(m.model_a > m.model_b for m in matches)  # orientation is drawn, not sorted
    assert make_matches(models, prompts, seed=4) != matches
    with pytest.raises(ValueError, match="at least two models"):
        make_matches(["a"], prompts)


# --------------------------------------------------------------------------- Elo

def test_bradley_terry_strength_order_recovered():
    """Judgments sampled from a Bradley-Terry model with known strengths give Elo means in the
    same order, with the extremes' 95% intervals apart; ratings are zero-sum around 1000."""
    strengths = {"m-weak": -1.0, "m-low": -0.4, "m-mid": 0.1, "m-high": 0.6, "m-top": 1.2}
    judgments = bradley_terry_judgments(strengths, prompts=150, seed=0)
    res = elo_ratings(judgments, permutations=2000, seed=0)
    assert res.models == sorted(strengths, key=strengths.get, reverse=True)
    assert res.low[0] > res.high[-1]
    assert np.all(res.low <= res.mean) and np.all(res.mean <= res.high)
    np.testing.assert_allclose(res.mean.sum(), 1000.0 * len(strengths), rtol=1e-12)
    assert res.num_matches == 150 * 10
    assert (res.wins + res.ties + res.losses == 150 * 4).all()


def test_result_independent_of_input_order_given_seed():
    """Shuffling the matches and swapping which model is listed first gives bit-identical
    ratings for the same seed; another seed changes the numbers but not the order."""
    judgments = bradley_terry_judgments({"a": 0.0, "b": 0.5, "c": 1.0}, prompts=60, seed=1)
    flip = {"a": "b", "b": "a", "tie": "tie"}
    rng = random.Random(7)
    shuffled = [Judgment(j.prompt_id, j.model_b, j.model_a, flip[j.winner])
                if rng.random() < 0.5 else j for j in judgments]
    rng.shuffle(shuffled)
    r1 = elo_ratings(judgments, permutations=500, seed=11)
    r2 = elo_ratings(shuffled, permutations=500, seed=11)
    assert r1.models == r2.models
    for field in ("mean", "low", "high", "wins", "ties", "losses"):
        np.testing.assert_array_equal(getattr(r1, field), getattr(r2, field))
    r3 = elo_ratings(judgments, permutations=500, seed=12)
    assert r3.models == r1.models and not np.array_equal(r3.mean, r1.mean)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("wxyz"), st.sampled_from("wxyz"),
                          st.sampled_from(["a", "b", "tie"])).filter(lambda t: t[0] != t[1]),
                min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_elo_invariants_on_random_tournaments(raw, rnd):
    """For any matches: ratings sum to models x initial in every order (each update is
    zero-sum), the mean lies inside its 95% interval, and reordering the input changes nothing."""
    judgments = [Judgment(f"p{i}", a, b, w) for i, (a, b, w) in enumerate(raw)]
    res = elo_ratings(judgments, permutations=64, seed=5)
    np.testing.assert_allclose(res.mean.sum(), 1000.0 * len(res.models), rtol=1e-12)
    assert np.all(res.low <= res.mean + 1e-9) and np.all(res.mean <= res.high + 1e-9)
    rnd.shuffle(judgments)
    again = elo_ratings(judgments, permutations=64, seed=5)
    assert again.models == res.models
    np.testing.assert_array_equal(again.mean, res.mean)


def test_ties():
    """Ties score 0.5: all ties keep every model at exactly 1000; two models that tie each other
    and beat a third the same way end up level, and W/T/L counts ties for both sides."""
    all_ties = [Judgment(f"p{i}", a, b, "tie") for i in range(20)
                for a, b in itertools.combinations("xyz", 2)]
    res = elo_ratings(all_ties, permutations=300)
    np.testing.assert_array_equal(res.mean, 1000.0)
    np.testing.assert_array_equal(res.low, 1000.0)
    np.testing.assert_array_equal(res.high, 1000.0)
    assert res.ties.tolist() == [40, 40, 40] and res.wins.sum() == res.losses.sum() == 0

    mixed = [j for i in range(30) for j in (Judgment(f"p{i}", "x", "y", "tie"),
                                            Judgment(f"p{i}", "x", "z", "a"),
                                            Judgment(f"p{i}", "z", "y", "b"))]
    res = elo_ratings(mixed, permutations=2000, seed=0)
    assert res.models[-1] == "z"
    assert abs(res.rating("x") - res.rating("y")) < 5
    rows = {r["model"]: r for r in res.rows()}
    assert (rows["x"]["wins"], rows["x"]["ties"], rows["x"]["losses"]) == (30, 30, 0)
    assert (rows["z"]["wins"], rows["z"]["ties"], rows["z"]["losses"]) == (0, 0, 60)


def test_ten_thousand_permutations_in_seconds():
    """The paper's 10,000 orders of ~1,000 matches run in a few seconds (vectorized)."""
    judgments = bradley_terry_judgments({f"m{i}": 0.3 * i for i in range(5)}, prompts=100, seed=2)
    start = time.perf_counter()
    res = elo_ratings(judgments, permutations=10_000, seed=0)
    elapsed = time.perf_counter() - start
    assert res.permutations == 10_000 and res.num_matches == 1000
    assert elapsed < 15, f"{elapsed=:.1f}s"


# --------------------------------------------------------------------------- judges

def test_verdict_helpers():
    """[[X]] parsing keeps the last verdict; combining keeps agreement and ties disagreement;
    Guanaco framing is stripped from the question shown to the judge."""
    assert parse_verdict("[[A]] at first, but finally [[B]]") == "b"
    assert parse_verdict("a tie: [[C]]") == "tie"
    assert parse_verdict("no idea [[D]]") is None
    assert combine_winners(["a", "a"]) == "a"
    assert combine_winners(["a", "b"]) == "tie"
    assert combine_winners(["a", "tie"]) == "tie"
    assert combine_winners(["b", "b", "a"]) == "b"
    assert question_text("### Human: Hi there? ### Assistant:") == "Hi there?"
    assert question_text("A chat. ### Human: Hi ### Assistant: Hello ### Human: Bye "
                         "### Assistant:") == "### Human: Hi ### Assistant: Hello ### Human: Bye"
    assert question_text("Plain question?") == "Plain question?"


def test_file_judge_labels_orientation_and_errors(tmp_path):
    """Verdict labels of every accepted style normalize; lookups work in either orientation;
    both orders disagreeing combine to a tie; missing verdicts and bad labels are clear errors."""
    path = tmp_path / "v.jsonl"
    rows = [
        {"prompt_id": "p1", "model_a": "x", "model_b": "y", "winner": "[[A]]"},
        {"question_id": "p2", "model_a": "y", "model_b": "x", "winner": "model_b"},
        {"prompt_id": "p3", "model_a": "x", "model_b": "y", "winner": "y"},
        {"prompt_id": "p4", "model_a": "x", "model_b": "y", "winner": "[[C]]"},
        {"prompt_id": "p5", "model_a": "x", "model_b": "y", "winner": "a"},
        {"prompt_id": "p5", "model_a": "y", "model_b": "x", "winner": "a"},  # other order disagrees
        {"prompt_id": "p6", "model_a": "x", "model_b": "y", "winner": "B"},
        {"prompt_id": "p6", "model_a": "y", "model_b": "x", "winner": "A"},  # other order agrees
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = FileJudge(path)
    got = {p: judge.judge(Match(p, "x", "y")).winner for p in ("p1", "p2", "p3", "p4", "p5", "p6")}
    assert got == {"p1": "a", "p2": "a", "p3": "b", "p4": "tie", "p5": "tie", "p6": "b"}
    assert judge.judge(Match("p1", "y", "x")).winner == "b"
    assert len(judge.judgments()) == 6
    with pytest.raises(ValueError, match=r"no verdict for prompt 'p9': 'x' vs 'y'"):
        judge.judge(Match("p9", "x", "y"))

    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1] | {"winner": "maybe"}) + "\n")
    with pytest.raises(ValueError, match=r"v\.jsonl:2: unknown winner 'maybe'"):
        FileJudge(path)
    path.write_text(json.dumps({"prompt_id": "p1", "model_a": "x", "winner": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"v\.jsonl:1: missing key\(s\) \['model_b'\]"):
        FileJudge(path)


def test_openai_judge_both_orders_cancel_position_bias():
    """A judge that always says [[A]] is asked both orders and so yields a tie; a judge that
    prefers the longer answer picks it in either presentation order. Requests are
    chat completions to <base>/chat/completions with the key as a Bearer token."""
    match = Match("p0", "m1", "m2")
    with FakeChatServer(always_a) as server:
        judge = OpenAIJudge(server.url, "judge-1", api_key="sk-test", backoff=0.01)
        j = judge.judge(match, "Why?", "short", "a much longer answer")
    assert (j.winner, j.detail) == ("tie", {"ab": "A", "ba": "A"})
    assert len(server.requests) == 2
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-1" and req["body"]["temperature"] == 0.0
    assert [m["role"] for m in req["body"]["messages"]] == ["system", "user"]
    assert req["body"]["messages"][1]["content"] == USER_TEMPLATE.format(
        question="Why?", answer_a="short", answer_b="a much longer answer")
    assert answers_in(server.requests[1]["body"]) == ("a much longer answer", "short")

    with FakeChatServer(prefers_longer) as server:
        judge = OpenAIJudge(server.url + "/chat/completions", "judge-1", backoff=0.01)
        assert judge.judge(match, "Why?", "short", "a much longer answer").winner == "b"
        assert judge.judge(match, "Why?", "a much longer answer", "short").winner == "a"
        assert judge.judge(match, "Why?", "same", "same").winner == "tie"
    assert "Authorization" not in server.requests[0]["headers"]
    with FakeChatServer(always_a) as server:
        OpenAIJudge(server.url, "o1", temperature=None, max_tokens=None).verdict("q", "a", "b")
    assert set(server.requests[0]["body"]) == {"model", "messages"}


def test_openai_judge_retries_and_errors():
    """A 503 is retried (once here) and then succeeds; a 429 is retried after its Retry-After;
    401 fails at once; a persistent 503 fails after max_retries; a non-JSON body is a
    JudgeError; a reply with no verdict counts as a tie."""
    def flaky(n, body):
        return (503, b'{"error": "overloaded"}') if n == 0 else prefers_longer(n, body)

    with FakeChatServer(flaky) as server:
        j = OpenAIJudge(server.url, "j", backoff=0.01).judge(Match("p", "a", "b"), "q", "xx", "x")
    assert j.winner == "a" and len(server.requests) == 3

    # A 429's Retry-After beats the (here huge) exponential backoff.
    def rate_limited(n, body):
        return (429, b"slow down", {"Retry-After": "0"}) if n == 0 else always_a(n, body)

    with FakeChatServer(rate_limited) as server:
        start = time.monotonic()
        assert OpenAIJudge(server.url, "j", backoff=30).verdict("q", "a", "b") == "a"
    assert len(server.requests) == 2 and time.monotonic() - start < 10

    with FakeChatServer(lambda n, body: (401, b'{"error": "bad key"}')) as server:
        with pytest.raises(JudgeError, match=r"answered HTTP 401: .*bad key"):
            OpenAIJudge(server.url, "j", backoff=0.01).verdict("q", "a", "b")
    assert len(server.requests) == 1

    with FakeChatServer(lambda n, body: (503, b"busy")) as server:
        with pytest.raises(JudgeError, match=r"failed after 3 attempt\(s\); last error: HTTP 503"):
            OpenAIJudge(server.url, "j", max_retries=2, backoff=0.01).verdict("q", "a", "b")
    assert len(server.requests) == 3

    with FakeChatServer(lambda n, body: (200, b"<html>proxy error</html>")) as server:
        with pytest.raises(JudgeError, match=r"no chat completion"):
            OpenAIJudge(server.url, "j", backoff=0.01).verdict("q", "a", "b")

    with FakeChatServer(lambda n, body: (200, "I cannot decide.")) as server:
        j = OpenAIJudge(server.url, "j", backoff=0.01).judge(Match("p", "a", "b"), "q", "x", "y")
    assert (j.winner, j.detail) == ("tie", {"ab": "?", "ba": "?"})

    with pytest.raises(ValueError, match="judge URL must be http"):
        OpenAIJudge("ftp://example/v1", "j")


# --------------------------------------------------------------------------- CLI

def oriented_verdicts(path: Path, gens) -> None:
    """A verdict file where the model with the higher level wins (one verdict per pair)."""
    with path.open("w") as f:
        for pid in sorted(gens.prompts):
            for a, b in itertools.combinations(sorted(LEVELS), 2):
                w = "a" if LEVELS[a] > LEVELS[b] else "b"
                f.write(json.dumps({"prompt_id": pid, "model_a": a, "model_b": b,
                                    "winner": w}) + "\n")


def test_cli_with_judgments_file_end_to_end(tmp_path, oa_records, capsys):
    """Generations of 3 models on real prompts + a verdict file: the CLI prints the table and
    writes JSON, table, PNG and judgments; re-scoring its judgments.jsonl gives the same JSON."""
    paths = write_generations(tmp_path, oa_records)
    verdicts = tmp_path / "verdicts.jsonl"
    oriented_verdicts(verdicts, load_generations(paths))
    out = tmp_path / "out"
    args = ["--generations", *map(str, paths), "--permutations", "300", "--seed", "1"]
    assert elo.main([*args, "--judgments", str(verdicts), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rank  model" in printed and "95% CI" in printed and "W / T / L" in printed
    report = json.loads((out / "elo.json").read_text())
    assert [r["model"] for r in report["ratings"]] == ["long", "medium", "short"]
    assert report["ratings"][0]["wins"] == 10 and report["ratings"][2]["losses"] == 10
    assert report["num_matches"] == 15 and report["permutations"] == 300
    assert (out / "elo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "elo.txt").read_text().startswith("rank")
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 15

    again = tmp_path / "again"
    assert elo.main([*args, "--judgments", str(out / "judgments.jsonl"), "--out", str(again)]) == 0
    assert json.loads((again / "elo.json").read_text())["ratings"] == report["ratings"]
    # Without --generations the verdicts in the file are scored as they are.
    alone = tmp_path / "alone"
    assert elo.main(["--judgments", str(verdicts), "--permutations", "300", "--seed", "1",
                     "--out", str(alone)]) == 0
    assert json.loads((alone / "elo.json").read_text())["ratings"] == report["ratings"]


def test_cli_with_fake_llm_judge(tmp_path, oa_records):
    """With --judge-url the CLI asks a local OpenAI-compatible endpoint both orders of every
    match and recovers the judge's preference order; the judgments it saves record both orders."""
    paths = write_generations(tmp_path, oa_records)
    out = tmp_path / "out"
    with FakeChatServer(prefers_longer) as server:
        code = elo.main(["--generations", *map(str, paths), "--judge-url", server.url,
                         "--judge-model", "fake-gpt-4", "--judge-workers", "2",
                         "--permutations", "200", "--out", str(out)])
    assert code == 0
    assert len(server.requests) == 2 * 15
    report = json.loads((out / "elo.json").read_text())
    assert [r["model"] for r in report["ratings"]] == ["long", "medium", "short"]
    assert report["judge"] == {"type": "openai", "url": server.url + "/chat/completions",
                               "model": "fake-gpt-4", "temperature": 0.0}
    saved = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert all(set(s["detail"]) == {"ab", "ba"} and s["winner"] != "tie" for s in saved)
    # Re-scoring the saved verdicts in place leaves them (and their detail) untouched.
    before = (out / "judgments.jsonl").read_text()
    assert elo.main(["--generations", *map(str, paths), "--judgments", str(out / "judgments.jsonl"),
                     "--permutations", "200", "--out", str(out)]) == 0
    assert (out / "judgments.jsonl").read_text() == before
    assert json.loads((out / "elo.json").read_text())["ratings"] == report["ratings"]
    # The judge saw the question without the Guanaco framing.
    first_user = server.requests[0]["body"]["messages"][1]["content"]
    assert "### Human:" not in first_user and "### Assistant:" not in first_user


def test_cli_resume_after_judge_failure(tmp_path, oa_records, capsys):
    """A judge failing mid-run leaves the verdicts so far in judgments.jsonl; --resume judges only
    the rest and gives the same ratings as an uninterrupted run; without --resume the saved
    verdicts are never overwritten."""
    paths = write_generations(tmp_path, oa_records)
    common = ["--generations", *map(str, paths), "--judge-model", "j", "--judge-workers", "1",
              "--judge-retries", "0", "--permutations", "200"]

    def dies_after_10(n, body):
        return prefers_longer(n, body) if n < 10 else (401, b"key revoked")

    out = tmp_path / "out"
    with FakeChatServer(dies_after_10) as server:
        assert elo.main([*common, "--judge-url", server.url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401: key revoked" in err and "--resume" in err
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 5  # 2 requests a match

    with FakeChatServer(prefers_longer) as server:
        assert elo.main([*common, "--judge-url", server.url, "--out", str(out)]) == 2
        assert "already holds verdicts" in capsys.readouterr().err
        assert elo.main([*common, "--judge-url", server.url, "--out", str(out),
                         "--resume"]) == 0
    assert len(server.requests) == 2 * (15 - 5)
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 15
    full = tmp_path / "full"
    with FakeChatServer(prefers_longer) as server:
        assert elo.main([*common, "--judge-url", server.url, "--out", str(full)]) == 0
    assert (json.loads((out / "elo.json").read_text())["ratings"]
            == json.loads((full / "elo.json").read_text())["ratings"])


def test_cli_bad_inputs(tmp_path, oa_records, capsys):
    """Bad input exits with status 2 and a one-line error naming the problem."""
    paths = write_generations(tmp_path, oa_records)
    verdicts = tmp_path / "verdicts.jsonl"
    oriented_verdicts(verdicts, load_generations(paths))
    lines = verdicts.read_text().splitlines()
    verdicts.write_text("\n".join(lines[:-1]) + "\n")
    code = elo.main(["--generations", *map(str, paths), "--judgments", str(verdicts),
                     "--out", str(tmp_path / "o")])
    assert code == 2
    assert "has no verdict for 1 of 15 matches" in capsys.readouterr().err

    (tmp_path / "short.jsonl").write_text(paths[0].read_text().splitlines()[0] + "\n")
    code = elo.main(["--generations", *map(str, paths), "--judgments", str(verdicts)])
    assert code == 2
    assert "model 'short'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        elo.main(["--generations", str(paths[0]), "--judge-url", "http://127.0.0.1:9/v1"])
    assert "--judge-url needs --judge-model" in capsys.readouterr().err


def test_module_runs_as_script(tmp_path, oa_records):
    """`python -m qlora_jax.eval.elo` runs the tournament and prints the table."""
    paths = write_generations(tmp_path, oa_records)
    verdicts = tmp_path / "verdicts.jsonl"
    oriented_verdicts(verdicts, load_generations(paths))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_jax.eval.elo", "--generations", *map(str, paths),
         "--judgments", str(verdicts), "--permutations", "100", "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].split()[:2] == ["1", "long"]
