"""Linear probe: L2-regularised logistic regression (scikit-learn, L-BFGS) on frozen,
normalised, then standardised (statistics of the training split) image features. The inverse regularisation ``C`` is chosen on a held-out fifth
of the training features, then the probe is refit on all of them (CLIP's protocol, smaller sweep)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)


def _fit(x, y, c, max_iter):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    # Standardising the (normalised) features makes L-BFGS converge in a few dozen iterations.
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    with _blas_threads(x):
        return pipe.fit(x, y)


def _blas_threads(x):
    """One BLAS thread for small problems: threading overhead dominates them (10x slower on a busy
    2-core machine); big probes keep the default."""
    import contextlib
    if x.size > 5_000_000:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 cs: Sequence[float] = DEFAULT_CS, c: Optional[float] = None, seed: int = 0,
                 max_iter: int = 1000) -> Dict[str, float]:
    xtr, ytr = train_x.numpy().astype(np.float64), train_y.numpy()
    xte, yte = test_x.numpy().astype(np.float64), test_y.numpy()
    sweep = {}
    if c is None:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(ytr))
        cut = max(1, len(order) // 5)
        val, fit = order[:cut], order[cut:]
        for cand in cs:
            sweep[str(cand)] = float((_fit(xtr[fit], ytr[fit], cand, max_iter).predict(xtr[val]) == ytr[val]).mean())
        c = float(max(cs, key=lambda cand: sweep[str(cand)]))
    clf = _fit(xtr, ytr, c, max_iter)
    classes = np.unique(ytr)
    return {"top1": float((clf.predict(xte) == yte).mean()), "C": c, "val_top1_by_C": sweep,
            "train_samples": int(len(ytr)), "test_samples": int(len(yte)), "chance_top1": 1.0 / len(classes)}
