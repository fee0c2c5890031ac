"""LoRA: low-rank updates of frozen linear layers (Hu et al. 2021, arXiv:2106.09685).

    y = W x + b + g * B (A dropout(x)),   A: (r, in), B: (out, r)

W and b stay frozen; A is Kaiming-uniform and B starts at zero, so the wrapped model starts out
identical to the pretrained one. The scale g (`scaling`):
- `fixed` (default, the study's): g = 1, whatever the rank.
- `alpha_over_r`: g = alpha / r (the LoRA paper; PEFT's default).
- `rslora`: g = alpha / sqrt(r) (Kalajdzievski 2023, rank-stabilised LoRA; PEFT's `use_rslora`).

Targets are module-name patterns matched like PEFT's `target_modules`: a pattern matches a module
whose dotted name equals it or ends with `.pattern`; `re:<regex>` matches the full name by regex;
the aliases `all` (every linear layer of the encoder), `attention` (query, key, value,
attention.output.dense) and `ffn` (intermediate.dense and the layer's output.dense) expand.
The pooler's dense layer is a target only with `include_pooler` (default `auto`: when the
pooler is used, i.e. pooling=pooler, which makes `all` equal PEFT's `all-linear` on BertModel).
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.adapters.base import Adapter, freeze
from peft_lightning.encoder import BertEncoder, BertSelfAttention
from peft_lightning.ops import CastLayout, Dropout, add_low_rank, cast_packed, low_rank_linear

SCALINGS = ("fixed", "alpha_over_r", "rslora")
ALIASES = {
    "all": [r"re:.*"],
    "attention": ["query", "key", "value", "attention.output.dense"],
    "ffn": ["intermediate.dense", r"re:encoder\.layer\.\d+\.output\.dense"],
}


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update.

    Args:
        base: the linear layer to wrap (kept inside, frozen).
        rank: r >= 1.
        scale: g, the multiplier of the low-rank branch.
        dropout: dropout on the branch input.
    """

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        freeze(base)
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(
            torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        )
        # B = 0: the update B A is zero at init, so the wrapped layer equals the pretrained one.
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self._saved_weight: torch.Tensor | None = None
        self.cast: tuple[torch.Tensor, torch.Tensor] | None = None  # (A, B) in the autocast dtype, set for one pass

    @property
    def merged(self) -> bool:
        return self._saved_weight is not None

    takes_gelu = True  # forward(x, gelu=True) = forward(gelu(x)), without keeping gelu(x) for backward

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        a, b = self.cast if self.cast is not None else (self.lora_A, self.lora_B)
        if not self.merged and isinstance(self.dropout, nn.Identity):
            return low_rank_linear(x, self.base.weight, self.base.bias, a, b, self.scale, gelu)
        x = F.gelu(x) if gelu else x
        y = self.base(x)
        if self.merged:
            return y
        return add_low_rank(y, F.linear(self.dropout(x), a), b, self.scale)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if self.base.weight.dtype in (torch.bfloat16, torch.float16):
            # A frozen weight kept in 16 bits (the GPU fast path) would round most of B A away:
            # |dW| is often below half an ulp of |W|. Stay unmerged; the branch is computed apart.
            return
        # Keep the exact frozen weight: unmerge restores it bit for bit (W + dW - dW would not).
        self._saved_weight = self.base.weight.detach().clone()
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self._saved_weight)
        self._saved_weight = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def lora_scale(scaling: str, alpha: float, rank: int) -> float:
    if scaling == "fixed":
        return 1.0
    if scaling == "alpha_over_r":
        return alpha / rank
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    raise ValueError(f"adapter.scaling={scaling!r} is unknown; expected one of {list(SCALINGS)}")


def expand_targets(targets: list[str] | str) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    out: list[str] = []
    for t in targets:
        out += ALIASES.get(t, [t])
    return out


def matches(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


class LoRA(Adapter):
    """LoRA on the encoder's linear layers; everything else in the encoder is frozen.

    Args:
        rank: r, the rank of the update (>= 1).
        targets: name patterns or aliases (see module docstring); default `all`.
        scaling: `fixed`, `alpha_over_r` or `rslora`.
        alpha: alpha for the two alpha scalings.
        dropout: dropout on the LoRA branch input.
        include_pooler: `auto`, true or false: whether the pooler's dense layer can be a target.
    """

    name = "lora"

    def __init__(
        self,
        rank: int = 8,
        targets: list[str] | str = "all",
        scaling: str = "fixed",
        alpha: float = 16.0,
        dropout: float = 0.0,
        include_pooler: bool | str = "auto",
    ):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"adapter.rank must be an integer >= 1, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter.dropout must be in [0, 1), got {dropout}")
        if include_pooler not in ("auto", True, False):
            raise ValueError(f"adapter.include_pooler must be auto, true or false, got {include_pooler!r}")
        self.rank, self.scaling, self.alpha, self.dropout_p = rank, scaling, float(alpha), dropout
        self.scale = lora_scale(scaling, self.alpha, rank)
        self.targets = list(targets) if not isinstance(targets, str) else [targets]
        self.include_pooler = include_pooler
        self.layers: list[LoRALinear] = []  # plain list: the modules live in the encoder
        self.target_names: list[str] = []
        self._attentions: list[BertSelfAttention] = []
        self._encoder: list[BertEncoder] = []  # plain list: not a submodule of the adapter
        self._plans: dict[tuple, tuple | None] = {}  # see _cast_plan

    def attach(self, encoder: BertEncoder) -> None:
        freeze(encoder)
        patterns = expand_targets(self.targets)
        pooler = encoder.pooler is not None if self.include_pooler == "auto" else bool(self.include_pooler)
        chosen = [
            name
            for name, mod in encoder.named_modules()
            if isinstance(mod, nn.Linear) and matches(name, patterns) and (pooler or not name.startswith("pooler."))
        ]
        if not chosen:
            linears = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"adapter.targets={self.targets} matched no linear layer of the encoder; "
                f"linear layers are named like {linears[:7]}"
            )
        for name in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = encoder.get_submodule(parent_name) if parent_name else encoder
            wrapped = LoRALinear(getattr(parent, child), self.rank, self.scale, self.dropout_p)
            setattr(parent, child, wrapped)
            self.layers.append(wrapped)
        self.target_names = chosen
        self._attentions = [m for m in encoder.modules() if isinstance(m, BertSelfAttention)]
        self._encoder = [encoder]

    @contextlib.contextmanager
    def compute_dtype_weights(self):
        """Under 16-bit autocast, cast every A and B once for the pass, in a few kernels (`cast_packed`).

        Autocast would cast each of them separately, forward and backward: on BERT-base ~200 tiny
        kernels a step, which is what made a LoRA step slower than a full one on a launch-bound GPU.
        The q/k/v groups get their stacked A and block-diagonal B directly. Eager mode only: under
        torch.compile, Inductor handles the casts.
        """
        plan = self._cast_plan()
        if plan is None:
            yield
            return
        layout, dtype, tensors, slots = plan
        outs = cast_packed(layout, dtype, tensors)
        try:
            for (obj, attr), pair in zip(slots, zip(outs[::2], outs[1::2])):
                setattr(obj, attr, pair)
            yield
        finally:
            for obj, attr in slots:
                setattr(obj, attr, None)

    def _cast_plan(self) -> tuple | None:
        """(layout, dtype, tensors, slots) for this pass, or None; built once per state of the layers
        (building it walks every layer and attention: ~0.6 ms on BERT-base, too much for every step)."""
        if not self.layers or not self._encoder:
            return None
        device = self.layers[0].lora_A.device.type
        if (
            not torch.is_autocast_enabled(device)
            or torch.compiler.is_compiling()
            or getattr(self._encoder[0], "_compiled_call_impl", None) is not None
        ):
            return None
        dtype = torch.get_autocast_dtype(device)
        key = (
            dtype,
            self.layers[0].lora_A.dtype,
            tuple(m.merged for m in self.layers),
            tuple(a.fuse_qkv for a in self._attentions),
        )
        if key not in self._plans:
            self._plans[key] = self._build_cast_plan(dtype)
        return self._plans[key]

    def _build_cast_plan(self, dtype: torch.dtype) -> tuple | None:
        live = [m for m in self.layers if not m.merged]
        param_dtype = self.layers[0].lora_A.dtype
        if not live or dtype not in (torch.bfloat16, torch.float16) or dtype == param_dtype:
            return None
        if any(t.dtype != param_dtype for m in live for t in (m.lora_A, m.lora_B)):
            return None
        groups, tensors, slots, done = [], [], [], set()
        for attn in self._attentions:
            qkv = attn.fused_loras()
            if qkv is None or qkv[0].merged:
                continue
            groups += [("stack", [tuple(m.lora_A.shape) for m in qkv]), ("diag", [tuple(m.lora_B.shape) for m in qkv])]
            tensors += [m.lora_A for m in qkv] + [m.lora_B for m in qkv]
            slots.append((attn, "cast_qkv"))
            done.update(id(m) for m in qkv)
        for m in live:
            if id(m) not in done:
                groups += [("stack", [tuple(m.lora_A.shape)]), ("stack", [tuple(m.lora_B.shape)])]
                tensors += [m.lora_A, m.lora_B]
                slots.append((m, "cast"))
        return CastLayout(groups), dtype, tensors, slots

    def merge(self) -> None:
        for layer in self.layers:
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers:
            layer.unmerge()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "scaling": self.scaling,
            "alpha": self.alpha,
            "targets": self.target_names,
        }
