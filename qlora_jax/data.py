"""Instruction-tuning data as the original QLoRA builds it: formats, tokenization, batches.

Pipeline (each step a small pure function; :func:`make_data` chains them from a config)::

    load_records(source, format)      -> [{"input": str, "output": str}, ...]
    train_eval_split(examples, size)  -> train, eval
    tokenize_examples(examples, tok)  -> [{"input_ids": int32[L], "labels": int32[L]}, ...]
    BatchIterator(tokenized, B)       -> {"input_ids", "labels", "attention_mask"}: int32[B, T]

Token layout (QLoRA's ``DataCollatorForCausalLM``): ``[BOS] + input`` truncated to
``source_max_len`` tokens, then ``output + [EOS]`` truncated to ``target_max_len``; labels
are the same ids with the source replaced by ``IGNORE_INDEX`` (-100) unless
``train_on_source``. Labels are aligned with ``input_ids`` (the loss shifts them). Texts are
tokenized without special tokens and BOS/EOS are added as ids, which is what the original's
slow LLaMA tokenizer does with its ``"<s>" + input`` / ``output + "</s>"`` strings.

Batches are right-padded to a bucket length (a multiple of ``pad_to_multiple``, at most the
longest possible example) so a jitted step compiles once per bucket.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IGNORE_INDEX = -100

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: "
)

Example = dict[str, str]
Record = Mapping[str, Any]


# ----------------------------------------------------------------------------- formats


def _field(record: Record, key: str, fmt: str, *, optional: bool = False) -> str:
    """``record[key]`` as a string, with an error naming the format and the record's keys."""
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise ValueError(f"{fmt!r} record is missing key {key!r} (record keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{fmt!r} record key {key!r} must be a string, got {type(value).__name__}")
    return value


def _alpaca(record: Record) -> Example:
    instruction = _field(record, "instruction", "alpaca")
    inp = _field(record, "input", "alpaca", optional=True)
    template = ALPACA_PROMPT_INPUT if inp != "" else ALPACA_PROMPT_NO_INPUT
    return {"input": template.format(instruction=instruction, input=inp),
            "output": _field(record, "output", "alpaca")}


def _chip2(record: Record) -> Example:
    text = _field(record, "text", "chip2")
    human, sep, bot = text.partition("\n<bot>: ")
    if not sep:
        raise ValueError(f"'chip2' record text has no '\\n<bot>: ' turn: {text[:80]!r}")
    # The original takes the second '<bot>:' piece only; chip2 records have exactly one.
    return {"input": human.replace("<human>: ", ""), "output": bot.split("\n<bot>: ")[0]}


def _self_instruct(record: Record) -> Example:
    return {"input": _field(record, "prompt", "self-instruct"),
            "output": _field(record, "completion", "self-instruct")}


def _hh_rlhf(record: Record) -> Example:
    return {"input": "", "output": _field(record, "chosen", "hh-rlhf")}


def _oasst1(record: Record) -> Example:
    return {"input": "", "output": _field(record, "text", "oasst1")}


def _input_output(name: str) -> Callable[[Record], Example]:
    def fn(record: Record) -> Example:
        return {"input": _field(record, "input", name, optional=True),
                "output": _field(record, "output", name)}
    return fn


def _expand_self_instruct_seed(records: list[Record]) -> list[Record]:
    """Self-instruct seed tasks ``{instruction, instances: [{input, output}]}`` -> prompt/completion.

    One record per instance, with the self-instruct repository's fixed (non-random) encoding
    ``instruction\\n\\n[input\\n\\n]``; the completion is the stripped output (its
    ``<|endoftext|>`` marker is left out: EOS is the tokenizer's). Hub records pass through.
    """
    out: list[Record] = []
    for record in records:
        if "instances" not in record or "prompt" in record:
            out.append(record)
            continue
        instruction = _field(record, "instruction", "self-instruct").strip()
        for instance in record["instances"] or []:
            inp = _field(instance, "input", "self-instruct", optional=True).strip()
            prompt = instruction + "\n\n" + (inp + "\n\n" if inp else "")
            out.append({"prompt": prompt,
                        "completion": _field(instance, "output", "self-instruct").strip()})
    return out


def _expand_oasst_trees(records: list[Record]) -> list[Record]:
    """OASST1 message trees / messages -> ``{"text": Guanaco conversation}``; Guanaco rows pass."""
    tree_rows = [r for r in records if "text" not in r or "message_id" in r or "prompt" in r]
    if not tree_rows:
        return records
    if len(tree_rows) != len(records):
        raise ValueError("'oasst1' data mixes Guanaco 'text' rows with OASST message rows")
    return [{"text": guanaco_conversation(path)} for path in oasst_top_ranked_paths(records)]


_HEADING_RULES = set("*=-")


def python_docs_records() -> list[Record]:
    """The help topics of the Python Language Reference that ship with Python itself
    (``pydoc_data.topics``), one record ``{"topic", "heading", "text"}`` per titled section:
    real reference text, available with no download at all."""
    from pydoc_data.topics import topics

    records: list[Record] = []
    for topic in sorted(topics):
        lines = topics[topic].splitlines()
        heads = [i for i in range(len(lines) - 1)
                 if lines[i].strip() and set(lines[i + 1].strip()) <= _HEADING_RULES
                 and len(lines[i + 1].strip()) >= max(3, len(lines[i].strip()) - 2)]
        for j, i in enumerate(heads):
            end = heads[j + 1] if j + 1 < len(heads) else len(lines)
            body = "\n".join(lines[i + 2:end]).strip()
            if len(body) >= 80:
                records.append({"topic": topic, "heading": lines[i].strip(), "text": body})
    return records


def _python_docs(record: Record) -> Example:
    heading = _field(record, "heading", "python-docs")
    if heading.startswith("The "):  # 'Explain the "assert" statement ...'
        heading = "the " + heading[4:]
    return {"input": f"### Human: Explain {heading} in Python. ### Assistant:",
            "output": " " + _field(record, "text", "python-docs")}


@dataclasses.dataclass(frozen=True)
class DatasetFormat:
    """A dataset format: record -> ``{"input", "output"}``, plus where its data comes from:
    a hub dataset, or a loader of data shipped with Python itself (``builtin``)."""

    name: str
    format_fn: Callable[[Record], Example]
    hub_id: str | None = None
    hub_kwargs: tuple[tuple[str, str], ...] = ()
    expand: Callable[[list[Record]], list[Record]] | None = None
    builtin: Callable[[], list[Record]] | None = None


FORMATS: dict[str, DatasetFormat] = {
    f.name: f
    for f in [
        DatasetFormat("alpaca", _alpaca, "tatsu-lab/alpaca"),
        DatasetFormat("alpaca-clean", _alpaca, "yahma/alpaca-cleaned"),
        DatasetFormat("chip2", _chip2, "laion/OIG", (("data_files", "unified_chip2.jsonl"),)),
        DatasetFormat("self-instruct", _self_instruct, "yizhongw/self_instruct",
                      (("name", "self_instruct"),), _expand_self_instruct_seed),
        DatasetFormat("hh-rlhf", _hh_rlhf, "Anthropic/hh-rlhf"),
        DatasetFormat("longform", _input_output("longform"), "akoksal/LongForm"),
        DatasetFormat("oasst1", _oasst1, "timdettmers/openassistant-guanaco",
                      expand=_expand_oasst_trees),
        DatasetFormat("input-output", _input_output("input-output")),
        DatasetFormat("python-docs", _python_docs, builtin=python_docs_records),
    ]
}


def _get_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown dataset format {name!r}; known formats: {sorted(FORMATS)}")
    return FORMATS[name]


def format_example(name: str, record: Record) -> Example:
    """One raw record of format ``name`` -> ``{"input": str, "output": str}``."""
    return _get_format(name).format_fn(record)


def format_records(name: str, records: Iterable[Record]) -> list[Example]:
    """Raw records -> examples; expands multi-example records (OASST trees, seed tasks) first."""
    fmt = _get_format(name)
    records = list(records)
    if fmt.expand is not None:
        records = fmt.expand(records)
    return [fmt.format_fn(r) for r in records]


# ----------------------------------------------------------------------------- OASST1


def _flatten_oasst(rows: Iterable[Record]) -> list[dict[str, Any]]:
    """Flat list of messages (with ``parent_id`` and ``_order``) from any OASST1 export layout."""
    flat: list[dict[str, Any]] = []

    def walk(message: Record, parent_id: str | None) -> None:
        msg = {k: v for k, v in message.items() if k != "replies"}
        msg["parent_id"] = parent_id
        flat.append(msg)
        for reply in message.get("replies") or []:
            walk(reply, message["message_id"])

    for row in rows:
        if isinstance(row.get("prompt"), Mapping):  # tree export: {message_tree_id, prompt}
            walk(row["prompt"], None)
        elif "replies" in row and row["replies"] is not None:  # nested message tree
            walk(row, row.get("parent_id"))
        else:  # flat message export
            if "message_id" not in row:
                raise ValueError(f"OASST1 row has no 'message_id' (keys: {sorted(row)})")
            flat.append(dict(row))
    for i, msg in enumerate(flat):
        msg["_order"] = i
    return flat


def oasst_top_ranked_paths(messages: Iterable[Record]) -> list[list[dict[str, Any]]]:
    """The highest-ranked conversation of each OASST1 tree (how Guanaco's data was made).

    Accepts the official export layouts: flat messages (``message_id``/``parent_id``), nested
    message trees (``replies``) or tree rows (``{message_tree_id, prompt}``). From each root
    prompt, repeatedly follow the reply with the best (lowest) ``rank``; unranked replies
    (OASST1 ranks assistant replies only) come after ranked ones; among equals, a reply that
    has an answer wins over one that has none, then export order. Deleted replies and
    replies that failed review are skipped. A trailing prompter turn without an answer is
    dropped; roots with no answer give no conversation.

    Returns:
      One list of messages (dicts with ``role`` "prompter"/"assistant" and ``text``) per tree
      with an answer, in root order.
    """
    flat = _flatten_oasst(messages)
    children: dict[str, list[dict[str, Any]]] = {}
    for msg in flat:
        if msg.get("parent_id") is not None:
            children.setdefault(msg["parent_id"], []).append(msg)

    def usable(msg: Mapping) -> bool:
        return not msg.get("deleted") and msg.get("review_result") is not False

    def key(msg: Mapping) -> tuple[bool, float, bool, int]:
        rank = msg.get("rank")
        answered = any(usable(m) for m in children.get(msg["message_id"], []))
        return (rank is None, 0 if rank is None else rank, not answered, msg["_order"])

    paths = []
    for root in (m for m in flat if m.get("parent_id") is None and usable(m)):
        path = [root]
        while replies := [m for m in children.get(path[-1]["message_id"], []) if usable(m)]:
            path.append(min(replies, key=key))
        if path[-1].get("role") == "prompter":
            path.pop()
        if len(path) >= 2:
            paths.append(path)
    return paths


_ROLES = {"prompter": "Human", "assistant": "Assistant"}


def guanaco_conversation(path: Sequence[Record], sep: str = " ") -> str:
    """``"### Human: {text} ### Assistant: {text} ### Human: ..."``: turns joined by ``sep``.

    The default matches QLoRA's Guanaco-format OASST1 validation prompts
    (``qlora_oa_questions.jsonl``). The hub's ``timdettmers/openassistant-guanaco`` text is
    reported to join turns with no space (``...{text}### Assistant: ...``): ``sep=""``.
    """
    turns = []
    for msg in path:
        role = msg.get("role")
        if role not in _ROLES:
            raise ValueError(f"OASST1 message role must be one of {sorted(_ROLES)}, got {role!r}")
        turns.append(f"### {_ROLES[role]}: {msg['text']}")
    return sep.join(turns)


# ----------------------------------------------------------------------------- loading

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv"}


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return (path.exists() or path.suffix.lower() in LOCAL_SUFFIXES
            or source.startswith(("/", "./", "../", "~")))


def _load_local(path: Path) -> list[dict[str, Any]]:
    import datasets

    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    builder = LOCAL_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"unsupported data file type {path.suffix!r} for {path}; "
                         f"use one of {sorted(LOCAL_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise ValueError(f"data file is empty: {path}")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets raises several types; keep the file in the message
        raise ValueError(f"could not read data file {path}: {e}") from e
    return ds.to_list()


def _load_hub(hub_id: str, split: str, kwargs: Mapping[str, str]) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=split, **kwargs)
    except Exception as e:
        raise ValueError(f"could not load hub dataset {hub_id!r} (split {split!r}): {e}") from e
    return ds.to_list()


def resolve_format(source: str, format: str | None = None) -> str:
    """The format name for ``source``: ``format`` if given, else the format named ``source``
    or whose hub id is ``source``; local files default to ``input-output`` (as the original)."""
    if format is not None:
        return _get_format(format).name
    if source in FORMATS:
        return source
    for fmt in FORMATS.values():
        if fmt.hub_id == source:
            return fmt.name
    if _is_local(source):
        return "input-output"
    raise ValueError(f"no dataset format given for {source!r}; pass one of {sorted(FORMATS)}")


def load_records(source: str, format: str | None = None, *, split: str = "train") -> list[Example]:
    """Load a data set and format it into ``{"input", "output"}`` examples.

    Args:
      source: a local ``.json``/``.jsonl``/``.csv``/``.tsv`` file (read with
        ``datasets.load_dataset("json"|"csv", data_files=...)``), a format name such as
        ``"alpaca"`` or ``"oasst1"`` (its original hub dataset), or any hub dataset id.
      format: the records' format (see ``FORMATS``); ``None`` infers it from ``source``.
      split: the hub split (local files have only ``"train"``).

    Raises:
      ValueError: missing or unreadable file, unknown format, a record missing a key, or
        an empty data set.
    """
    name = resolve_format(source, format)
    fmt = FORMATS[name]
    if _is_local(source):
        records = _load_local(Path(source).expanduser())
    elif source in FORMATS and fmt.builtin is not None:
        records = fmt.builtin()
    elif source in FORMATS:
        if fmt.hub_id is None:
            raise ValueError(f"format {source!r} has no hub dataset; give a local file")
        records = _load_hub(fmt.hub_id, split, dict(fmt.hub_kwargs))
    else:
        records = _load_hub(source, split, dict(fmt.hub_kwargs) if fmt.hub_id == source else {})
    try:
        examples = format_records(name, records)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    if not examples:
        raise ValueError(f"data set {source!r} (format {name!r}) has no examples")
    return examples


def train_eval_split(
    examples: Sequence[Any], eval_size: float | int, *, seed: int = 42
) -> tuple[list[Any], list[Any]]:
    """Seeded random split. ``eval_size``: a fraction in (0, 1) (rounded up), a count, or 0."""
    n = len(examples)
    if isinstance(eval_size, float) and 0 < eval_size < 1:
        n_eval = math.ceil(eval_size * n)
    elif isinstance(eval_size, int) and not isinstance(eval_size, bool) and eval_size >= 0:
        n_eval = eval_size
    else:
        raise ValueError(f"{eval_size=} must be a fraction in (0, 1) or a count >= 0")
    if n_eval >= n:
        raise ValueError(f"{eval_size=} leaves no training examples out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    eval_idx = np.sort(perm[:n_eval])
    train_idx = np.sort(perm[n_eval:])
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]


# ----------------------------------------------------------------------------- tokenization


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]  # transformers tokenizer


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    source_max_len: int,
    target_max_len: int,
    train_on_source: bool = False,
    bos_id: int | None = None,
    eos_id: int | None = None,
    chunk_size: int = 1024,
) -> list[dict[str, np.ndarray]]:
    """Tokenize examples into ``input_ids`` and ``labels`` (both ``int32[L]``).

    Args:
      tokenizer: a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``; texts are
        encoded without special tokens.
      source_max_len: most tokens of ``[BOS] + input`` (right-truncated).
      target_max_len: most tokens of ``output + [EOS]`` (right-truncated: a cut target has
        no EOS, as in the original).
      train_on_source: keep the source tokens in the labels.
      bos_id, eos_id: default to the tokenizer's ``bos_token_id`` / ``eos_token_id``.
    """
    if source_max_len <= 0 or target_max_len <= 0:
        raise ValueError(f"{source_max_len=} and {target_max_len=} must be > 0")
    bos_id = getattr(tokenizer, "bos_token_id", None) if bos_id is None else bos_id
    eos_id = getattr(tokenizer, "eos_token_id", None) if eos_id is None else eos_id
    if bos_id is None or eos_id is None:
        raise ValueError(f"the tokenizer has no BOS/EOS id ({bos_id=}, {eos_id=}); pass them")
    out = []
    for start in range(0, len(examples), chunk_size):
        chunk = examples[start : start + chunk_size]
        sources = _encode(tokenizer, [ex["input"] for ex in chunk])
        targets = _encode(tokenizer, [ex["output"] for ex in chunk])
        for src, tgt in zip(sources, targets):
            src = ([bos_id] + list(src))[:source_max_len]
            tgt = (list(tgt) + [eos_id])[:target_max_len]
            ids = np.asarray(src + tgt, dtype=np.int32)
            labels = ids.copy()
            if not train_on_source:
                labels[: len(src)] = IGNORE_INDEX
            out.append({"input_ids": ids, "labels": labels})
    return out


# ----------------------------------------------------------------------------- batching


def bucket_length(length: int, multiple: int, max_length: int | None = None) -> int:
    """``length`` rounded up to a multiple of ``multiple``, capped at ``max_length``."""
    padded = -(-length // multiple) * multiple
    return padded if max_length is None else max(length, min(padded, max_length))


def pad_batch(
    examples: Sequence[Mapping[str, np.ndarray] | None], length: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Right-pad tokenized examples into ``int32[len(examples), length]`` arrays.

    ``None`` entries become empty rows (all padding), which keeps a final partial batch at
    the fixed batch size. Padding has ``attention_mask`` 0 and label ``IGNORE_INDEX``.
    """
    b = len(examples)
    input_ids = np.full((b, length), pad_id, np.int32)
    labels = np.full((b, length), IGNORE_INDEX, np.int32)
    mask = np.zeros((b, length), np.int32)
    for row, ex in enumerate(examples):
        if ex is None:
            continue
        n = len(ex["input_ids"])
        if n > length:
            raise ValueError(f"example of {n} tokens does not fit a batch of length {length}")
        input_ids[row, :n] = ex["input_ids"]
        labels[row, :n] = ex["labels"]
        mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def length_grouped_order(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, mega_batch_mult: int = 50
) -> np.ndarray:
    """A random order in which batches hold examples of similar length (HF ``group_by_length``).

    A random permutation is cut into megabatches of ``m * batch_size`` examples
    (``m = min(n // (4 * batch_size), mega_batch_mult)``, at least 1), each sorted longest
    first; the longest example overall is swapped to the very front so that an
    out-of-memory batch shows up at the first step.
    """
    n = len(lengths)
    perm = rng.permutation(n)
    mult = max(1, min(n // (4 * batch_size), mega_batch_mult))
    size = mult * batch_size
    megas = []
    for start in range(0, n, size):
        mega = perm[start : start + size]
        megas.append(mega[np.argsort(-lengths[mega], kind="stable")])
    heads = [lengths[m[0]] for m in megas]
    longest = int(np.argmax(heads))
    megas[0][0], megas[longest][0] = megas[longest][0], megas[0][0]
    return np.concatenate(megas)


class BatchIterator:
    """Fixed-shape numpy batches over tokenized examples, resumable mid-epoch bit-exactly.

    The order of epoch ``e`` is a pure function of ``(seed, e)``; the iterator's whole
    state is ``{"seed", "epoch", "position"}`` (``position`` = batches already produced in
    the epoch) plus two sizes it checks on restore. Yields dicts of ``int32[batch_size, T]``
    ``input_ids`` / ``labels`` / ``attention_mask`` with ``T = bucket_length(longest in
    batch, pad_to_multiple, max_length)``.

    Args:
      examples: output of :func:`tokenize_examples`.
      batch_size: rows per batch.
      seed: shuffling seed.
      shuffle: random order per epoch (else dataset order; sorted longest first when
        ``group_by_length``).
      group_by_length: batch examples of similar length (see :func:`length_grouped_order`).
      drop_last: drop a final partial batch (else pad it with empty rows).
      pad_id: id written in padded positions.
      pad_to_multiple: bucket granularity of ``T``.
      max_length: cap of ``T`` (normally ``source_max_len + target_max_len``).
      num_epochs: stop after this many epochs (``None``: never).
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, np.ndarray]],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        drop_last: bool = True,
        pad_id: int = 0,
        pad_to_multiple: int = 64,
        max_length: int | None = None,
        num_epochs: int | None = None,
    ):
        if batch_size <= 0 or pad_to_multiple <= 0:
            raise ValueError(f"{batch_size=} and {pad_to_multiple=} must be > 0")
        self.examples = examples
        self.lengths = np.asarray([len(ex["input_ids"]) for ex in examples], np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.drop_last = drop_last
        self.pad_id = pad_id
        self.pad_to_multiple = pad_to_multiple
        self.max_length = max_length
        self.num_epochs = num_epochs
        self.epoch = 0
        self.position = 0
        # Several processes: the rows of each batch this process builds (qlora_jax.sharding.process_rows);
        # T is still the whole batch's bucket, so every process pads to the same length.
        self.rows: slice | None = None
        self.last_batch_tokens = 0  # real tokens of the whole last batch from __next__ (all rows)
        self._order_cache: tuple[int, np.ndarray] | None = None
        if len(self) == 0:
            raise ValueError(f"no batches: {len(examples)} examples, {batch_size=}, {drop_last=}")

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """``int64[len(self), batch_size]`` example indices of each batch (-1: padding row)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = len(self.examples)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            if self.group_by_length:
                order = length_grouped_order(self.lengths, self.batch_size, rng)
            else:
                order = rng.permutation(n)
        elif self.group_by_length:
            order = np.argsort(-self.lengths, kind="stable")
        else:
            order = np.arange(n)
        num = len(self)
        order = np.concatenate([order, np.full(num * self.batch_size - n, -1)]) if (
            num * self.batch_size > n) else order[: num * self.batch_size]
        order = order.reshape(num, self.batch_size)
        self._order_cache = (epoch, order)
        return order

    def make_batch(self, indices: np.ndarray, rows: slice | None = None) -> dict[str, np.ndarray]:
        """The padded batch of example ``indices`` (-1: empty row), or only its rows ``rows``.

        ``T`` comes from the whole batch either way, so row slices built by different processes
        fit together into the batch one process would build.
        """
        longest = max(int(self.lengths[i]) for i in indices if i >= 0)
        length = bucket_length(longest, self.pad_to_multiple, self.max_length)
        picked = indices if rows is None else indices[rows]
        return pad_batch([None if i < 0 else self.examples[i] for i in picked], length, self.pad_id)

    def epoch_batches(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """All batches of ``epoch``, without touching the iterator's state (e.g. each eval)."""
        for indices in self.epoch_order(epoch):
            yield self.make_batch(indices)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        indices = self.epoch_order(self.epoch)[self.position]
        batch = self.make_batch(indices, self.rows)
        self.last_batch_tokens = int(sum(int(self.lengths[i]) for i in indices if i >= 0))
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """JSON-serializable position in the stream."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_examples": len(self.examples), "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from :meth:`state_dict`'s output (same examples and batch size)."""
        for key in ("num_examples", "batch_size"):
            mine = len(self.examples) if key == "num_examples" else self.batch_size
            if state[key] != mine:
                raise ValueError(f"iterator state has {key}={state[key]}, this data has {mine}")
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"iterator state position {state['position']} outside an epoch "
                             f"of {len(self)} batches")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order_cache = None

    @classmethod
    def from_state(cls, examples: Sequence[Mapping[str, np.ndarray]], state: Mapping[str, int],
                   **kwargs: Any) -> BatchIterator:
        """A new iterator over ``examples`` positioned at ``state``; other options as ``kwargs``."""
        it = cls(examples, state["batch_size"], seed=state["seed"], **kwargs)
        it.load_state_dict(state)
        return it


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data options (defaults: the original QLoRA's, for the Guanaco/OASST1 run)."""

    dataset: str = "oasst1"
    dataset_format: str | None = None
    source_max_len: int = 1024
    target_max_len: int = 256
    train_on_source: bool = False
    group_by_length: bool = True
    eval_dataset_size: float | int = 1024
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 16
    pad_to_multiple: int = 64
    split_seed: int = 42
    seed: int = 0

    def __post_init__(self):
        if self.source_max_len <= 0 or self.target_max_len <= 0:
            raise ValueError(f"source_max_len={self.source_max_len} and "
                             f"target_max_len={self.target_max_len} must be > 0")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size} and "
                             f"eval_batch_size={self.eval_batch_size} must be > 0")
        if self.dataset_format is not None:
            _get_format(self.dataset_format)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataConfig:
        """Build from a mapping, rejecting keys that are not fields."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; valid keys: {sorted(fields)}")
        return cls(**values)


@dataclasses.dataclass
class DataModule:
    train: BatchIterator
    eval: BatchIterator | None
    train_examples: list[Example]
    eval_examples: list[Example]


def make_data(config: DataConfig, tokenizer: Any, *, pad_id: int | None = None) -> DataModule:
    """Load, split, tokenize and batch the data set of ``config``.

    The eval split (``eval_dataset_size``, seeded by ``split_seed``) is read once in order,
    longest first; the train iterator is endless, shuffled by ``seed`` and grouped by length
    when configured.
    """
    examples = load_records(config.dataset, config.dataset_format)
    if config.eval_dataset_size:
        train, evals = train_eval_split(examples, config.eval_dataset_size, seed=config.split_seed)
    else:
        train, evals = examples, []
    if config.max_train_samples is not None:
        train = train[: config.max_train_samples]
    if config.max_eval_samples is not None:
        evals = evals[: config.max_eval_samples]
    if not train:
        raise ValueError(f"data set {config.dataset!r} has no training examples left")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else pad_id
    kw = dict(source_max_len=config.source_max_len, target_max_len=config.target_max_len,
              train_on_source=config.train_on_source)
    max_length = config.source_max_len + config.target_max_len
    train_it = BatchIterator(tokenize_examples(train, tokenizer, **kw), config.batch_size,
                             seed=config.seed, group_by_length=config.group_by_length,
                             pad_id=pad_id, pad_to_multiple=config.pad_to_multiple,
                             max_length=max_length)
    eval_it = None
    if evals:
        eval_it = BatchIterator(tokenize_examples(evals, tokenizer, **kw), config.eval_batch_size,
                                shuffle=False, group_by_length=True, drop_last=False,
                                pad_id=pad_id, pad_to_multiple=config.pad_to_multiple,
                                max_length=max_length, num_epochs=1)
    return DataModule(train_it, eval_it, train, evals)
