"""Image-text retrieval on paired data (image i <-> caption i): Recall@K both directions."""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Row i's correct column is i; ``R@K`` = fraction of rows whose match ranks in the top K."""
    n = similarity.shape[0]
    correct = similarity[torch.arange(n), torch.arange(n)]
    rank = (similarity > correct[:, None]).sum(dim=1)  # 0 = best; ties resolved in the query's favour
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


def retrieval(image_features: torch.Tensor, text_features: torch.Tensor,
              ks: Sequence[int] = (1, 5, 10)) -> Dict[str, object]:
    """Normalised ``[N, E]`` image and caption features of the same N pairs."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"retrieval needs one caption per image: {tuple(image_features.shape)} vs "
                         f"{tuple(text_features.shape)}")
    sim = image_features @ text_features.t()
    n = sim.shape[0]
    return {"image_to_text": recall_at_k(sim, ks), "text_to_image": recall_at_k(sim.t(), ks), "num_pairs": n,
            "chance": {f"R@{k}": min(1.0, k / n) for k in ks}}
