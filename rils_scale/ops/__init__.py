"""Python side of the fused kernels, each with its plain-torch reference beside it."""
from .patch_sentence_kl import (BACKENDS, cuda_backend_status, patch_sentence_kl, patch_sentence_kl_reference,
                                patch_sentence_kl_streaming)

__all__ = ["patch_sentence_kl", "patch_sentence_kl_reference", "patch_sentence_kl_streaming", "cuda_backend_status",
           "BACKENDS"]
