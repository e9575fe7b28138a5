"""The evaluation metrics of the moderator scripts (loadtest/eval_moderator.py, loadtest/scan_offline.py) against
brute-force definitions on random inputs."""

from __future__ import annotations

import random

import pytest

from vllm_restkv.moderator import auroc, rates_at


def test_auroc_is_the_share_of_correctly_ordered_pairs_with_ties_counting_half():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 40)
        labels = [rng.randint(0, 1) for _ in range(n)]
        labels[0], labels[1] = 0, 1
        scores = [rng.choice([0.1, 0.2, 0.5, rng.random()]) for _ in range(n)]  # with ties
        pairs = [(p, q) for p, y in zip(scores, labels) if y for q, z in zip(scores, labels) if not z]
        brute = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
        assert auroc(scores, labels) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        auroc([0.3, 0.4], [1, 1])


def test_rates_at_counts_flags_per_class_at_the_threshold():
    scores, labels = [0.9, 0.5, 0.49, 0.1, 0.7, 0.2], [1, 1, 1, 0, 0, 0]
    assert rates_at(scores, labels) == {"recall": 2 / 3, "false_positive_rate": 1 / 3}
    assert rates_at(scores, labels, threshold=0.95) == {"recall": 0.0, "false_positive_rate": 0.0}
    assert rates_at([0.8], [0]) == {"recall": 0.0, "false_positive_rate": 1.0}  # an absent class gives 0, no error

