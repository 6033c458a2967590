"""Task metrics a validation gate set can name as `task_metric: pipeline.task_metrics:<name>`.

A metric takes the outputs and the labels, both dicts keyed by output name (labels only for
the labelled outputs: integer class indices or float targets), and returns a float where
higher is better. Validation calls it on the source's outputs and on the model's, and gates
the drop. A metric that reads no labels lets its gate set run on unlabeled data
(`task_metric_uses_labels: false`).
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluate import indexes_classes

Arrays = dict[str, np.ndarray]


def _labelled(outputs: Arrays, labels: Arrays, *, kind: str, what: str) -> list[str]:
    """The outputs labelled with class indices (one per sample, for an output of several units:
    not a one-unit or multi-label output's 0/1 labels), or with float targets (`kind` "f")."""
    def fits(name: str, values: np.ndarray) -> bool:
        if values.dtype.kind not in kind or name not in outputs:
            return False
        return kind == "f" or indexes_classes(values, outputs[name])

    names = [name for name, values in sorted(labels.items()) if fits(name, values)]
    if not names:
        raise ValueError(f"{what} needs an output labelled with {'class indices' if kind == 'iu' else 'targets'}")
    return names


def top5_accuracy(outputs: Arrays, labels: Arrays) -> float:
    """Top-5 accuracy, averaged over the outputs labelled with class indices."""
    scores = []
    for name in _labelled(outputs, labels, kind="iu", what="top-5 accuracy"):
        values = outputs[name].reshape(len(labels[name]), -1)
        top5 = np.argsort(-values, axis=1, kind="stable")[:, :5]
        scores.append(float(np.mean(np.any(top5 == labels[name][:, None], axis=1))))
    return float(np.mean(scores))


def macro_f1(outputs: Arrays, labels: Arrays) -> float:
    """F1 of each class, averaged over the classes (and over the class-labelled outputs): unlike
    accuracy, a class the model stops predicting costs its full share."""
    scores = []
    for name in _labelled(outputs, labels, kind="iu", what="macro F1"):
        truth = labels[name]
        predicted = np.argmax(outputs[name].reshape(len(truth), -1), axis=1)
        per_class = []
        for cls in range(outputs[name].reshape(len(truth), -1).shape[1]):
            true_positive = float(np.sum((predicted == cls) & (truth == cls)))
            relevant = float(np.sum(predicted == cls) + np.sum(truth == cls))
            per_class.append(2 * true_positive / relevant if relevant else 1.0)
        scores.append(float(np.mean(per_class)))
    return float(np.mean(scores))


def r2_score(outputs: Arrays, labels: Arrays) -> float:
    """Coefficient of determination (1 is perfect), averaged over the outputs labelled with
    float targets: the quality of regression heads."""
    scores = []
    for name in _labelled(outputs, labels, kind="f", what="R²"):
        target = labels[name].reshape(len(labels[name]), -1).astype(np.float64)
        predicted = outputs[name].reshape(len(target), -1).astype(np.float64)
        residual = float(np.sum((target - predicted) ** 2))
        total = float(np.sum((target - target.mean(axis=0)) ** 2))
        scores.append(1.0 - residual / total if total else float(residual == 0))
    return float(np.mean(scores))


def mean_prediction_entropy(outputs: Arrays, labels: Arrays) -> float:
    """Negative mean entropy of the softmax outputs (no labels needed): a drop means the model
    became less decisive than its source. For gate sets on unlabeled data."""
    del labels  # reads none: `task_metric_uses_labels: false`
    entropies = []
    for values in outputs.values():
        probabilities = np.clip(values.reshape(len(values), -1).astype(np.float64), 1e-12, 1.0)
        entropies.append(float(np.mean(-np.sum(probabilities * np.log(probabilities), axis=1))))
    return -float(np.mean(entropies))
