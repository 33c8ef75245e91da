"""Downstream evaluation of a RILS model (single process, frozen features).

Modules, one task each:
    data          labelled shards / ImageFolder -> normalised features
    zero_shot     prompt-ensembled zero-shot classification
    retrieval     image<->text Recall@K
    linear_probe  logistic regression on frozen features (scikit-learn)
    few_shot      k-shot classification (nearest class mean or logistic regression), several seeds
    runner        runs the tasks, formats the table (launchers/evaluate.py)
    visualize     patch-sentence probability maps (launchers/visualize.py, training hook)
See docs/evaluation.md.
"""
from .runner import TASKS, evaluate, format_table

__all__ = ["TASKS", "evaluate", "format_table"]
