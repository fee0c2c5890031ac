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

from peft_lightning.arena import ArenaCast, arena_linear
from peft_lightning.ops import Dropout, attention, low_rank_linear

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
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob
        self.fuse_qkv = True
        self._frozen_qkv: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self.cast_qkv: tuple[torch.Tensor, torch.Tensor] | ArenaCast | None = None  # set by LoRA for one pass

    def fused_loras(self) -> tuple | None:
        """The three LoRA layers when q, k, v are all LoRA and can share one product (see `project_qkv`)."""
        loras = [m for m in (self.query, self.key, self.value) if getattr(m, "shares_qkv_product", False)]
        if (
            self.fuse_qkv
            and len(loras) == 3
            and len({(m.rank, m.scale, m.merged) for m in loras}) == 1
            and not hasattr(loras[0].dropout, "p")
        ):
            return tuple(loras)
        return None

    def project_qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v projections; one GEMM for the three (and one for their LoRA A's) when fusable.

        The three layers share their input, so [Wq; Wk; Wv] x is one (3h x h) product instead of
        three; with LoRA (or DoRA), [Aq; Ak; Av] x is one product and blockdiag(Bq, Bk, Bv) another. Falls
        back to the three modules when they differ in kind (LoRA on some only), use LoRA dropout,
        rescale their input ((IA)^3 feed-forward targets) or have a forward of their own; (IA)^3
        output scales are one multiply, DoRA's magnitudes one addcmul.
        `cast_qkv`, when the adapter has set it for this pass, holds those two matrices already in
        the autocast dtype, or their place in LoRA's `Arena` (then [Wq; Wk; Wv; A] x is one GEMM).
        """
        mods = (self.query, self.key, self.value)
        loras = self.fused_loras()
        # a plain layer, or one that only rescales its output ((IA)^3), can share the stacked GEMM
        per_module = any(
            not isinstance(m, nn.Linear) and (not hasattr(m, "output_scale") or m.feedforward) for m in mods
        )
        if not self.fuse_qkv or (loras is None and per_module):
            return self.query(h), self.key(h), self.value(h)
        if loras and isinstance(self.cast_qkv, ArenaCast):
            return arena_linear(h, self.cast_qkv, loras[0].scale, keep_output=True).chunk(3, dim=-1)
        bases = [getattr(m, "base", m) for m in mods]
        weight, bias = self._stacked(bases)
        if loras and not loras[0].merged:
            if self.cast_qkv is not None:
                a, b = self.cast_qkv
            else:
                a = torch.cat([m.lora_A for m in loras])  # (3r, hidden)
                b = torch.block_diag(*[m.lora_B for m in loras])  # (3 hidden, 3r)
            # DoRA: each output row times m / ||W + g B A||, then the bias (one addcmul for the three)
            factors = [m.factor() for m in loras] if hasattr(loras[0], "factor") else None
            out = low_rank_linear(h, weight, None if factors else bias, a, b, loras[0].scale, concat=loras[0].concat)
            if factors:
                out = torch.addcmul(bias.to(out.dtype), out, torch.cat(factors).to(out.dtype))
        else:
            out = F.linear(h, weight, bias)  # (B, T, 3 * hidden)
            scales = [m.output_scale() if hasattr(m, "output_scale") else None for m in mods]
            if any(s is not None for s in scales):  # (IA)^3 on some of q, k, v: one multiply for the three
                ones = [out.new_ones(b.out_features) for b in bases]
                out = out * torch.cat([o if s is None else s.to(out.dtype) for s, o in zip(scales, ones)])
        return out.chunk(3, dim=-1)

    def _stacked(self, bases: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
        params = [p for b in bases for p in (b.weight, b.bias)]
        if any(p.requires_grad for p in params) or torch.compiler.is_compiling():  # compile fuses the cat
            return torch.cat([b.weight for b in bases]), torch.cat([b.bias for b in bases])
        # frozen: stack once, again only if a weight changed in place (LoRA merge / unmerge, loading)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._frozen_qkv is None or self._frozen_qkv[0] != key:
            self._frozen_qkv = (
                key,
                torch.cat([b.weight for b in bases]).detach(),
                torch.cat([b.bias for b in bases]).detach(),
            )
        return self._frozen_qkv[1], self._frozen_qkv[2]

    def forward(self, h: torch.Tensor, mask: torch.Tensor, prefix_kv: PrefixKV | None) -> torch.Tensor:
        B, T, _ = h.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

        q, k, v = (split_heads(x) for x in self.project_qkv(h))
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
        if gelu:  # x is the FFN pre-activation; a LoRA layer applies GELU itself (and recomputes it)
            y = self.dense(x, gelu=True) if getattr(self.dense, "takes_gelu", False) else self.dense(F.gelu(x))
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
