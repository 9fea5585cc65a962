"""MMLU as the original QLoRA scores it: Hendrycks-format prompts (identical to the original's
zero-shot file), the answer-letter argmax at the last prompt position, per-subject accuracy and
their mean. Per-question predictions of the JAX model equal a transformers implementation of the
original callback (source + target batch, right padding, logits before the first label) on
stories260K and, slow, SmolLM2-135M; truncation is counted; the training loop logs
``mmlu_accuracy``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from qlora_jax.eval import mmlu
from qlora_jax.eval.mmlu import (
    LETTERS,
    MMLUEvaluator,
    Question,
    answer_token_ids,
    build_prompt,
    bucket,
    encode_prompts,
    evaluate_mmlu,
    load_questions,
    make_batches,
)
from qlora_jax.models.llama import LoRAConfig, QuantConfig

F32 = QuantConfig(quantize=False, param_dtype="float32", compute_dtype="float32")
SUBJECTS_5SHOT = ["anatomy", "high_school_physics", "world_religions"]


@pytest.fixture(scope="module")
def data_dir(shared) -> Path:
    path = shared / "data" / "mmlu"
    if not (path / "zero_shot_mmlu_val.jsonl").is_file() or not (path / "hendrycks").is_dir():
        pytest.skip(f"MMLU data missing under {path}")
    return path


@pytest.fixture(scope="module")
def stories(shared, tmp_path_factory):
    """stories260K converted with fp32 weights, its tokenizer, and the transformers model."""
    torch = pytest.importorskip("torch")
    import transformers

    from qlora_jax.convert import convert
    from qlora_jax.models.checkpoint import load_model

    src = shared / "models" / "stories260K"
    if not (src / "model.safetensors").is_file():
        pytest.skip(f"{src} is missing")
    out = convert(src, tmp_path_factory.mktemp("mmlu") / "stories", quant=F32, progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    return {"dir": out, "model": load_model(out, lora=LoRAConfig(targets=())), "tok": tok, "hf": hf}


def hf_original_procedure(hf, tok, questions: list[Question], letter_ids: list[int], max_length: int,
                          batch_size: int = 4) -> tuple[list[int], np.ndarray]:
    """The original ``MMLUEvalCallback`` with transformers: source ``[BOS] + input`` (left-truncated
    here, as ours), target ``letter + EOS``, right-padded batches, and the prediction read from the
    logits one position before the first label token."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    preds, scores = [], []
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        ids, labels = [], []
        for q in chunk:
            src = tok(q.prompt, add_special_tokens=False).input_ids
            src = [tok.bos_token_id] + src[max(0, len(src) - (max_length - 1)):]
            tgt = [letter_ids[q.answer], tok.eos_token_id]
            ids.append(torch.tensor(src + tgt))
            labels.append(torch.tensor([-100] * len(src) + tgt))
        input_ids = pad_sequence(ids, batch_first=True, padding_value=0)
        mask = pad_sequence([torch.ones_like(t) for t in ids], batch_first=True, padding_value=0)
        labels = pad_sequence(labels, batch_first=True, padding_value=-100)
        with torch.no_grad():
            logits = hf(input_ids=input_ids, attention_mask=mask).logits.float()
        for i in range(len(chunk)):
            first_label = (labels[i] != -100).nonzero()[0][0]
            abcd = logits[i, first_label - 1, letter_ids]
            preds.append(int(torch.argmax(abcd)))
            scores.append(abcd.numpy())
    return preds, np.array(scores)


# --- prompts and data ------------------------------------------------------------------------------


def test_prompt_is_hendrycks_format():
    """Header with Hendrycks' two spaces, exemplars ending "Answer: X\\n\\n", the question ending "Answer:"."""
    ex = [("1+1?", ["1", "2", "3", "4"], 1)]
    got = build_prompt("high_school_math", "2+2?", ["4", "5", "6", "7"], ex)
    assert got == ("The following are multiple choice questions (with answers) about  high school math.\n\n"
                   "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                   "2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer:")


def test_zero_shot_file_is_our_format(data_dir):
    """Every prompt of the original's zero-shot file is rebuilt exactly by ``build_prompt``."""
    questions = load_questions(0, data_dir=data_dir)
    assert len(questions) == 1531 and len({q.subject for q in questions}) == 57
    pattern = re.compile(r"^The following .*?\.\n\n(.*)\nA\. (.*)\nB\. (.*)\nC\. (.*)\nD\. (.*)\nAnswer:$", re.S)
    for q in questions:
        question, *choices = pattern.match(q.prompt).groups()
        assert build_prompt(q.subject, question, choices) == q.prompt
    counts = {}
    for q in questions:
        counts[q.answer] = counts.get(q.answer, 0) + 1
    assert sorted(counts) == [0, 1, 2, 3]


def test_five_shot_prompt_from_the_dev_csv(data_dir):
    """Five-shot: the first five dev rows of the subject, then the test question, in file order."""
    qs = load_questions(5, data_dir=data_dir, subjects=["abstract_algebra"], limit_per_subject=2)
    assert len(qs) == 2 and qs[0].subject == "abstract_algebra"
    p = qs[0].prompt
    assert p.startswith("The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n")
    assert p.count("\nAnswer: ") == 5 and p.endswith("\nAnswer:")
    import csv

    with (data_dir / "hendrycks" / "test" / "abstract_algebra_test.csv").open() as f:
        first = list(csv.DictReader(f))[0]
    assert p.endswith(first["question"] + "".join(f"\n{l}. {first[f'choice{i}']}" for i, l in enumerate(LETTERS))
                      + "\nAnswer:")
    assert qs[0].answer == int(first["answer"])


def test_selection_and_errors(data_dir, tmp_path):
    qs = load_questions(0, data_dir=data_dir, subjects=["virology", "anatomy"], limit_per_subject=3)
    assert [q.subject for q in qs].count("virology") == 3 and {q.subject for q in qs} == {"virology", "anatomy"}
    with pytest.raises(ValueError, match="unknown MMLU subjects.*'astrology'"):
        load_questions(0, data_dir=data_dir, subjects=["astrology"])
    with pytest.raises(ValueError, match="shots=3"):
        load_questions(3, data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="zero_shot_mmlu_val.jsonl"):
        load_questions(0, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="hendrycks/val"):
        load_questions(5, data_dir=data_dir, split="val")  # only dev and test CSVs are shared


# --- tokens, truncation, batches -------------------------------------------------------------------


def test_answer_tokens_must_be_single_tokens(stories):
    """stories260K has no " A" piece: the default style fails clearly; "bare" gives the "A" pieces."""
    tok = stories["tok"]
    with pytest.raises(ValueError, match=r"' A' after 'Answer:' is 2 tokens"):
        answer_token_ids(tok, "space")
    assert answer_token_ids(tok, "bare") == tok.convert_tokens_to_ids(list(LETTERS))


def test_left_truncation_keeps_bos_and_the_question_end(stories):
    tok = stories["tok"]
    prompts = ["short", "x" * 40 + "\nAnswer:", "a b"]
    ids, truncated = encode_prompts(prompts, tok, max_length=12, bos_id=1)
    full = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    assert len(full[1]) > 11 and truncated == sum(len(f) > 11 for f in full) == 1
    assert list(ids[1]) == [1] + full[1][-11:]
    assert list(ids[0]) == [1] + full[0]


def test_batches_cover_every_prompt_once_in_buckets():
    lengths = [5, 40, 17, 17, 3, 80, 64]
    toks = [np.arange(n, dtype=np.int32) + 1 for n in lengths]
    seen = []
    for idx, b in make_batches(toks, 3, max_length=80):
        assert b["input_ids"].shape[0] == 3 and b["input_ids"].shape[1] in (16, 24, 32, 48, 64, 80)
        for row, i in enumerate(idx):
            assert b["lengths"][row] == len(toks[i]) and b["attention_mask"][row].sum() == len(toks[i])
            np.testing.assert_array_equal(b["input_ids"][row, : len(toks[i])], toks[i])
        assert (b["lengths"] >= 1).all()
        seen += list(idx)
    assert sorted(seen) == list(range(len(lengths)))
    assert [bucket(n, 10**6) for n in (1, 16, 17, 25, 33, 49, 65, 97, 129)] == [16, 16, 24, 32, 48, 64, 96, 128, 192]


# --- equality with transformers --------------------------------------------------------------------


def test_stories_zero_shot_predictions_equal_transformers(stories, data_dir):
    """Zero-shot, the first question of every subject (57): the same prediction for every question,
    letter logits within float tolerance, the same per-subject accuracies; batch size does not matter."""
    qs = load_questions(0, data_dir=data_dir, limit_per_subject=1)
    ours = evaluate_mmlu(stories["model"], stories["tok"], qs, batch_size=8, answer_style="bare")
    letters = stories["tok"].convert_tokens_to_ids(list(LETTERS))
    ref_preds, ref_logits = hf_original_procedure(stories["hf"], stories["tok"], qs, letters, 512, batch_size=8)
    assert ours["predictions"] == ref_preds
    np.testing.assert_allclose(ours["letter_logits"], ref_logits, atol=1e-4, rtol=1e-4)
    assert ours["n"] == 57 and len(ours["per_subject"]) == 57
    ref = mmlu.summarize([q.subject for q in qs], [q.answer for q in qs], ref_preds)
    assert ours["per_subject"] == ref["per_subject"] and ours["accuracy"] == pytest.approx(ref["accuracy"])
    shortest = sorted(range(len(qs)), key=lambda i: len(qs[i].prompt))[:7]
    other = evaluate_mmlu(stories["model"], stories["tok"], [qs[i] for i in shortest], batch_size=3, answer_style="bare")
    assert other["predictions"] == [ours["predictions"][i] for i in shortest]


def test_stories_five_shot_truncated_predictions_equal_transformers(stories, data_dir):
    """Five-shot prompts overflow stories260K's 512-token context: they are cut from the left (and
    counted) and still predict what transformers predicts on the same cut."""
    qs = load_questions(5, data_dir=data_dir, subjects=SUBJECTS_5SHOT, limit_per_subject=2)
    ours = evaluate_mmlu(stories["model"], stories["tok"], qs, batch_size=4, answer_style="bare")
    lengths = [len(stories["tok"](q.prompt, add_special_tokens=False).input_ids) + 1 for q in qs]
    assert ours["truncated"] == sum(n > 512 for n in lengths) > 0
    letters = stories["tok"].convert_tokens_to_ids(list(LETTERS))
    ref_preds, ref_logits = hf_original_procedure(stories["hf"], stories["tok"], qs, letters, 512)
    assert ours["predictions"] == ref_preds
    np.testing.assert_allclose(ours["letter_logits"], ref_logits, atol=1e-4, rtol=1e-4)


def test_cli_table_json_and_errors(stories, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    rc = mmlu.main(["--model", str(stories["dir"]), "--shots", "0", "--subjects", "anatomy,virology",
                    "--limit-per-subject", "3", "--data-dir", str(data_dir), "--answer-style", "bare",
                    "--json", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "mean over subjects" in text and "virology" in text
    rec = json.loads(out.read_text())
    assert rec["n"] == 6 and set(rec["per_subject"]) == {"anatomy", "virology"} and len(rec["questions"]) == 6
    assert {q["prediction"] for q in rec["questions"]} <= set(LETTERS)

    rc = mmlu.main(["--model", str(stories["dir"]), "--data-dir", str(data_dir), "--quiet"])
    assert rc == 2 and "answer_style='space'" in capsys.readouterr().err
    rc = mmlu.main(["--model", str(stories["dir"]), "--adapter", str(tmp_path / "no-adapter"), "--data-dir",
                    str(data_dir), "--answer-style", "bare", "--quiet"])
    assert rc == 2 and "no-adapter" in capsys.readouterr().err


def test_adapter_changes_predictions_like_the_merged_model(stories, data_dir, tmp_path):
    import jax
    from flax import nnx

    """--adapter: a PEFT adapter applied to the base model gives the letter logits of the same
    model with the adapter merged into float weights."""
    from qlora_jax.models.checkpoint import load_model
    from qlora_jax.models.llama import LoRAConfig
    from qlora_jax.peft_io import merge_adapter, save_adapter

    model = load_model(stories["dir"], lora=LoRAConfig(r=4, alpha=8.0, dropout=0.0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(jax.random.normal(jax.random.key(len(path)), var.get_value().shape) * 0.3)
    save_adapter(model, tmp_path / "adapter")
    questions = load_questions(0, data_dir=data_dir, subjects=["anatomy"], limit_per_subject=4)
    tok = stories["tok"]
    with_adapter = mmlu.load_for_eval(stories["dir"], str(tmp_path / "adapter"), None)
    merged = merge_adapter(with_adapter, quantize_weights=False)
    a = mmlu.evaluate_mmlu(with_adapter, tok, questions, batch_size=4, answer_style="bare")
    b = mmlu.evaluate_mmlu(merged, tok, questions, batch_size=4, answer_style="bare")
    base = mmlu.evaluate_mmlu(mmlu.load_for_eval(stories["dir"], None, None), tok, questions, batch_size=4,
                              answer_style="bare")
    np.testing.assert_allclose(a["letter_logits"], b["letter_logits"], atol=1e-3, rtol=1e-3)
    assert not np.allclose(a["letter_logits"], base["letter_logits"], atol=1e-3)


# --- training loop ---------------------------------------------------------------------------------


def test_training_logs_mmlu_accuracy(shared, data_dir, tmp_path):
    """A 2-step run with ``eval.mmlu_every=1`` logs ``mmlu_accuracy`` at steps 0, 1 and 2; bad
    values of the eval section are rejected."""
    from qlora_jax.train_config import ConfigError, load_config
    from qlora_jax.trainer import train

    config = Path(__file__).resolve().parents[1] / "configs" / "stories260k.py"
    over = ["train.steps=2", "train.log_every=1", "train.eval_every=100", "train.save_every=100",
            "data.max_train_samples=16", "data.eval_dataset_size=0", "model.remat=none",
            "eval.mmlu_every=1", "eval.mmlu_subjects=anatomy,virology", "eval.mmlu_limit_per_subject=4",
            "eval.mmlu_answer_style=bare", f"eval.mmlu_data_dir={data_dir}",
            f"model.converted_dir={tmp_path / 'base'}"]
    run = train(load_config(config, over), tmp_path / "out", progress=False)
    accs = [(r["step"], r["mmlu_accuracy"]) for r in run.metrics if "mmlu_accuracy" in r]
    assert [s for s, _ in accs] == [0, 1, 2]
    assert all(a in (0.0, 0.25, 0.5, 0.75, 1.0, 0.125, 0.375, 0.625, 0.875) for _, a in accs)  # 4 per subject
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("mmlu_accuracy") for r in logged] == [r.get("mmlu_accuracy") for r in run.metrics]
    for bad, msg in [("eval.mmlu_every=-1", "must be >= 0"), ("eval.mmlu_shots=3", "0 or 5"),
                     ("eval.mmlu_answer_style=wide", "mmlu_answer_style")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(config, [bad])


# --- SmolLM2-135M (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_zero_shot_predictions_equal_transformers(smollm2_f32, smollm2_hf, data_dir):
    """SmolLM2-135M-Instruct (GGUF, converted with fp32 weights), zero-shot, the 32 shortest of the
    first questions of every subject: " A".." D" are single BPE tokens ("ĠA"), and every
    prediction equals transformers' run of the original procedure on the GGUF (one question per
    batch there). The conversion and the transformers model are conftest.py's session fixtures."""
    import transformers

    from qlora_jax.models.checkpoint import load_model

    out = smollm2_f32
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    letters = tok.convert_tokens_to_ids([f"Ġ{l}" for l in LETTERS])
    assert answer_token_ids(tok, "space") == letters
    qs = sorted(load_questions(0, data_dir=data_dir, limit_per_subject=1), key=lambda q: len(q.prompt))[:32]
    model = load_model(out, lora=LoRAConfig(targets=()))
    ev = MMLUEvaluator(qs, tok, max_length=model.cfg.max_position_embeddings, batch_size=8)
    ours = ev(model)
    del model
    ref_preds, ref_logits = hf_original_procedure(smollm2_hf, tok, qs, letters, 8192, batch_size=1)
    assert ours["predictions"] == ref_preds
    np.testing.assert_allclose(ours["letter_logits"], ref_logits, atol=2e-3, rtol=1e-3)
    print(f"\nSmolLM2-135M-Instruct fp32, zero-shot, 32 questions: accuracy {ours['accuracy']:.3f} "
          f"(transformers: {mmlu.summarize([q.subject for q in qs], [q.answer for q in qs], ref_preds)['accuracy']:.3f})")
