"""Scoring a small validation set says nothing about a one-class confusion matrix: MCC is 0 where
every label and prediction is one class (sklearn's value, computed without its warning)."""
import warnings

import numpy as np

from m2dino.evaluation.metrics import classification_metrics


def test_one_class_sets_score_without_warnings():
    probs = np.array([[0.2, 0.8], [0.3, 0.7], [0.1, 0.9]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one_class = classification_metrics([1, 1, 1], [1, 1, 1], probs, 2)
        mixed = classification_metrics([1, 0, 1], [1, 1, 1], probs, 2)
    assert [str(w.message) for w in caught] == []
    assert one_class["mcc"] == 0.0 and one_class["accuracy"] == 1.0 and np.isnan(one_class["auc"])
    assert mixed["mcc"] == 0.0 and mixed["auc"] == 1.0  # both positives above the negative
