"""A flat BERT encoder that owns its attention path.

Module names mirror Hugging Face's `BertModel` (`encoder.layer.3.attention.self.query`, ...), so
its state dict loads unchanged and LoRA target names mean what they mean in PEFT. Attention takes an
explicit `prefix_kv` per layer (prefix tuning) instead of the `past_key_values` cache route, and
real tokens keep position ids 0..T-1 and their token_type_ids whatever the prefix length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.layers import Dropout, attention

PrefixKV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (B or 1, heads, P, head_dim)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)[None]
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(h))  # (B, T, hidden)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention over the tokens and, with prefix tuning, the prefix keys and values.

    `qkv`, when an adapter has installed one (`adapters.fused_qkv`), computes the three projections
    together (one GEMM instead of three); otherwise each of `query`, `key`, `value` runs on its own.
    """

    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.qkv: nn.Module | None = None  # h -> (q, k, v); holds no parameters of its own

    def forward(self, h: torch.Tensor, mask: torch.Tensor, prefix_kv: PrefixKV | None) -> torch.Tensor:
        B, T, _ = h.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

        qkv = self.qkv(h) if self.qkv is not None else (self.query(h), self.key(h), self.value(h))
        q, k, v = (split_heads(x) for x in qkv)
        if prefix_kv is not None:
            pk, pv = prefix_kv
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, heads, P+T, head_dim)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        p = self.dropout_p if self.training else 0.0
        if p > 0 and h.device.type == "cpu" and not torch.compiler.is_compiling():
            out = attention(q, k, v, mask, p)  # SDPA's math path, with a cheaper dropout mask draw
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, heads, T, head_dim)
        return out.transpose(1, 2).reshape(B, T, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if gelu:  # x is the FFN pre-activation; a wrapped layer applies GELU itself (and may recompute it)
            y = self.dense(F.gelu(x)) if isinstance(self.dense, nn.Linear) else self.dense(x, gelu=True)
        else:
            y = self.dense(x)
        return self.LayerNorm(self.dropout(y) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)


class BertIntermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, mask: torch.Tensor, prefix_kv: PrefixKV | None = None) -> torch.Tensor:
        h = self.attention.output(self.attention.self(h, mask, prefix_kv), h)
        return self.output(self.intermediate.dense(h), h, gelu=True)


class BertStack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class BertEncoder(nn.Module):
    """BERT from a `transformers.BertConfig`; loads a `BertModel` state dict as is.

    Args:
        config: the backbone's BertConfig.
        add_pooler: build the pooler (dense + tanh on [CLS]); only `pooling=pooler` uses it.
    """

    def __init__(self, config, add_pooler: bool = True):
        super().__init__()
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {config.position_embedding_type!r}")
        if getattr(config, "hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, got {config.hidden_act!r}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertStack(config)
        self.pooler = BertPooler(config) if add_pooler else None

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layer)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        prefix_kv: list[PrefixKV] | None = None,
    ) -> torch.Tensor:
        """Returns the last hidden states, (B, T, hidden).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens.
            token_type_ids: (B, T) segment ids; zeros when None.
            prefix_kv: per layer (keys, values) of shape (B or 1, heads, P, head_dim); prefix
                positions are always attended to.
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.embeddings(input_ids, token_type_ids)
        keep = attention_mask.bool()
        if prefix_kv is not None:
            P = prefix_kv[0][0].shape[2]
            keep = torch.cat([keep.new_ones(keep.shape[0], P), keep], dim=1)  # (B, P+T)
        mask = keep[:, None, None, :]  # (B, 1, 1, P+T), True = attend
        for i, layer in enumerate(self.encoder.layer):
            h = layer(h, mask, prefix_kv[i] if prefix_kv is not None else None)
        return h

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
        """One vector per sequence, (B, hidden): `pooler`, `cls` or masked `mean`."""
        if pooling == "pooler":
            if self.pooler is None:
                raise ValueError("pooling='pooler' needs the encoder built with add_pooler=True")
            return torch.tanh(self.pooler.dense(hidden[:, 0]))
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        raise ValueError(f"model.pooling={pooling!r} is unknown; expected pooler, cls or mean")
