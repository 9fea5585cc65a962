"""Data: formats (on the real OASST1 / alpaca / self-instruct files), tokenization, batching."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from qlora_jax import data
from qlora_jax.data import IGNORE_INDEX

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "INSTR\n\n### Input:\nINP\n\n### Response: ")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nINSTR\n\n### Response: ")


@pytest.fixture(scope="module")
def paths(shared):
    d = shared / "data"
    return {
        "tree": d / "oasst/openassistant_en_100_tree.jsonl",
        "message": d / "oasst/openassistant_en_100_message.jsonl",
        "questions": d / "oasst/qlora_oa_questions.jsonl",
        "alpaca": d / "instruct/alpaca_en_demo.json",
        "seed": d / "instruct/self_instruct_seed_tasks.jsonl",
    }


@pytest.fixture(scope="module")
def tokenizer(shared):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared / "models/stories260K")


@pytest.fixture(scope="module")
def alpaca(paths):
    return data.load_records(str(paths["alpaca"]), "alpaca")


@pytest.fixture(scope="module")
def alpaca_tokens(alpaca, tokenizer):
    return data.tokenize_examples(alpaca, tokenizer, source_max_len=128, target_max_len=256)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def walk(message, out):
    out.append(message)
    for reply in message.get("replies") or []:
        walk(reply, out)
    return out


# ----------------------------------------------------------------------------- OASST1


def test_oasst_trees_give_one_top_ranked_conversation_per_tree(paths):
    """100 trees -> 100 Guanaco conversations, each opening with its tree's root prompt;
    tree and message exports agree, and reading through `datasets` loses no message."""
    trees = read_jsonl(paths["tree"])
    assert sum(len(walk(t["prompt"], [])) for t in trees) == 1167
    from_trees = data.load_records(str(paths["tree"]), "oasst1")
    from_messages = data.load_records(str(paths["message"]), "oasst1")
    raw = data.format_records("oasst1", trees)
    assert len(from_trees) == 100 and from_trees == from_messages == raw
    for example, tree in zip(from_trees, trees):
        assert example["input"] == ""
        assert example["output"].startswith(f"### Human: {tree['prompt']['text']} ### Assistant: ")


def test_oasst_path_follows_best_rank_to_the_last_answer(paths):
    """At every step the path takes the best-ranked reply (unranked last); it ends on an
    assistant turn and stops only where no follow-up prompt of it has an answer."""
    trees = read_jsonl(paths["tree"])
    by_id = {m["message_id"]: m for t in trees for m in walk(t["prompt"], [])}
    paths_ = data.oasst_top_ranked_paths(trees)
    assert len(paths_) == 100
    for path in paths_:
        assert [m["role"] for m in path] == ["prompter", "assistant"] * (len(path) // 2)
        for parent, child in zip(path, path[1:]):
            ranks = [r.get("rank") for r in by_id[parent["message_id"]]["replies"]]
            ranked = [r for r in ranks if r is not None]
            assert child.get("rank") == (min(ranked) if ranked else None)
        last = by_id[path[-1]["message_id"]]
        replies = last["replies"] or []
        assert not replies or all(not (r["replies"] or []) for r in replies)  # unanswered prompts
    assert max(len(p) for p in paths_) >= 4  # multi-turn conversations are followed


def test_guanaco_turns_join_as_in_the_oasst_validation_prompts(paths):
    """For validation prompts whose message is in the trees, the conversation up to its parent,
    formatted by us, is exactly their `input` (turn separator, no stripping)."""
    flat = {m["message_id"]: m for t in read_jsonl(paths["tree"]) for m in walk(t["prompt"], [])}
    parents = {r["message_id"]: p["message_id"] for p in flat.values() for r in p["replies"] or []}
    checked = 0
    for row in read_jsonl(paths["questions"]):
        if row["message_id"] not in flat:
            continue
        chain, mid = [], row["parent_id"]
        while mid is not None:
            chain.append(flat[mid])
            mid = parents.get(mid)
        assert data.guanaco_conversation(chain[::-1]) + " ### Assistant:" == row["input"]
        assert flat[row["message_id"]]["text"] == row["output"]
        checked += 1
    assert checked >= 10


def test_oasst_skips_unanswered_and_deleted(tmp_path):
    rows = [
        {"message_id": "r1", "parent_id": None, "role": "prompter", "text": "hi"},
        {"message_id": "a1", "parent_id": "r1", "role": "assistant", "text": "bad", "rank": 0,
         "deleted": True},
        {"message_id": "a2", "parent_id": "r1", "role": "assistant", "text": "ok", "rank": 1},
        {"message_id": "p2", "parent_id": "a2", "role": "prompter", "text": "more?"},
        {"message_id": "r2", "parent_id": None, "role": "prompter", "text": "nobody answers"},
    ]
    assert data.format_records("oasst1", rows) == [
        {"input": "", "output": "### Human: hi ### Assistant: ok"}]
    path_ = data.oasst_top_ranked_paths(rows)[0]
    assert data.guanaco_conversation(path_, sep="") == "### Human: hi### Assistant: ok"
    path = tmp_path / "unanswered.jsonl"
    path.write_text(json.dumps(rows[-1]) + "\n")
    with pytest.raises(ValueError, match="no examples"):
        data.load_records(str(path), "oasst1")


# ----------------------------------------------------------------------------- other formats


def test_alpaca_prompts_follow_the_two_templates(paths, alpaca):
    raw = json.loads(paths["alpaca"].read_text())
    assert len(alpaca) == len(raw) == 999
    with_input = [i for i, r in enumerate(raw) if r["input"]]
    assert 0 < len(with_input) < len(raw)
    for i, (r, ex) in enumerate(zip(raw, alpaca)):
        template = ALPACA_WITH_INPUT if r["input"] else ALPACA_NO_INPUT
        expected = template.replace("INSTR", r["instruction"]).replace("INP", r["input"])
        assert ex == {"input": expected, "output": r["output"]}, i


def test_self_instruct_seed_tasks_expand_to_one_example_per_instance(paths):
    tasks = read_jsonl(paths["seed"])
    examples = data.load_records(str(paths["seed"]), "self-instruct")
    assert len(examples) == sum(len(t["instances"]) for t in tasks) == 175
    first = tasks[1]  # has an input
    assert examples[1] == {
        "input": first["instruction"] + "\n\n" + first["instances"][0]["input"] + "\n\n",
        "output": first["instances"][0]["output"]}
    two = {"instruction": " Add. ", "instances": [{"input": "1, 2", "output": "3 "},
                                                   {"input": "", "output": "0"}]}
    assert data.format_records("self-instruct", [two]) == [
        {"input": "Add.\n\n1, 2\n\n", "output": "3"}, {"input": "Add.\n\n", "output": "0"}]
    # Hub records (prompt/completion) are renamed, as the original does.
    assert data.format_example("self-instruct", {"prompt": "P", "completion": "C"}) == {
        "input": "P", "output": "C"}


def test_chip2_hh_rlhf_longform_records():
    assert data.format_example("chip2", {"text": "<human>: What is 2+2?\n<bot>: 4."}) == {
        "input": "What is 2+2?", "output": "4."}
    assert data.format_example("hh-rlhf", {"chosen": "\n\nHuman: a\n\nAssistant: b",
                                           "rejected": "x"}) == {
        "input": "", "output": "\n\nHuman: a\n\nAssistant: b"}
    assert data.format_example("longform", {"input": "q", "output": "a", "source": "s"}) == {
        "input": "q", "output": "a"}
    assert data.format_example("oasst1", {"text": "### Human: a### Assistant: b"}) == {
        "input": "", "output": "### Human: a### Assistant: b"}


def test_local_input_output_files_json_jsonl_csv(paths, tmp_path):
    """Local files default to the input-output format; csv reads the same as jsonl."""
    rows = read_jsonl(paths["questions"])
    examples = data.load_records(str(paths["questions"]))
    assert examples == [{"input": r["input"], "output": r["output"]} for r in rows]
    path = tmp_path / "small.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["input", "output"])
        w.writeheader()
        w.writerows(examples[:20])
    assert data.load_records(str(path)) == examples[:20]
    assert data.resolve_format("alpaca") == "alpaca"
    assert data.resolve_format("timdettmers/openassistant-guanaco") == "oasst1"


def test_clear_errors(paths, tmp_path):
    """Missing file, unknown format, record missing a key, empty file, bad lengths, bad keys."""
    with pytest.raises(ValueError, match="not found.*nope.jsonl"):
        data.load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="unknown dataset format 'alpacca'"):
        data.load_records(str(paths["alpaca"]), "alpacca")
    with pytest.raises(ValueError, match=r"alpaca_en_demo.json: 'chip2' record is missing key 'text'"):
        data.load_records(str(paths["alpaca"]), "chip2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.load_records(str(empty))
    with pytest.raises(ValueError, match="source_max_len=0"):
        data.tokenize_examples([], None, source_max_len=0, target_max_len=8)
    with pytest.raises(ValueError, match="target_max_len=-1"):
        data.DataConfig(target_max_len=-1)
    with pytest.raises(ValueError, match=r"unknown data config keys \['bacth_size'\]"):
        data.DataConfig.from_dict({"dataset": "x.json", "bacth_size": 4})
    with pytest.raises(ValueError, match="no batches"):
        data.BatchIterator([{"input_ids": np.ones(3), "labels": np.ones(3)}], 2)


# ----------------------------------------------------------------------------- tokenization


def test_tokens_bos_source_target_eos_and_label_mask(alpaca, alpaca_tokens, tokenizer):
    """input_ids = [BOS] + enc(input) | enc(output) + [EOS], truncated per side; labels are
    exactly the target ids with -100 on the source."""
    for ex, tok in zip(alpaca[:200], alpaca_tokens[:200]):
        src = ([1] + tokenizer(ex["input"], add_special_tokens=False).input_ids)[:128]
        tgt = (tokenizer(ex["output"], add_special_tokens=False).input_ids + [2])[:256]
        np.testing.assert_array_equal(tok["input_ids"], src + tgt)
        np.testing.assert_array_equal(tok["labels"], [IGNORE_INDEX] * len(src) + tgt)
        assert tok["input_ids"].dtype == tok["labels"].dtype == np.int32
    cut = [t for t in alpaca_tokens if len(t["input_ids"]) - (t["labels"] == IGNORE_INDEX).sum() == 256]
    assert cut and all(t["input_ids"][-1] != 2 for t in cut)  # truncated targets lose EOS
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tokenizer.name_or_path) + "/tokenizer.json")
    same = data.tokenize_examples(alpaca[:20], raw, source_max_len=128, target_max_len=256,
                                  bos_id=1, eos_id=2)
    for a, b in zip(same, alpaca_tokens[:20], strict=True):  # tokenizers.Tokenizer path
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    on_source = data.tokenize_examples(alpaca[:5], tokenizer, source_max_len=128,
                                       target_max_len=256, train_on_source=True)
    for a, b in zip(on_source, alpaca_tokens[:5]):
        np.testing.assert_array_equal(a["labels"], b["input_ids"])


# ----------------------------------------------------------------------------- batching


def test_batches_cover_every_example_once_with_fixed_bucket_shapes(alpaca_tokens):
    it = data.BatchIterator(alpaca_tokens, 16, seed=3, drop_last=False, max_length=384,
                            num_epochs=1)
    order = it.epoch_order(0)
    seen = order[order >= 0]
    assert sorted(seen.tolist()) == list(range(len(alpaca_tokens)))
    batches = list(it)
    assert len(batches) == len(it) == 63
    lengths = np.array([len(t["input_ids"]) for t in alpaca_tokens])
    for idx, batch in zip(order, batches):
        b, t = batch["input_ids"].shape
        assert b == 16 and (t % 64 == 0 or t == 384) and t >= lengths[idx[idx >= 0]].max()
        for row, i in enumerate(idx):
            n = 0 if i < 0 else lengths[i]
            assert batch["attention_mask"][row].sum() == n
            if i >= 0:
                np.testing.assert_array_equal(batch["input_ids"][row, :n], alpaca_tokens[i]["input_ids"])
                np.testing.assert_array_equal(batch["labels"][row, :n], alpaca_tokens[i]["labels"])
            assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
            assert (batch["input_ids"][row, n:] == 0).all()


def test_group_by_length_batches_have_similar_lengths(alpaca_tokens):
    """Grouped batches waste far less padding than random ones; the longest example is first."""
    lengths = np.array([len(t["input_ids"]) for t in alpaca_tokens])

    def spread(group):
        order = data.BatchIterator(alpaca_tokens, 8, seed=0, group_by_length=group).epoch_order(0)
        return np.mean([lengths[b].max() - lengths[b].min() for b in order]), order

    grouped, order = spread(True)
    random, _ = spread(False)
    assert grouped < random / 4
    assert lengths[order[0, 0]] == lengths.max()


def test_order_is_a_function_of_seed_and_epoch(alpaca_tokens):
    def order(seed, epoch):
        return data.BatchIterator(alpaca_tokens, 8, seed=seed).epoch_order(epoch)

    np.testing.assert_array_equal(order(1, 0), order(1, 0))
    assert not np.array_equal(order(1, 0), order(2, 0))
    assert not np.array_equal(order(1, 0), order(1, 1))


def test_resume_mid_epoch_gives_the_same_remaining_batches(alpaca_tokens):
    """Stop after k batches, serialize the state as JSON, rebuild: the continuation (across
    the epoch boundary) equals the uninterrupted stream bit for bit."""
    kw = dict(group_by_length=True, max_length=384)
    ref = data.BatchIterator(alpaca_tokens, 16, seed=5, **kw)
    expected = [next(ref) for _ in range(62 + 10)]  # 62 batches per epoch
    it = data.BatchIterator(alpaca_tokens, 16, seed=5, **kw)
    for _ in range(40):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    assert state["epoch"] == 0 and state["position"] == 40
    resumed = data.BatchIterator.from_state(alpaca_tokens, state, **kw)
    for want in expected[40:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert resumed.state_dict()["epoch"] == 1
    with pytest.raises(ValueError, match="num_examples"):
        data.BatchIterator.from_state(alpaca_tokens[:-1], state, **kw)


def test_train_eval_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, evals = data.train_eval_split(items, 0.1, seed=42)
    assert len(evals) == 10 and sorted(train + evals) == items
    assert data.train_eval_split(items, 0.1, seed=42) == (train, evals)
    assert data.train_eval_split(items, 0.1, seed=1)[1] != evals
    assert len(data.train_eval_split(items, 7)[1]) == 7
    with pytest.raises(ValueError, match="no training examples"):
        data.train_eval_split(items, 100)


def test_make_data_end_to_end(paths, tokenizer):
    """Config -> train stream of fixed-width batches and one pass over the eval split."""
    config = data.DataConfig.from_dict({
        "dataset": str(paths["tree"]), "dataset_format": "oasst1", "source_max_len": 16,
        "target_max_len": 240, "eval_dataset_size": 0.1, "batch_size": 4, "eval_batch_size": 4})
    dm = data.make_data(config, tokenizer)
    assert len(dm.train_examples) == 90 and len(dm.eval_examples) == 10
    batch = next(dm.train)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] in (64, 128, 192, 256)
    assert (batch["input_ids"][:, 0] == 1).all()
    eval_batches = list(dm.eval)
    assert len(eval_batches) == 3
    for again, first in zip(dm.eval.epoch_batches(), eval_batches, strict=True):  # re-runnable
        np.testing.assert_array_equal(again["input_ids"], first["input_ids"])
    assert sum(int(b["attention_mask"].any(axis=1).sum()) for b in eval_batches) == 10


def test_hub_ids_and_arguments_of_the_original(monkeypatch):
    """Format names load the original's hub data sets (datasets.load_dataset is stubbed: no network)."""
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([{"text": "<human>: hi\n<bot>: yo", "chosen": "c",
                                            "prompt": "p", "completion": "q"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data.load_records("chip2") == [{"input": "hi", "output": "yo"}]
    assert data.load_records("hh-rlhf") == [{"input": "", "output": "c"}]
    assert data.load_records("self-instruct", split="test") == [{"input": "p", "output": "q"}]
    assert data.load_records("Anthropic/hh-rlhf") == [{"input": "", "output": "c"}]
    assert calls == [
        ("laion/OIG", {"split": "train", "data_files": "unified_chip2.jsonl"}),
        ("Anthropic/hh-rlhf", {"split": "train"}),
        ("yizhongw/self_instruct", {"split": "test", "name": "self_instruct"}),
        ("Anthropic/hh-rlhf", {"split": "train"}),
    ]


def test_python_docs_are_built_from_the_reference_shipped_with_python():
    """The embedded default's data: every titled section of pydoc_data.topics with real text,
    as Guanaco-style examples; no file, no download."""
    from pydoc_data.topics import topics

    from qlora_jax.data import load_records, python_docs_records

    records = python_docs_records()
    assert len(records) > 150 and {r["topic"] for r in records} <= set(topics)
    assert all(len(r["text"]) >= 80 and r["text"] in topics[r["topic"]] for r in records)
    examples = load_records("python-docs")
    assert len(examples) == len(records)
    assert examples[0]["input"].startswith("### Human: Explain ") and examples[0]["input"].endswith("### Assistant:")
    assert any(e["input"] == '### Human: Explain the "assert" statement in Python. ### Assistant:' for e in examples)
