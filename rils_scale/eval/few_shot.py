"""k-shot classification on frozen features (the paper's low-shot setting).

For each k and seed, draw k training images per class, fit a classifier on their normalised
features, and score the whole test split; report mean and std over seeds.

- ``ncm`` (default): nearest class mean -- the class prototype is the re-normalised mean of
  its k features, prediction by cosine similarity. No hyper-parameter, stable at k = 1.
- ``logreg``: logistic regression (scikit-learn, C = 1 on normalised features) on the k x C samples.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (0, 1, 2)
METHODS = ("ncm", "logreg")


def sample_k_shot(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of ``k`` samples per class (fewer when a class has fewer), chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    y = labels.numpy()
    picks = [rng.choice(np.flatnonzero(y == c), size=min(k, int((y == c).sum())), replace=False)
             for c in np.unique(y)]
    return torch.from_numpy(np.concatenate(picks))


def _predict(method: str, x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
    if method == "ncm":
        classes = torch.unique(y)
        protos = F.normalize(torch.stack([x[y == c].mean(dim=0) for c in classes]), dim=-1)
        return classes[(test_x @ protos.t()).argmax(dim=1)]
    if method == "logreg":
        from sklearn.linear_model import LogisticRegression
        from .linear_probe import _blas_threads
        xs = x.numpy().astype(np.float64)
        with _blas_threads(xs):
            clf = LogisticRegression(C=1.0, max_iter=1000).fit(xs, y.numpy())
        return torch.from_numpy(clf.predict(test_x.numpy().astype(np.float64)))
    raise ValueError(f"unknown k-shot method {method!r}; choose from {METHODS}")


def few_shot(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
             shots: Sequence[int] = DEFAULT_SHOTS, seeds: Sequence[int] = DEFAULT_SEEDS,
             method: str = "ncm") -> Dict[str, object]:
    results = {}
    for k in shots:
        accs = []
        for seed in seeds:
            idx = sample_k_shot(train_y, k, seed)
            pred = _predict(method, train_x[idx], train_y[idx], test_x)
            accs.append(float((pred == test_y).float().mean()))
        results[str(k)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": accs}
    return {"method": method, "shots": results, "seeds": list(seeds),
            "chance_top1": 1.0 / len(torch.unique(train_y))}
