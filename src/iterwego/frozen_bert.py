"""A frozen BERT-family text encoder read straight from a Hugging Face model directory, for a fast start.

``iterwego order`` featurizes a handful of sentences with a frozen encoder, which takes milliseconds; loading
that encoder through transformers takes seconds, because transformers' model-loading path imports
``torch._dynamo`` and ``torch.distributed``. Inference needs none of that: a BERT encoder is embeddings and N
post-norm self-attention layers. :class:`FrozenBert` is that forward pass in plain torch, built from the
directory's ``config.json`` and ``model.safetensors``; :class:`FastTokenizer` runs its ``tokenizer.json`` with
the ``tokenizers`` library (what transformers' fast tokenizers wrap).

The operations, their order and the attention mask are transformers' ``BertModel`` with SDPA attention (its
default), so the last hidden states equal transformers' (bit for bit on the CPUs tested; tests allow float32
rounding). Only what a frozen encoder needs is here: no dropout, no cross-attention, no cache, absolute
positions, GELU; :func:`loadable` says whether a directory is such a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The files a directory needs for this path; anything else goes through transformers.
FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass
class BertShape:
    """The fields of a BERT ``config.json`` that the forward pass reads (names as transformers spells them)."""

    vocab_size: int  # rows of the word embedding
    hidden_size: int  # width of every layer's input and output
    num_hidden_layers: int  # encoder layers
    num_attention_heads: int  # heads per layer; hidden_size / heads is the head width
    intermediate_size: int  # width of each layer's feed-forward block
    max_position_embeddings: int  # longest input, in tokens
    type_vocab_size: int  # segment embeddings (all inputs here are segment 0)
    layer_norm_eps: float  # epsilon of every LayerNorm


def read_shape(directory: str | Path) -> BertShape | None:
    """The shape of the BERT model in ``directory``, or None when it is not one this module runs exactly.

    Refused (left to transformers): other model types, decoders, relative positions, activations other than
    exact GELU, and a missing ``model.safetensors`` or ``tokenizer.json``.
    """
    d = Path(directory)
    if not d.is_dir() or not all((d / f).is_file() for f in FILES):
        return None
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    plain = (
        cfg.get("model_type") == "bert"
        and not cfg.get("is_decoder", False)
        and not cfg.get("add_cross_attention", False)
        and cfg.get("position_embedding_type", "absolute") == "absolute"
        and cfg.get("hidden_act", "gelu") == "gelu"
        and not cfg.get("chunk_size_feed_forward", 0)
    )
    if not plain:
        return None
    try:
        return BertShape(**{f: cfg.get(f, _DEFAULTS.get(f)) for f in BertShape.__dataclass_fields__})
    except TypeError:
        return None


_DEFAULTS = {"type_vocab_size": 2, "layer_norm_eps": 1e-12, "max_position_embeddings": 512}


def loadable(directory: str | Path) -> bool:
    """Whether :func:`load` can run the model in ``directory`` (otherwise use transformers)."""
    return read_shape(directory) is not None


# Submodule names follow transformers' BertModel, so the safetensors load without renaming.
def _empty(*shape: int) -> nn.Parameter:
    """A parameter without storage, filled from the file by ``load_state_dict(assign=True)``.

    torch's own layers initialise their weights at random even on the meta device, and that path imports
    torch._dynamo (seconds); these layers skip it.
    """
    return nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


class _Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight, self.bias = _empty(d_out, d_in), _empty(d_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = _empty(width), _empty(width), eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class _Embedding(nn.Module):
    def __init__(self, rows: int, width: int):
        super().__init__()
        self.weight = _empty(rows, width)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class _Embeddings(nn.Module):
    def __init__(self, s: BertShape):
        super().__init__()
        self.word_embeddings = _Embedding(s.vocab_size, s.hidden_size)
        self.position_embeddings = _Embedding(s.max_position_embeddings, s.hidden_size)
        self.token_type_embeddings = _Embedding(s.type_vocab_size, s.hidden_size)
        self.LayerNorm = _LayerNorm(s.hidden_size, s.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        # the sums in transformers' order: float addition is not associative
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions))


class _DenseNorm(nn.Module):
    """A projection added back to the layer's input, then normalised (transformers' ``BertSelfOutput``)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = _Linear(d_in, d_out)
        self.LayerNorm = _LayerNorm(d_out, eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _QKV(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.query, self.key, self.value = (_Linear(width, width) for _ in range(3))


class _Attention(nn.Module):
    def __init__(self, s: BertShape):
        super().__init__()
        self.self = _QKV(s.hidden_size)
        self.output = _DenseNorm(s.hidden_size, s.hidden_size, s.layer_norm_eps)
        self.heads = s.num_attention_heads

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, n, width = x.shape
        head = width // self.heads
        q, k, v = (f(x).view(b, n, -1, head).transpose(1, 2) for f in (self.self.query, self.self.key, self.self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=head**-0.5)
        return self.output(a.transpose(1, 2).contiguous().reshape(b, n, -1).contiguous(), x)


class _Intermediate(nn.Module):
    def __init__(self, s: BertShape):
        super().__init__()
        self.dense = _Linear(s.hidden_size, s.intermediate_size)


class _Layer(nn.Module):
    def __init__(self, s: BertShape):
        super().__init__()
        self.attention = _Attention(s)
        self.intermediate = _Intermediate(s)
        self.output = _DenseNorm(s.intermediate_size, s.hidden_size, s.layer_norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        a = self.attention(x, mask)
        return self.output(F.gelu(self.intermediate.dense(a)), a)


class _Encoder(nn.Module):
    def __init__(self, s: BertShape):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(s) for _ in range(s.num_hidden_layers))


@dataclass
class Encoded:
    """What :meth:`FrozenBert.forward` returns, named as transformers names it."""

    last_hidden_state: Tensor  # (B, L, hidden) the top layer's output
    hidden_states: tuple[Tensor, ...] | None = None  # embeddings, then each layer's output (when asked for)


class FrozenBert(nn.Module):
    """A BERT encoder for inference: ``forward(input_ids, attention_mask)`` gives the last hidden states."""

    def __init__(self, shape: BertShape):
        super().__init__()
        self.config = shape
        self.embeddings = _Embeddings(shape)
        self.encoder = _Encoder(shape)

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> Encoded:
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, types)
        mask = attention_mask_4d(attention_mask, input_ids.shape[1])
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, mask)
            states.append(x)
        return Encoded(x, tuple(states) if output_hidden_states else None)


def attention_mask_4d(mask: Tensor | None, length: int) -> Tensor | None:
    """The boolean ``(B, 1, L, L)`` mask SDPA takes (True: attend), or None without padding, as transformers builds
    it: the kernel SDPA picks depends on whether a mask is given, and so do the last bits of the result."""
    if mask is None or bool(mask.all()):
        return None
    keep = mask.bool()[:, None, None, :]
    return keep.expand(mask.shape[0], 1, length, length)


def load(directory: str | Path, shape: BertShape | None = None) -> FrozenBert:
    """The model in ``directory`` (see :func:`read_shape`), weights in their stored dtype, in eval mode.

    Raises:
        ValueError: not a model this module runs, or weights that do not match its config.
    """
    from safetensors.torch import load_file

    shape = shape or read_shape(directory)
    if shape is None:
        raise ValueError(f"{directory}: not a BERT model directory this loader runs")
    model = FrozenBert(shape)
    state = load_file(str(Path(directory) / "model.safetensors"))
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    own = model.state_dict()
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{directory}: model.safetensors lacks {missing[:3]}")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


class FastTokenizer:
    """A ``tokenizer.json`` behind the part of transformers' tokenizer call that iterwego uses.

    ``tok(sentences, padding=..., truncation=..., max_length=..., return_tensors="pt")`` returns ``input_ids``,
    ``token_type_ids`` and ``attention_mask``. Padding (``"longest"``, ``"max_length"`` or False) and truncation
    are set on the ``tokenizers`` object for each call, as transformers' fast tokenizers do: keep the first
    ``max_length`` tokens, special tokens counted, and pad on the right with the file's padding token.
    """

    def __init__(self, path: str | Path):
        import threading

        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        padding = self._tok.padding or {}
        self.pad_token_id = int(padding.get("pad_id", 0))
        self.pad_token = padding.get("pad_token", "[PAD]")
        self._lock = threading.Lock()  # padding and truncation are state of the tokenizer, set per call

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(
        self,
        sentences: Sequence[str],
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict:
        with self._lock:
            if truncation and max_length is not None:
                self._tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction="right")
            else:
                self._tok.no_truncation()
            if padding:
                length = max_length if padding == "max_length" else None
                self._tok.enable_padding(
                    direction="right", pad_id=self.pad_token_id, pad_type_id=0, pad_token=self.pad_token, length=length
                )
            else:
                self._tok.no_padding()
            encs = self._tok.encode_batch(list(sentences), add_special_tokens=add_special_tokens)
        out = {
            "input_ids": [e.ids for e in encs],
            "token_type_ids": [e.type_ids for e in encs],
            "attention_mask": [e.attention_mask for e in encs],
        }
        if return_tensors == "pt":
            return {k: torch.tensor(v, dtype=torch.long).reshape(len(encs), -1) for k, v in out.items()}
        return out
