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

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.adapters.base import matches
from peft_lightning.adapters.fused_qkv import FusedQKV, install_fused_qkv
from peft_lightning.adapters.low_rank import LowRankAdapter, LowRankLinear
from peft_lightning.adapters.peft_format import load_lora
from peft_lightning.encoder import BertEncoder
from peft_lightning.fastpath.arena import ArenaCast, arena_linear
from peft_lightning.fastpath.cast import CastLayout, cast_packed
from peft_lightning.fastpath.kernels import add_low_rank, low_rank_linear
from peft_lightning.fastpath.plan import fits_arena, move_into_arena


class LoRALinear(LowRankLinear):
    """A frozen `nn.Linear` plus a trainable low-rank update (see `LowRankLinear` for the arguments)."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(base, rank, scale, dropout)
        # set by LoRA for one pass: (A, B) in the autocast dtype, or the layer's place in an Arena
        self.cast: tuple[torch.Tensor, torch.Tensor] | ArenaCast | None = None
        self.output_kept = False  # the consumer saves this layer's output for its backward (see arena_linear)
        self.output_to_gelu = False  # the output goes to GELU: the arena makes it contiguous (see arena_linear)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if isinstance(self.cast, ArenaCast):
            return arena_linear(x, self.cast, self.scale, gelu, self.output_kept, self.output_to_gelu)
        a, b = self.cast if self.cast is not None else (self.lora_A, self.lora_B)
        if not self.merged and isinstance(self.dropout, nn.Identity):
            return low_rank_linear(x, self.base.weight, self.base.bias, a, b, self.scale, gelu, self.concat)
        x = F.gelu(x) if gelu else x
        y = self.base(x)
        if self.merged:
            return y
        return add_low_rank(y, F.linear(self.dropout(x), a), b, self.scale)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale  # (out, in)


class LoRA(LowRankAdapter):
    """LoRA on the encoder's linear layers; everything else in the encoder is frozen.

    Args: `LowRankAdapter`'s (rank, targets, scaling, alpha, dropout, include_pooler), and
        arena: with bf16-mixed, keep A and B beside the frozen weights (`compute_dtype_weights`);
            false gives the same results (to bf16 rounding) with 8 GEMMs a layer instead of 6 (or 7).
        concat: compute a layer as [x | x A^T] [W | s B]^T (and its input gradient as [g | g B] [W; A]):
            the rank-r update goes into the frozen GEMM instead of a GEMM of its own. Under
            torch.compile every layer (`fastpath.kernels._ConcatLowRankLinear`); eager in the arena, the wider side
            of each (`arena._ArenaLinear`). Off by default until measured on a GPU.
        init_from: a PEFT LoRA adapter folder (`peft-export`'s, or PEFT's `save_pretrained`) whose
            A and B this adapter starts from; its rank, targets and scale must be this adapter's.
    """

    name = "lora"

    def __init__(self, *, arena: bool = True, concat: bool = False, init_from: str | None = None, **low_rank):
        super().__init__(**low_rank)  # rank, targets, scaling, alpha, dropout, include_pooler
        self.init_from = init_from
        self.use_arena = bool(arena)
        self.concat = bool(concat)
        self._fused: list[FusedQKV] = []  # the attentions' q/k/v seams (plain list: they live in the encoder)
        self._encoder: list[BertEncoder] = []  # plain list: not a submodule of the adapter
        self._plan: tuple[tuple, tuple | None] | None = None  # (key, plan), see _cast_plan
        self._watch: list[tuple[LoRALinear, dict, dict]] = []  # each layer and its and its base's parameters

    def attach(self, encoder: BertEncoder) -> None:
        chosen = self.choose_targets(encoder)

        def make(name: str, layer: nn.Linear) -> LoRALinear:
            wrapped = LoRALinear(layer, self.rank, self.scale, self.dropout_p)
            # outputs the next op saves anyway: q, k, v (attention) and the FFN pre-activation
            wrapped.output_kept = matches(name, ["query", "key", "value", "intermediate.dense"])
            wrapped.output_to_gelu = matches(name, ["intermediate.dense"])
            wrapped.concat = self.concat
            return wrapped

        self.wrap(encoder, chosen, make)
        self.target_names = chosen
        if self.init_from:
            load_lora(self, self.init_from)
        self._watch = [(m, m._parameters, m.base._parameters) for m in self.layers]
        self._fused = [f for f in install_fused_qkv(encoder) if f.low_rank]
        self._attentions = [f._attention[0] for f in self._fused]
        self._encoder = [encoder]

    @contextlib.contextmanager
    def compute_dtype_weights(self):
        """Under 16-bit autocast, every A and B in the compute dtype for the pass, in a few kernels.

        Autocast would cast each of them separately, forward and backward: on BERT-base ~200 tiny
        kernels a step, which is what made a LoRA step slower than a full one on a launch-bound GPU.
        When the frozen weights are in the compute dtype already (`store_frozen_in`: bf16-mixed
        training, the GPU fast path), A and B are written into an `Arena` beside them, and each
        layer takes 6 GEMMs instead of 8 (7 for the FFN's two: see `arena._ArenaLinear`).
        Otherwise `cast_packed` makes new tensors: q/k/v groups get their stacked A and
        block-diagonal B directly. Eager mode only: under torch.compile, Inductor handles the casts.
        """
        plan = self._cast_plan()
        if plan is None:
            yield
            return
        layout, dtype, tensors, slots, arena, arena_sites = plan
        if arena is None:
            outs = cast_packed(layout, dtype, tensors)
            casts = list(zip(outs[::2], outs[1::2]))
        else:
            outs = cast_packed(layout, dtype, tensors, into=arena)
            casts = [ArenaCast(a, b, site, self.concat) for a, b, site in zip(outs[::2], outs[1::2], arena_sites)]
        try:
            for (obj, attr), cast in zip(slots, casts):
                setattr(obj, attr, cast)
            yield
        finally:
            for obj, attr in slots:
                setattr(obj, attr, None)

    def __getstate__(self) -> dict:
        # a copy or a pickle gets no plan: its arena would not hold the copy's weights (it is rebuilt)
        return {**self.__dict__, "_plan": None}

    def _cast_plan(self) -> tuple | None:
        """(layout, dtype, tensors, slots, arena, arena_sites) for this pass, or None; built again only
        when the layers' state changed (building walks every layer; its cost: docs/speed.md)."""
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
        if self._plan is None or self._plan[0] != self._plan_key(dtype):
            plan = self._build_cast_plan(dtype)
            self._plan = (self._plan_key(dtype), plan)  # after the build: an arena moves the weights
        return self._plan[1]

    def _plan_key(self, dtype: torch.dtype) -> tuple:
        # what the plan depends on, read from the parameter dicts directly (module attribute lookups
        # cost ten times as much a pass: docs/speed.md)
        return (
            dtype,
            self.use_arena,
            tuple(a.qkv is f for a, f in zip(self._attentions, self._fused)),
            tuple(
                (m._saved_weight is None, p["lora_A"].dtype, base["weight"].dtype, base["weight"].data_ptr())
                for m, p, base in self._watch
            ),
        )

    def _build_cast_plan(self, dtype: torch.dtype) -> tuple | None:
        live = [m for m in self.layers if not m.merged]
        param_dtype = self.layers[0].lora_A.dtype
        if not live or dtype not in (torch.bfloat16, torch.float16) or dtype == param_dtype:
            return None
        if any(t.dtype != param_dtype for m in live for t in (m.lora_A, m.lora_B)):
            return None
        sites, done = [], set()  # (LoRA layers sharing one product, where their casts go)
        for attn, fused in zip(self._attentions, self._fused):
            qkv = fused.layers()
            if attn.qkv is not fused or qkv[0].merged:
                continue
            sites.append((qkv, (fused, "cast")))
            done.update(id(m) for m in qkv)
        sites += [((m,), (m, "cast")) for m in live if id(m) not in done]
        tensors = [t for members, _ in sites for t in [m.lora_A for m in members] + [m.lora_B for m in members]]
        slots = [slot for _, slot in sites]
        devices = {m.base.weight.device for m in live}
        if self.use_arena and len(devices) == 1 and all(fits_arena(m, dtype) for ms, _ in sites for m in ms):
            arena, arena_sites = move_into_arena([members for members, _ in sites], dtype)
            return arena.layout, dtype, tensors, slots, arena, arena_sites
        groups = [
            g for members, _ in sites
            for g in (("stack", [tuple(m.lora_A.shape) for m in members]), ("diag", [tuple(m.lora_B.shape) for m in members]))
        ]  # fmt: skip
        return CastLayout(groups), dtype, tensors, slots, None, None
