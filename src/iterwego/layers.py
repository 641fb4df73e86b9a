"""Building blocks of the orderers and their losses: the set transformer, the pair and rank heads.

Parameter names of the set transformer and pair head follow the authors' checkpoint
(``encoder.layers.L.self_attn.linears.K``, ``classifier.linear`` ...), so importing it is a key rename.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import OrdererConfig


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model={d} is not divisible by heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.linears = nn.ModuleList(nn.Linear(d, d) for _ in range(4))  # q, k, v, out

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        B, n, d = x.shape
        q, k, v = (lin(x).view(B, n, self.heads, d // self.heads).transpose(1, 2) for lin in self.linears[:3])
        # Padding keys are excluded; a padding query still sees the real keys, so no row is all -inf.
        mask = valid[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.linears[3](y.transpose(1, 2).reshape(B, n, d))


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int, dropout: float):
        super().__init__()
        self.w_1, self.w_2, self.drop = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.drop(F.relu(self.w_1(x))))


class Residual(nn.Module):
    """Post-norm residual, x = LayerNorm(x + dropout(f(x))), as in the paper's encoder."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.norm, self.drop = nn.LayerNorm(d), nn.Dropout(dropout)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.norm(x + self.drop(y))


class SetLayer(nn.Module):
    def __init__(self, cfg: OrdererConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.d_model, cfg.heads, cfg.dropout)
        self.feed_forward = FeedForward(cfg.d_model, cfg.ffn, cfg.dropout)
        self.sublayer = nn.ModuleList(Residual(cfg.d_model, cfg.dropout) for _ in range(2))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = self.sublayer[0](x, self.self_attn(x, valid))
        return self.sublayer[1](x, self.feed_forward(x))


class SetTransformer(nn.Module):
    def __init__(self, cfg: OrdererConfig):
        super().__init__()
        self.layers = nn.ModuleList(SetLayer(cfg) for _ in range(cfg.layers))

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, valid)
        return x


class PairHead(nn.Module):
    """Linear(2d -> d) -> tanh -> Linear(d -> 2) on [h_i; h_j], for all pairs by broadcasting.

    The first linear splits into the h_i and h_j halves, so the n^2 pair
    inputs are never materialised: cost O(n d^2 + n^2 d) instead of O(n^2 d^2).
    """

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.linear, self.classifier, self.drop = nn.Linear(2 * d, d), nn.Linear(d, 2), nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        d = h.shape[-1]
        w = self.linear.weight
        left = h @ w[:, :d].T + self.linear.bias
        right = h @ w[:, d:].T
        return self.classifier(torch.tanh(self.drop(left[:, :, None, :] + right[:, None, :, :])))


class RankHead(nn.Module):
    """Log-probabilities ``(B, n, P)`` of each item's position from its state and the story's length.

    Positions at or past the story's length get a large negative (finite) value, so padding never wins.
    """

    def __init__(self, d: int, positions: int, dropout: float):
        super().__init__()
        self.positions = positions
        self.length = nn.Embedding(positions + 1, d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Dropout(dropout), nn.Linear(d, positions))

    def forward(self, h: Tensor, valid: Tensor) -> Tensor:
        n = valid.sum(1)
        z = self.mlp(h + self.length(n.clamp(max=self.positions))[:, None, :]).float()
        beyond = torch.arange(self.positions, device=h.device)[None, None, :] >= n[:, None, None]
        return z.masked_fill(beyond, -1e4).log_softmax(-1)


def rank_loss(logp: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
    """Summed negative log-likelihood of the gold positions (stories longer than the head's range skipped)."""
    keep = valid & (valid.sum(1, keepdim=True) <= logp.shape[-1])
    return -logp[keep].gather(-1, positions[keep][:, None]).sum()


def pair_loss(logits: Tensor, positions: Tensor, valid: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy over valid off-diagonal pairs; the label of (i, j) is "i before j" (class 1).

    ``reduction``: ``"mean"`` / ``"sum"`` over all pairs of the batch, or ``"story_sum"``: the sum over
    stories of each story's mean (the authors' averaging, divided by their batch size afterwards).
    """
    labels = (positions[:, :, None] < positions[:, None, :]).long()
    n = positions.shape[1]
    keep = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=valid.device)
    if reduction != "story_sum":
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction=reduction)
    ce = F.cross_entropy(logits[keep].float(), labels[keep], reduction="none")
    k = valid.sum(1)
    per_pair = (1.0 / (k * (k - 1)).clamp(min=1).float())[:, None, None].expand(keep.shape)
    return (ce * per_pair[keep]).sum()


def n_pairs(valid: Tensor) -> int:
    """Ordered off-diagonal pairs in a padded batch."""
    k = valid.sum(1)
    return int((k * (k - 1)).sum())


def loss_units(valid: Tensor, average: str) -> int:
    """What a batch's loss is divided by: its pairs (``average="pair"``) or its stories (``"story"``)."""
    return n_pairs(valid) if average == "pair" else int(valid.shape[0])


def loss_reduction(average: str) -> str:
    """The :func:`pair_loss` reduction whose result, divided by :func:`loss_units`, is the loss averaged as
    ``average`` says: the sum over pairs (``"pair"``), or the sum of each story's mean (``"story"``)."""
    return "story_sum" if average == "story" else "sum"


def pairwise_accuracy(logits: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
    """``(B,)`` fraction of each story's ordered off-diagonal pairs whose argmax class is right (NaN below 2 items).

    The authors' validation score reads each cell (i, j) on its own, without combining it with (j, i).
    """
    labels = (positions[:, :, None] < positions[:, None, :]).long()
    n = positions.shape[1]
    keep = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=valid.device)
    right = ((logits.argmax(-1) == labels) & keep).sum((1, 2)).float()
    return right / keep.sum((1, 2)).float()
