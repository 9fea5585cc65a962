"""Elo tournament between models' generations, judged pairwise (QLoRA §5.1, Appendix).

Each prompt is a match between every pair of models; a judge (a verdict file or an
OpenAI-compatible chat endpoint, see `qlora_jax.eval.judge`) says which answer is better or that
they tie. Elo uses K=32 from 1000 for everyone; because Elo depends on the order of the matches,
the ratings are computed for many random orders (the paper: 10,000) and reported as the mean and
the 2.5/97.5 percentiles over orders (the 95% interval of the ordering, as in the paper).

Generation files are JSONL, one record per model and prompt::

    {"id": "q17", "model": "guanaco-7b", "prompt": "### Human: Hi ### Assistant:", "output": "..."}

- ``prompt`` (or ``input``; ``prompt`` wins when both are there): the prompt as in the source
  data (Guanaco "### Human: ... ### Assistant:", before any chat template). Records with the
  same id must ask the same question; a system preamble before the first "### Human:" may differ.
- ``output`` (or ``completion``): the model's answer.
- ``model``: defaults to the file name without ``.jsonl``. A file may hold several models and a
  model may span files; every model must answer the same prompts.
- ``id`` (or ``question_id``, as in the shared OASST1 prompt file): defaults to a hash of the
  prompt text (``<hash>#2`` for a model's second answer to the same text: the OASST1 validation
  prompts repeat one), so files without ids still line up by prompt.

CLI::

    python -m qlora_jax.eval.elo --generations a.jsonl b.jsonl ... \\
        (--judgments FILE | --judge-url URL --judge-model NAME) \\
        [--permutations 10000] [--seed 0] [--out DIR]

prints the table and writes ``DIR/elo.json``, ``DIR/elo.txt``, ``DIR/elo.png`` and
``DIR/judgments.jsonl`` (re-score it later with ``--judgments``, without calling the judge). With
``--judge-url`` each verdict is appended to ``DIR/judgments.jsonl`` as it arrives; ``--resume``
continues an interrupted run from it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from qlora_jax.eval.judge import (
    FileJudge,
    Judge,
    JudgeError,
    Judgment,
    Match,
    OpenAIJudge,
    question_text,
    read_jsonl_objects,
)

__all__ = [
    "EloResult", "FileJudge", "Generations", "Judge", "JudgeError", "Judgment", "Match",
    "OpenAIJudge", "elo_ratings", "judge_matches", "load_generations", "main", "make_matches",
    "plot_ratings",
]


@dataclasses.dataclass(frozen=True)
class Generations:
    """Answers of several models to the same prompts.

    ``prompts`` maps prompt id -> prompt text; ``outputs`` maps model -> prompt id -> answer.
    """

    prompts: dict[str, str]
    outputs: dict[str, dict[str, str]]

    @property
    def models(self) -> list[str]:
        return sorted(self.outputs)


def prompt_id(prompt: str) -> str:
    """The default id of a prompt without one: 16 hex digits of its SHA-1."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def _pick(rec: dict[str, Any], keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if key in rec:
            if not isinstance(rec[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, "
                                 f"got {type(rec[key]).__name__}")
            return rec[key]
    raise ValueError(f"{where}: missing key {' or '.join(map(repr, keys))} "
                     f"(record keys: {sorted(rec)})")


def load_generations(paths: Sequence[str | Path]) -> Generations:
    """Reads generation JSONL files (schema in the module docstring) and checks they line up.

    Raises:
      ValueError naming the file, line and key for a missing file, bad JSON, a missing or
      non-string field, an answer given twice, one id used for two prompt texts, a model that
      skipped prompts others answered, or fewer than two models.
    """
    prompts: dict[str, str] = {}
    prompt_where: dict[str, str] = {}
    outputs: dict[str, dict[str, str]] = {}
    where_of: dict[tuple[str, str], str] = {}
    files_of: dict[str, set[str]] = {}
    seen: dict[tuple[str, str], int] = {}
    for path in map(Path, paths):
        default_model = path.name.removesuffix(".jsonl").removesuffix(".json")
        n = 0
        for where, rec in read_jsonl_objects(path, "generations file"):
            prompt = _pick(rec, ("prompt", "input"), where)
            output = _pick(rec, ("output", "completion"), where)
            model = rec.get("model", default_model)
            if not isinstance(model, str) or not model:
                raise ValueError(f"{where}: 'model' must be a non-empty string, got {model!r}")
            given = rec.get("id", rec.get("question_id"))
            if given is not None:
                pid = str(given)
            else:  # the n-th answer of a model to the same prompt text gets "<hash>#n"
                pid = prompt_id(prompt)
                seen[model, pid] = n_seen = seen.get((model, pid), 0) + 1
                if n_seen > 1:
                    pid = f"{pid}#{n_seen}"
            # Same question, framed differently (a system preamble), is the same prompt.
            if pid in prompts and question_text(prompts[pid]) != question_text(prompt):
                raise ValueError(f"{where}: id {pid!r} has a different prompt than at "
                                 f"{prompt_where[pid]}")
            prompts.setdefault(pid, prompt)
            prompt_where.setdefault(pid, where)
            if (model, pid) in where_of:
                raise ValueError(f"{where}: model {model!r} already answered prompt {pid!r} "
                                 f"at {where_of[model, pid]}")
            where_of[model, pid] = where
            outputs.setdefault(model, {})[pid] = output
            files_of.setdefault(model, set()).add(str(path))
            n += 1
        if n == 0:
            raise ValueError(f"{path}: no generations")
    if len(outputs) < 2:
        raise ValueError(f"a tournament needs at least two models, found {sorted(outputs)} "
                         f"in {[str(p) for p in paths]} (records without 'model' are named "
                         "after their file)")
    for model in sorted(outputs):
        missing = sorted(set(prompts) - set(outputs[model]))
        if missing:
            pid = missing[0]
            others = [m for m in sorted(outputs) if pid in outputs[m]]
            raise ValueError(
                f"model {model!r} (from {', '.join(sorted(files_of[model]))}) has no answer for "
                f"{len(missing)} prompt(s) that other models answered, e.g. id {pid!r} "
                f"({prompts[pid][:60]!r}, answered by {others[0]!r} at "
                f"{where_of[others[0], pid]}); "
                "prompts match by 'id' / 'question_id', else by a hash of the prompt text, so "
                "give every file the same kind of id")
    return Generations(prompts=prompts, outputs=outputs)


def make_matches(models: Iterable[str], prompts: Iterable[str], seed: int = 0) -> list[Match]:
    """Every pair of models on every prompt, which one is shown first drawn from ``seed``.

    The result depends only on the sets of models and prompts and the seed (not their order).
    """
    names = sorted(set(models))
    pids = sorted(set(prompts))
    if len(names) < 2:
        raise ValueError(f"need at least two models, got {names}")
    pairs = [(pid, a, b) for pid in pids for a, b in itertools.combinations(names, 2)]
    swap = np.random.default_rng(seed).random(len(pairs)) < 0.5
    return [Match(pid, b, a) if s else Match(pid, a, b) for (pid, a, b), s in zip(pairs, swap)]


@dataclasses.dataclass(frozen=True)
class EloResult:
    """Elo over random match orders, models sorted best first.

    ``mean``, ``low``, ``high``: the mean and 2.5/97.5 percentiles of each model's final rating
    over ``permutations`` orders; ``wins``/``ties``/``losses``: its match record.
    """

    models: list[str]
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    wins: np.ndarray
    ties: np.ndarray
    losses: np.ndarray
    k: float
    initial: float
    permutations: int
    seed: int
    num_matches: int

    def rating(self, model: str) -> float:
        return float(self.mean[self.models.index(model)])

    def rows(self) -> list[dict[str, Any]]:
        return [{"rank": i + 1, "model": m, "elo": float(self.mean[i]),
                 "ci_low": float(self.low[i]), "ci_high": float(self.high[i]),
                 "wins": int(self.wins[i]), "ties": int(self.ties[i]),
                 "losses": int(self.losses[i])} for i, m in enumerate(self.models)]

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "initial": self.initial, "permutations": self.permutations,
                "seed": self.seed, "num_matches": self.num_matches, "ratings": self.rows()}

    def table(self) -> str:
        """Rank, model, Elo mean, 95% interval over orders, wins/ties/losses."""
        head = ("rank", "model", "Elo", "95% CI", "W / T / L")
        body = [(str(r["rank"]), r["model"], f"{r['elo']:.0f}",
                 f"[{r['ci_low']:.0f}, {r['ci_high']:.0f}]",
                 f"{r['wins']} / {r['ties']} / {r['losses']}") for r in self.rows()]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        align = ["<", "<", ">", "<", ">"]
        return "\n".join("  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths)).rstrip()
                         for row in [head, *body])


def elo_ratings(judgments: Iterable[Judgment], k: float = 32.0, initial: float = 1000.0,
                permutations: int = 10_000, seed: int = 0,
                models: Iterable[str] | None = None) -> EloResult:
    """Elo ratings averaged over ``permutations`` random orders of the matches.

    Each match updates ``R_a += k (S_a - E_a)``, ``R_b -= k (S_a - E_a)`` with
    ``E_a = 1 / (1 + 10^((R_b - R_a) / 400))`` and ``S_a`` 1 / 0.5 / 0 for a win / tie / loss.
    All orders are simulated at once with numpy (one vector step per match position). Matches
    are put in a canonical order before permuting, so the result depends only on the multiset of
    matches and ``seed``, not on the input order or on which model is listed first.

    Args:
      judgments: the judged matches.
      models: extra models to rate (they keep ``initial`` if they played no match).
    """
    judgments = list(judgments)
    if permutations < 1:
        raise ValueError(f"{permutations=} must be >= 1")
    names = sorted(set(models or ()) | {m for j in judgments for m in (j.model_a, j.model_b)})
    index = {m: i for i, m in enumerate(names)}
    canon = []
    for j in judgments:
        a, b, s = index[j.model_a], index[j.model_b], j.score_a
        canon.append((a, b, s) if a < b else (b, a, 1.0 - s))
    canon.sort()
    n, m = len(canon), len(names)
    first = np.array([c[0] for c in canon], np.int64)
    second = np.array([c[1] for c in canon], np.int64)
    score = np.array([c[2] for c in canon], np.float64)

    ratings = np.full((permutations, m), float(initial))
    rng = np.random.default_rng(seed)
    # Orders are simulated in chunks of c orders; the (n, c) table of match indices is capped at
    # 2^24 entries (64 MiB) so large tournaments fit in memory while each step stays wide.
    chunk = max(1, min(permutations, (1 << 24) // max(n, 1)))
    scale = np.log(10.0) / 400.0
    for start in range(0, permutations if n else 0, chunk):
        c = min(chunk, permutations - start)
        order = rng.permuted(np.tile(np.arange(n, dtype=np.int32), (c, 1)), axis=1)
        order = np.ascontiguousarray(order.T)  # (n, c): the match each order plays at step t
        offset = np.arange(c) * m
        r = ratings[start:start + c].reshape(-1)  # (c * m,) view: one row of ratings per order
        for t in range(n):
            o = order[t]
            ia, ib = first[o] + offset, second[o] + offset
            ra, rb = r[ia], r[ib]
            delta = k * (score[o] - 1.0 / (1.0 + np.exp((rb - ra) * scale)))
            r[ia] = ra + delta
            r[ib] = rb - delta
    mean = ratings.mean(axis=0)
    low, high = np.percentile(ratings, [2.5, 97.5], axis=0)

    wins, ties, losses = np.zeros(m, int), np.zeros(m, int), np.zeros(m, int)
    for a, b, s in canon:
        if s == 0.5:
            ties[[a, b]] += 1
        else:
            wins[a if s > 0.5 else b] += 1
            losses[b if s > 0.5 else a] += 1
    rank = sorted(range(m), key=lambda i: (-mean[i], names[i]))
    return EloResult(models=[names[i] for i in rank], mean=mean[rank], low=low[rank],
                     high=high[rank], wins=wins[rank], ties=ties[rank], losses=losses[rank],
                     k=float(k), initial=float(initial), permutations=int(permutations),
                     seed=int(seed), num_matches=n)


def judge_matches(judge: Judge, matches: Sequence[Match], generations: Generations,
                  workers: int = 1, progress: bool = False,
                  on_result: Callable[[Judgment], None] | None = None) -> list[Judgment]:
    """Judges every match (in ``workers`` threads for a remote judge), results in match order.

    ``on_result`` sees each judgment as it completes (to save it at once). On the first error
    the matches not yet started are cancelled and the error is raised.
    """

    def one(match: Match) -> Judgment:
        return judge.judge(match, question_text(generations.prompts[match.prompt_id]),
                           generations.outputs[match.model_a][match.prompt_id],
                           generations.outputs[match.model_b][match.prompt_id])

    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
    try:
        futures = {pool.submit(one, m): i for i, m in enumerate(matches)}
        done = concurrent.futures.as_completed(futures)
        if progress:
            from tqdm import tqdm

            done = tqdm(done, total=len(futures), desc="judging", file=sys.stderr)
        results: list[Judgment | None] = [None] * len(matches)
        for future in done:
            results[futures[future]] = judgment = future.result()
            if on_result is not None:
                on_result(judgment)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results  # type: ignore[return-value]


def plot_ratings(result: EloResult, path: str | Path, title: str | None = None) -> None:
    """Saves a PNG: each model's mean Elo with its 95% interval as error bars, best on top."""
    # An Agg canvas of its own: no pyplot, so the caller's backend and figures are untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = np.arange(len(result.models))[::-1]
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(result.models)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.errorbar(result.mean, y, xerr=[result.mean - result.low, result.high - result.mean],
                fmt="o", capsize=4)
    ax.axvline(result.initial, color="0.7", lw=1, ls="--")
    ax.set_yticks(y, result.models)
    ax.set_ylim(-0.7, len(result.models) - 0.3)
    ax.set_xlabel(f"Elo (K={result.k:g}, mean and 95% interval over "
                  f"{result.permutations:,} match orders)")
    ax.set_title(title or f"Elo tournament, {result.num_matches} matches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qlora_jax.eval.elo", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generations", nargs="+", metavar="JSONL",
                   help="generation files (optional with --judgments: then the file's verdicts "
                        "are scored as they are)")
    judge = p.add_mutually_exclusive_group(required=True)
    judge.add_argument("--judgments", metavar="JSONL", help="verdict file to score")
    judge.add_argument("--judge-url", metavar="URL",
                       help="OpenAI-compatible API root, e.g. http://host:8000/v1")
    p.add_argument("--judge-model", metavar="NAME", help="judge model name (with --judge-url)")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the judge's API key, if set "
                        "(default OPENAI_API_KEY)")
    p.add_argument("--judge-workers", type=int, default=4, help="parallel judge requests")
    p.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--judge-retries", type=int, default=5, help="retries on 429/5xx")
    p.add_argument("--resume", action="store_true",
                   help="with --judge-url: keep the verdicts already in DIR/judgments.jsonl and "
                        "judge only the matches it lacks")
    p.add_argument("--permutations", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=float, default=32.0)
    p.add_argument("--initial", type=float, default=1000.0)
    p.add_argument("--out", default="runs/elo", metavar="DIR",
                   help="output directory (default runs/elo)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for bad input or a failing judge)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.judge_url and not args.judge_model:
        parser.error("--judge-url needs --judge-model")
    if args.judge_url and not args.generations:
        parser.error("--judge-url needs --generations")
    if args.resume and not args.judge_url:
        parser.error("--resume goes with --judge-url")
    out = Path(args.out)
    saved = out / "judgments.jsonl"
    try:
        if args.judgments:
            judge: Judge = FileJudge(args.judgments)
            judge_info: dict[str, Any] = {"type": "file", "path": str(args.judgments)}
        else:
            judge = OpenAIJudge(args.judge_url, args.judge_model,
                                api_key=os.environ.get(args.judge_api_key_env) or None,
                                timeout=args.judge_timeout, max_retries=args.judge_retries)
            judge_info = judge.describe()
        if not args.generations:
            judgments = judge.judgments()
        else:
            gens = load_generations(args.generations)
            matches = make_matches(gens.models, gens.prompts, seed=args.seed)
            if isinstance(judge, FileJudge):
                missing = [mt for mt in matches if not judge.has(mt)]
                if missing:
                    mt = missing[0]
                    raise ValueError(
                        f"{args.judgments} has no verdict for {len(missing)} of {len(matches)} "
                        f"matches, e.g. prompt {mt.prompt_id!r}: {mt.model_a!r} vs "
                        f"{mt.model_b!r} (leave out --generations to score only its verdicts)")
                judgments = judge_matches(judge, matches, gens)
            else:
                judgments = _judge_and_save(judge, matches, gens, saved, args)
        result = elo_ratings(judgments, k=args.k, initial=args.initial,
                             permutations=args.permutations, seed=args.seed)
    except (ValueError, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    if isinstance(judge, FileJudge) and not (saved.exists() and saved.samefile(args.judgments)):
        with saved.open("w", encoding="utf-8") as f:
            for j in judgments:
                f.write(json.dumps(j.to_json(), ensure_ascii=False) + "\n")
    report = result.to_json() | {"judge": judge_info,
                                 "generations": [str(p) for p in args.generations or []]}
    (out / "elo.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    table = result.table()
    (out / "elo.txt").write_text(table + "\n", encoding="utf-8")
    plot_ratings(result, out / "elo.png")
    print(table)
    print(f"\n{result.num_matches} matches, {result.permutations:,} orders, seed {result.seed}; "
          f"wrote {out}/elo.json, elo.txt, elo.png, judgments.jsonl")
    return 0


def _judge_and_save(judge: Judge, matches: list[Match], gens: Generations, saved: Path,
                    args: argparse.Namespace) -> list[Judgment]:
    """Judges the matches, appending each judgment to ``saved`` as it comes (a failed run can be
    continued with --resume, which reuses the verdicts already there)."""
    reused: list[Judgment] = []
    if not args.resume and saved.exists() and saved.stat().st_size:
        raise ValueError(f"{saved} already holds verdicts: pass --resume to keep them and judge "
                         "only the missing matches, or choose another --out")
    if args.resume and saved.exists() and saved.stat().st_size:
        previous = FileJudge(saved)
        reused = [previous.judge(m) for m in matches if previous.has(m)]
        matches = [m for m in matches if not previous.has(m)]
        print(f"resuming: {len(reused)} verdicts from {saved}, {len(matches)} matches to judge",
              file=sys.stderr)
    saved.parent.mkdir(parents=True, exist_ok=True)
    with saved.open("a" if args.resume else "w", encoding="utf-8") as f:

        def save(j: Judgment) -> None:
            f.write(json.dumps(j.to_json(), ensure_ascii=False) + "\n")
            f.flush()

        try:
            new = judge_matches(judge, matches, gens, workers=args.judge_workers, progress=True,
                                on_result=save)
        except JudgeError as e:
            raise JudgeError(f"{e}\n(the verdicts so far are in {saved}: rerun the same "
                             "command with --resume to judge only the rest)") from None
    return reused + new


if __name__ == "__main__":
    sys.exit(main())
