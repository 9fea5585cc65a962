"""MMLU accuracy the way the original QLoRA measures it (``MMLUEvalCallback`` in qlora.py).

Procedure: each question becomes a prompt in Hendrycks' format ending in ``"Answer:"``; the
model reads ``[BOS] + prompt`` and the prediction is the argmax, over the four answer-letter
tokens only, of the logits at the last prompt position. Accuracy is computed per subject and
reported as the mean over subjects (the original's ``mmlu_<split>_accuracy``); the accuracy over
all questions is reported too.

Prompts (Hendrycks' ``evaluate.py``; note the two spaces after "about", as in the original)::

    The following are multiple choice questions (with answers) about  high school physics.\\n\\n
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {X}\\n\\n     (x5 dev exemplars, five-shot only)
    {question}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:

Data: zero-shot reads ``zero_shot_mmlu_val.jsonl`` (``{subject, input, output}``, the file the
original training loop used; split "val"); five-shot builds prompts from the Hendrycks CSVs
``hendrycks/{dev,<split>}/<subject>_<split>.csv`` (split "test" by default: ``dev`` holds the
exemplars). ``--hub-id cais/mmlu`` reads the same splits from the Hugging Face hub instead.

Answer tokens: the original takes ``tokenizer("A", add_special_tokens=False).input_ids[0]``,
which for its (sentencepiece) LLaMA tokenizer is ``"▁A"``: the letter as it follows
"Answer:" in "Answer: A". ``answer_style="space"`` (default) picks exactly that token for any
tokenizer -- the one token that " A" adds after "Answer:" -- so it equals the original's ids on
LLaMA and gives byte-level BPE tokenizers (SmolLM2, GPT-2 style) "ĠA" rather than the bare "A"
the original's recipe would pick there. ``"bare"`` scores "A" right after "Answer:" (for
vocabularies without a " A" token, e.g. stories260K's 512 pieces). A letter that is not
exactly one token raises ``ValueError``.

Batching: prompts are sorted by length and batched longest first, right-padded to a few bucket
lengths (powers of two and 1.5x powers of two) so the jitted scorer compiles once per bucket;
prompts longer than the context (``max_length``, default the model's
``max_position_embeddings``) keep BOS and lose tokens from the left, and are counted.
On a mesh (``MMLUEvaluator(...)(model, mesh=)``, the training loop's sharded model, several processes
allowed) each batch's rows are split over the mesh's devices like a training batch (``batch_size``
must be a multiple of the device count) and every process reads back all scores.

CLI::

    python -m qlora_jax.eval.mmlu --model DIR [--adapter DIR] --shots 0|5 [--subjects a,b]
        [--limit-per-subject N] [--data-dir DIR | --hub-id cais/mmlu] [--batch-size 8] [--json OUT]

``--model`` is a converted model directory, or an HF directory / GGUF file / hub id converted
once into ``--convert-dir`` (default ``~/.cache/qlora_jax/mmlu``; NF4 + double quantization
unless ``--no-quantize``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlora_jax.sharding import batch_sharding, check_batch, host_values, put_global, replicated, tracing_mesh

LETTERS = ("A", "B", "C", "D")
ANSWER_STYLES = {"space": " {}", "bare": "{}"}
ZERO_SHOT_FILE = "zero_shot_mmlu_val.jsonl"
HENDRYCKS_DIR = "hendrycks"


@dataclasses.dataclass(frozen=True)
class Question:
    """One MMLU item: its subject, the full prompt (ending in "Answer:") and the answer index 0-3."""

    subject: str
    prompt: str
    answer: int


# --- prompts ---------------------------------------------------------------------------------------


def format_subject(subject: str) -> str:
    """Hendrycks' ``format_subject``: ``"high_school_physics" -> " high school physics"`` (leading space)."""
    return "".join(" " + word for word in subject.split("_"))


def prompt_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def format_example(question: str, choices: Sequence[str], answer: int | None = None) -> str:
    """``question\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` plus `` X\\n\\n`` when ``answer`` is given."""
    if len(choices) != len(LETTERS):
        raise ValueError(f"an MMLU question needs {len(LETTERS)} choices, got {len(choices)}: {question[:60]!r}")
    text = question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices)) + "\nAnswer:"
    return text if answer is None else f"{text} {LETTERS[answer]}\n\n"


def build_prompt(subject: str, question: str, choices: Sequence[str],
                 exemplars: Sequence[tuple[str, Sequence[str], int]] = ()) -> str:
    """Hendrycks' k-shot prompt: header, ``(question, choices, answer)`` exemplars, then the question."""
    shots = "".join(format_example(q, c, a) for q, c, a in exemplars)
    return prompt_header(subject) + shots + format_example(question, choices)


# --- data ------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """``$QLORA_SHARED/data/mmlu``, else ``../shared/data/mmlu`` beside the checkout."""
    repo = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("QLORA_SHARED", repo.parent / "shared")) / "data" / "mmlu"


def _select(questions: list[Question], subjects: Sequence[str] | None, limit_per_subject: int) -> list[Question]:
    """Keep ``subjects`` (all if empty) and the first ``limit_per_subject`` questions of each (0: all)."""
    if subjects:
        known = {q.subject for q in questions}
        unknown = sorted(set(subjects) - known)
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; known: {', '.join(sorted(known))}")
        wanted = set(subjects)
        questions = [q for q in questions if q.subject in wanted]
    if limit_per_subject:
        seen: dict[str, int] = {}
        kept = []
        for q in questions:
            if seen.get(q.subject, 0) < limit_per_subject:
                kept.append(q)
                seen[q.subject] = seen.get(q.subject, 0) + 1
        questions = kept
    if not questions:
        raise ValueError("no MMLU questions selected")
    return questions


def _letter_index(letter: str, where: str) -> int:
    letter = letter.strip()
    if letter not in LETTERS:
        raise ValueError(f"{where}: answer {letter!r} is not one of {LETTERS}")
    return LETTERS.index(letter)


def load_zero_shot(path: str | Path, *, subjects: Sequence[str] | None = None,
                   limit_per_subject: int = 0) -> list[Question]:
    """The original's zero-shot file: JSON lines ``{subject, input, output}``, ``output`` the letter."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MMLU zero-shot file {path} does not exist (set --data-dir or QLORA_SHARED)")
    questions = []
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                questions.append(Question(row["subject"], row["input"], _letter_index(row["output"], f"{path}:{i}")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a {{subject, input, output}} record ({type(e).__name__}: {e})") from None
    return _select(questions, subjects, limit_per_subject)


def _read_csv(path: Path) -> list[tuple[str, list[str], int]]:
    """Rows of a Hendrycks CSV (header ``question,choice0..3,answer``) as ``(question, choices, answer)``."""
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:6]] != ["question", "choice0", "choice1", "choice2",
                                                                 "choice3", "answer"]:
            raise ValueError(f"{path}: expected the header question,choice0,choice1,choice2,choice3,answer; got {header}")
        rows = []
        for i, row in enumerate(reader, 2):
            if len(row) != 6:
                raise ValueError(f"{path}:{i}: {len(row)} columns, expected 6")
            a = row[5].strip()
            answer = int(a) if a.isdigit() else _letter_index(a, f"{path}:{i}")
            if not 0 <= answer < len(LETTERS):
                raise ValueError(f"{path}:{i}: answer {a!r} is not 0-3")
            rows.append((row[0], row[1:5], answer))
    return rows


def load_hendrycks(data_dir: str | Path, *, split: str = "test", shots: int = 5,
                   subjects: Sequence[str] | None = None, limit_per_subject: int = 0) -> list[Question]:
    """k-shot questions from ``data_dir/hendrycks/{dev,split}/<subject>_{split}.csv`` (exemplars: first ``shots`` dev rows)."""
    root = Path(data_dir) / HENDRYCKS_DIR
    split_dir = root / split
    files = sorted(split_dir.glob(f"*_{split}.csv"))
    if not files:
        raise FileNotFoundError(f"no MMLU CSVs {split_dir}/*_{split}.csv (set --data-dir or QLORA_SHARED)")
    by_subject = {f.name[: -len(f"_{split}.csv")]: f for f in files}
    if subjects:
        unknown = sorted(set(subjects) - set(by_subject))
        if unknown:
            raise ValueError(f"unknown MMLU subjects {unknown}; known: {', '.join(sorted(by_subject))}")
        by_subject = {s: by_subject[s] for s in sorted(set(subjects))}
    questions = []
    for subject, path in by_subject.items():
        exemplars: list[tuple[str, list[str], int]] = []
        if shots:
            dev = root / "dev" / f"{subject}_dev.csv"
            if not dev.is_file():
                raise FileNotFoundError(f"{dev} is missing: five-shot prompts take their exemplars from the dev split")
            exemplars = _read_csv(dev)[:shots]
            if len(exemplars) < shots:
                raise ValueError(f"{dev} has {len(exemplars)} rows, fewer than shots={shots}")
        rows = _read_csv(path)
        if limit_per_subject:
            rows = rows[:limit_per_subject]
        questions += [Question(subject, build_prompt(subject, q, c, exemplars), a) for q, c, a in rows]
    return _select(questions, None, 0)


def load_hub(hub_id: str, *, split: str, shots: int, subjects: Sequence[str] | None = None,
             limit_per_subject: int = 0) -> list[Question]:
    """The same prompts from a hub data set with ``cais/mmlu``'s columns (subject, question, choices, answer)."""
    from datasets import load_dataset

    hub_split = {"val": "validation", "eval": "validation"}.get(split, split)
    ds = load_dataset(hub_id, "all")
    dev: dict[str, list[tuple[str, list[str], int]]] = {}
    for row in ds["dev"]:
        dev.setdefault(row["subject"], []).append((row["question"], list(row["choices"]), int(row["answer"])))
    questions = [
        Question(row["subject"], build_prompt(row["subject"], row["question"], list(row["choices"]),
                                              dev.get(row["subject"], [])[:shots]), int(row["answer"]))
        for row in ds[hub_split]
    ]
    return _select(questions, subjects, limit_per_subject)


def load_questions(shots: int, *, data_dir: str | Path | None = None, hub_id: str | None = None,
                   split: str | None = None, subjects: Sequence[str] | None = None,
                   limit_per_subject: int = 0) -> list[Question]:
    """MMLU questions for ``shots`` 0 or 5 (splits: zero-shot "val", five-shot "test" by default)."""
    if shots not in (0, 5):
        raise ValueError(f"shots={shots}: MMLU is evaluated zero-shot (0) or five-shot (5)")
    split = split or ("val" if shots == 0 else "test")
    if hub_id:
        return load_hub(hub_id, split=split, shots=shots, subjects=subjects, limit_per_subject=limit_per_subject)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if shots == 0 and split in ("val", "eval"):
        return load_zero_shot(data_dir / ZERO_SHOT_FILE, subjects=subjects, limit_per_subject=limit_per_subject)
    return load_hendrycks(data_dir, split=split, shots=shots, subjects=subjects, limit_per_subject=limit_per_subject)


# --- tokens ----------------------------------------------------------------------------------------


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def answer_token_ids(tokenizer: Any, style: str = "space") -> list[int]:
    """The token ids of A, B, C, D as they follow "Answer:" (see the module docstring for ``style``)."""
    if style not in ANSWER_STYLES:
        raise ValueError(f"answer_style={style!r} is not one of {tuple(ANSWER_STYLES)}")
    texts = ["Answer:"] + ["Answer:" + ANSWER_STYLES[style].format(letter) for letter in LETTERS]
    base, *full = _encode(tokenizer, texts)
    ids = []
    for letter, toks in zip(LETTERS, full):
        added = toks[len(base):]
        if toks[: len(base)] != base or len(added) != 1:
            raise ValueError(
                f"answer_style={style!r}: {ANSWER_STYLES[style].format(letter)!r} after 'Answer:' is "
                f"{len(added)} tokens {added} for this tokenizer, not one; try the other answer style "
                f"({', '.join(s for s in ANSWER_STYLES if s != style)})"
            )
        ids.append(added[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer_style={style!r}: the letters share token ids {ids}")
    return ids


def encode_prompts(prompts: Sequence[str], tokenizer: Any, *, max_length: int,
                   bos_id: int | None = None) -> tuple[list[np.ndarray], int]:
    """``[BOS] + prompt`` ids, left-truncated to ``max_length`` (BOS kept); returns (ids, number truncated)."""
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2")
    prefix = [] if bos_id is None else [bos_id]
    room = max_length - len(prefix)
    out, truncated = [], 0
    for ids in _encode(tokenizer, list(prompts)):
        if len(ids) > room:
            ids, truncated = ids[len(ids) - room:], truncated + 1
        out.append(np.asarray(prefix + list(ids), np.int32))
    return out, truncated


def bucket(length: int, max_length: int, minimum: int = 16) -> int:
    """The padded length for ``length``: the smallest of 16, 24, 32, 48, 64, 96, ... that fits, at most ``max_length``."""
    b = minimum
    while b < length:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 2^k -> 1.5*2^k -> 2^(k+1)
    return min(b, max_length)


def make_batches(token_ids: Sequence[np.ndarray], batch_size: int, max_length: int,
                 pad_id: int = 0) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Longest-first batches of exactly ``batch_size`` rows, right-padded to a bucket length.

    Yields ``(indices, batch)``: ``indices`` the positions in ``token_ids`` of the real rows;
    ``batch`` has ``input_ids`` / ``attention_mask`` ``int32[B, T]`` and ``lengths`` ``int32[B]``.
    Filler rows of a final partial batch hold one pad token (length 1) and are not in ``indices``.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be > 0")
    lengths = np.array([len(t) for t in token_ids])
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = bucket(int(lengths[idx[0]]), max_length)
        ids = np.full((batch_size, T), pad_id, np.int32)
        mask = np.zeros((batch_size, T), np.int32)
        lens = np.ones(batch_size, np.int32)
        mask[:, 0] = 1
        for row, i in enumerate(idx):
            n = lengths[i]
            ids[row, :n], mask[row, :n], lens[row] = token_ids[i], 1, n
        yield idx, {"input_ids": ids, "attention_mask": mask, "lengths": lens}


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("mesh",))
def _score(graphdef: Any, state: Any, input_ids: jax.Array, attention_mask: jax.Array, lengths: jax.Array,
           letter_ids: jax.Array, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
    model = nnx.merge(graphdef, state)
    with tracing_mesh(mesh):
        logits = model(input_ids, attention_mask=attention_mask, deterministic=True)  # [B, T, V] fp32
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
    return last[:, letter_ids]


def score_letters(model: Any, batch: dict[str, np.ndarray], letter_ids: Sequence[int],
                  mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
    """fp32 ``[B, 4]``: the logits of the answer letters at each row's last real position.

    ``mesh``: the mesh the model's arrays are sharded over (several processes allowed: each passes the
    same batch, whose rows are split over the devices, and gets every row's scores)."""
    graphdef, state = nnx.split(model)
    rows = (batch["input_ids"], batch["attention_mask"], batch["lengths"])
    letters = np.asarray(letter_ids, np.int32)
    if mesh is None:
        inputs = jax.device_put((*rows, letters))
    else:
        check_batch(len(batch["input_ids"]), mesh, "the MMLU batch size")
        inputs = put_global((*rows, letters), (*[batch_sharding(mesh)] * len(rows), replicated(mesh)))
    return host_values(_score(graphdef, state, *inputs, mesh=mesh))


# --- evaluation ------------------------------------------------------------------------------------


def summarize(subjects: Sequence[str], answers: Sequence[int], predictions: Sequence[int]) -> dict[str, Any]:
    """Per-subject accuracy, their mean (the original's MMLU accuracy) and the accuracy over all questions."""
    per: dict[str, list[bool]] = {}
    for s, a, p in zip(subjects, answers, predictions, strict=True):
        per.setdefault(s, []).append(a == p)
    per_subject = {s: float(np.mean(v)) for s, v in sorted(per.items())}
    return {
        "accuracy": float(np.mean(list(per_subject.values()))) if per_subject else float("nan"),
        "accuracy_micro": float(np.mean([a == p for a, p in zip(answers, predictions)])) if answers else float("nan"),
        "per_subject": per_subject,
        "subject_counts": {s: len(v) for s, v in sorted(per.items())},
        "n": len(answers),
    }


class MMLUEvaluator:
    """Questions tokenized once, scored on demand (the training loop calls it every N steps).

    Args:
      questions: from :func:`load_questions`.
      tokenizer: a ``transformers`` tokenizer (or ``tokenizers.Tokenizer``).
      max_length: the context; longer prompts are left-truncated (BOS kept) and counted.
      batch_size: rows per batch (the last batch is filled up, so shapes repeat).
      answer_style: "space" (" A", default) or "bare" ("A"); see the module docstring.
      add_bos: prepend the tokenizer's BOS id, as the original does.
    """

    def __init__(self, questions: Sequence[Question], tokenizer: Any, *, max_length: int, batch_size: int = 8,
                 answer_style: str = "space", add_bos: bool = True):
        if not questions:
            raise ValueError("no MMLU questions to evaluate")
        self.questions = list(questions)
        self.batch_size, self.max_length = batch_size, max_length
        self.letter_ids = answer_token_ids(tokenizer, answer_style)
        bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
        if add_bos and bos is None:
            raise ValueError("the tokenizer has no BOS token; pass add_bos=False (--no-bos)")
        self.token_ids, self.truncated = encode_prompts([q.prompt for q in self.questions], tokenizer,
                                                        max_length=max_length, bos_id=bos)

    def __call__(self, model: Any, *, progress: bool = False, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
        """Score every question with ``model``; see :func:`evaluate_mmlu` for the result. ``mesh``: the
        mesh ``model``'s arrays are sharded over; with several processes every process calls this and
        gets the same result."""
        from tqdm import tqdm

        n = len(self.questions)
        logits = np.zeros((n, len(LETTERS)), np.float32)
        correct = done = 0
        t0 = time.perf_counter()
        with tqdm(total=n, unit="q", desc="MMLU", disable=not progress, dynamic_ncols=True) as bar:
            for idx, batch in make_batches(self.token_ids, self.batch_size, self.max_length):
                scores = score_letters(model, batch, self.letter_ids, mesh)[: len(idx)]
                logits[idx] = scores
                correct += int(sum(int(np.argmax(s)) == self.questions[i].answer for s, i in zip(scores, idx)))
                done += len(idx)
                bar.update(len(idx))
                bar.set_postfix(acc=f"{correct / done:.3f}", len=batch["input_ids"].shape[1], refresh=False)
        preds = [int(p) for p in np.argmax(logits, axis=-1)]  # first max on ties, as torch.argmax
        result = summarize([q.subject for q in self.questions], [q.answer for q in self.questions], preds)
        result.update(truncated=self.truncated, predictions=preds, letter_logits=logits,
                      seconds=time.perf_counter() - t0)
        return result


def evaluate_mmlu(model: Any, tokenizer: Any, questions: Sequence[Question], batch_size: int = 8, *,
                  max_length: int | None = None, answer_style: str = "space", add_bos: bool = True,
                  progress: bool = False) -> dict[str, Any]:
    """MMLU accuracy of a :class:`~qlora_jax.models.llama.Llama`.

    Returns ``{"accuracy": mean over subjects, "accuracy_micro", "per_subject": {subject: acc},
    "subject_counts", "n", "truncated": prompts cut to the context, "predictions": [0-3 per
    question, in order], "letter_logits": float32[n, 4], "seconds"}``.
    """
    max_length = max_length or model.cfg.max_position_embeddings
    evaluator = MMLUEvaluator(questions, tokenizer, max_length=max_length, batch_size=batch_size,
                              answer_style=answer_style, add_bos=add_bos)
    return evaluator(model, progress=progress)


def format_table(result: dict[str, Any]) -> str:
    """A per-subject table, then the mean over subjects and the accuracy over all questions."""
    width = max([len(s) for s in result["per_subject"]] + [len("mean over subjects")])
    lines = [f"{'subject':<{width}}  {'n':>5}  {'acc':>6}"]
    for s, acc in result["per_subject"].items():
        lines.append(f"{s:<{width}}  {result['subject_counts'][s]:>5}  {acc:>6.3f}")
    lines.append("-" * (width + 15))
    lines.append(f"{'mean over subjects':<{width}}  {result['n']:>5}  {result['accuracy']:>6.3f}")
    lines.append(f"{'all questions':<{width}}  {result['n']:>5}  {result['accuracy_micro']:>6.3f}")
    lines.append(f"prompts truncated to the context: {result['truncated']}")
    return "\n".join(lines)


# --- CLI -------------------------------------------------------------------------------------------


def resolve_model_dir(src: str, convert_dir: str | None, *, quantize: bool = True, param_dtype: str = "bfloat16") -> Path:
    """``src`` if it is a converted model directory, else a cached conversion of it (HF dir, GGUF, hub id)."""
    from qlora_jax.convert import convert
    from qlora_jax.models.checkpoint import META_FILE
    from qlora_jax.models.llama import QuantConfig

    if (Path(src) / META_FILE).is_file():
        return Path(src)
    quant = QuantConfig(quantize=quantize, param_dtype=param_dtype)
    if convert_dir:
        target = Path(convert_dir)
    else:
        p = Path(src)
        stamp = f"{p.resolve()}:{p.stat().st_mtime_ns}" if p.exists() else src
        key = hashlib.sha1(f"{stamp}|{dataclasses.asdict(quant)}".encode()).hexdigest()[:12]
        target = Path.home() / ".cache" / "qlora_jax" / "mmlu" / f"{p.stem or 'model'}-{key}"
    if not (target / META_FILE).is_file():
        print(f"converting {src} -> {target}", file=sys.stderr, flush=True)
        convert(src, target, quant=quant)
    return target


def load_for_eval(model_dir: Path, adapter: str | None, compute_dtype: str | None) -> Any:
    """The converted model, with a PEFT adapter (any rank / targets) applied if given."""
    from qlora_jax.models.checkpoint import load_model
    from qlora_jax.models.llama import LoRAConfig
    from qlora_jax.peft_io import load_adapter

    model = load_model(model_dir, lora=LoRAConfig(targets=()), compute_dtype=compute_dtype)
    return model if not adapter else load_adapter(model, adapter)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qlora_jax.eval.mmlu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="converted model dir, or HF dir / .gguf / hub id (converted once)")
    ap.add_argument("--adapter", help="a PEFT LoRA adapter directory to apply")
    ap.add_argument("--shots", type=int, default=0, choices=(0, 5))
    ap.add_argument("--split", help="val (zero-shot default) or test (five-shot default)")
    ap.add_argument("--subjects", default="", help="comma-separated subjects (default: all 57)")
    ap.add_argument("--limit-per-subject", type=int, default=0, help="first N questions of each subject (0: all)")
    ap.add_argument("--data-dir", help=f"holds {ZERO_SHOT_FILE} and {HENDRYCKS_DIR}/ (default: {default_data_dir()})")
    ap.add_argument("--hub-id", help="read MMLU from the hub instead, e.g. cais/mmlu (needs network)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=0, help="context for prompts (0: the model's max_position_embeddings)")
    ap.add_argument("--answer-style", default="space", choices=tuple(ANSWER_STYLES),
                    help='score " A" (space, default) or "A" (bare) after "Answer:"')
    ap.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    ap.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"), help="override the model's")
    ap.add_argument("--no-quantize", action="store_true", help="on-the-fly conversion keeps float weights")
    ap.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="weight dtype of an on-the-fly conversion (embeddings, norms; linears too with --no-quantize)")
    ap.add_argument("--convert-dir", help="where an on-the-fly conversion goes (default: ~/.cache/qlora_jax/mmlu/...)")
    ap.add_argument("--json", type=Path, help="write the result (with per-question predictions) here")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the per-subject table; exit status 2 on bad input."""
    args = _parser().parse_args(argv)
    from transformers import AutoTokenizer

    try:
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
        questions = load_questions(args.shots, data_dir=args.data_dir, hub_id=args.hub_id, split=args.split,
                                   subjects=subjects, limit_per_subject=args.limit_per_subject)
        model_dir = resolve_model_dir(args.model, args.convert_dir, quantize=not args.no_quantize,
                                      param_dtype=args.param_dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except (OSError, ValueError) as e:
            raise ValueError(f"{model_dir}: no usable tokenizer files beside the model ({e})") from None
        model = load_for_eval(model_dir, args.adapter, args.compute_dtype)
        result = evaluate_mmlu(model, tokenizer, questions, args.batch_size, max_length=args.max_length or None,
                               answer_style=args.answer_style, add_bos=not args.no_bos, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"{result['n']} questions in {result['seconds']:.1f} s")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "quiet")}
        record = {k: v for k, v in result.items() if k not in ("predictions", "letter_logits")}
        record["settings"] = settings | {"model_dir": str(model_dir)}
        record["questions"] = [
            {"subject": q.subject, "answer": LETTERS[q.answer], "prediction": LETTERS[p],
             "logits": [round(float(x), 5) for x in lg]}
            for q, p, lg in zip(questions, result["predictions"], result["letter_logits"])
        ]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
