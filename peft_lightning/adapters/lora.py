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

import torch
import torch.nn.functional as F
from torch import nn

from peft_lightning.adapters.base import LayerAdapter, MergeableLinear, freeze, matches
from peft_lightning.arena import Arena, ArenaCast, ArenaSite, arena_linear
from peft_lightning.encoder import BertEncoder, BertSelfAttention
from peft_lightning.ops import CastLayout, Dropout, add_low_rank, cast_packed, low_rank_linear

SCALINGS = ("fixed", "alpha_over_r", "rslora")


class LoRALinear(MergeableLinear):
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
        # set by LoRA for one pass: (A, B) in the autocast dtype, or the layer's place in an Arena
        self.cast: tuple[torch.Tensor, torch.Tensor] | ArenaCast | None = None
        self.output_kept = False  # the consumer saves this layer's output for its backward (see arena_linear)
        self.output_to_gelu = False  # the output goes to GELU: the arena makes it contiguous (see arena_linear)
        self.concat = False  # the concatenated form (see ops.low_rank_linear and arena._ArenaLinear)

    shares_qkv_product = True  # q, k and v LoRA layers alike may be one product (`BertSelfAttention.project_qkv`)
    takes_gelu = True  # forward(x, gelu=True) = forward(gelu(x)), without keeping gelu(x) for backward

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


class LowRankAdapter(LayerAdapter):
    """What LoRA and DoRA share: their options, checked here, the choice of target layers, and
    `describe`.

    Args:
        rank: r, the rank of the update (>= 1).
        targets: name patterns or aliases (see module docstring); default `all`.
        scaling: `fixed`, `alpha_over_r` or `rslora`.
        alpha: alpha for the two alpha scalings.
        dropout: dropout on the low-rank branch input.
        include_pooler: `auto`, true or false: whether the pooler's dense layer can be a target.
    """

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
        self.layers: list[nn.Module] = []  # plain list: the modules live in the encoder
        self.target_names: list[str] = []

    def choose_targets(self, encoder: BertEncoder) -> list[str]:
        """Freeze the encoder and name the linear layers to adapt."""
        freeze(encoder)
        pooler = encoder.pooler is not None if self.include_pooler == "auto" else bool(self.include_pooler)
        return self.select(encoder, self.targets, pooler)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rank": self.rank,
            "scaling": self.scaling,
            "alpha": self.alpha,
            "targets": self.target_names,
        }


class LoRA(LowRankAdapter):
    """LoRA on the encoder's linear layers; everything else in the encoder is frozen.

    Args: `LowRankAdapter`'s (rank, targets, scaling, alpha, dropout, include_pooler), and
        arena: with bf16-mixed, keep A and B beside the frozen weights (`compute_dtype_weights`);
            false gives the same results (to bf16 rounding) with 8 GEMMs a layer instead of 6 (or 7).
        concat: compute a layer as [x | x A^T] [W | s B]^T (and its input gradient as [g | g B] [W; A]):
            the rank-r update goes into the frozen GEMM instead of a GEMM of its own. Under
            torch.compile every layer (`ops._ConcatLowRankLinear`); eager in the arena, the wider side
            of each (`arena._ArenaLinear`). Off by default until measured on a GPU.
        init_from: a PEFT LoRA adapter folder (`peft-export`'s, or PEFT's `save_pretrained`) whose
            A and B this adapter starts from; its rank, targets and scale must be this adapter's.
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
        arena: bool = True,
        concat: bool = False,
        init_from: str | None = None,
    ):
        super().__init__(rank, targets, scaling, alpha, dropout, include_pooler)
        self.init_from = init_from
        self.use_arena = bool(arena)
        self.concat = bool(concat)
        self._attentions: list[BertSelfAttention] = []
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
            from peft_lightning.export import load_peft_lora

            load_peft_lora(self, self.init_from)
        self._watch = [(m, m._parameters, m.base._parameters) for m in self.layers]
        self._attentions = [m for m in encoder.modules() if isinstance(m, BertSelfAttention)]
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
        when the layers' state changed (building walks every layer: ~0.6 ms on BERT-base)."""
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
        # what the plan depends on, read from the parameter dicts directly: module attribute lookups
        # made this ~0.35 ms a pass on BERT-base, ~0.04 ms this way
        return (
            dtype,
            self.use_arena,
            tuple(a.fuse_qkv for a in self._attentions),
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
        for attn in self._attentions:
            qkv = attn.fused_loras()
            if qkv is None or qkv[0].merged:
                continue
            sites.append((qkv, (attn, "cast_qkv")))
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


def fits_arena(m: LoRALinear, dtype: torch.dtype) -> bool:
    """Whether the layer's frozen weight and bias are in `dtype` already, its branch has no dropout, and
    its widths are multiples of 8 (the arena's views, and the gradients made from them, then have
    16-byte-aligned rows, which cuDNN attention needs of its inputs)."""
    base = m.base
    return (
        isinstance(m.dropout, nn.Identity)
        and base.in_features % 8 == 0
        and base.out_features % 8 == 0
        and base.weight.dtype == dtype
        and not base.weight.requires_grad
        and (base.bias is None or (base.bias.dtype == dtype and not base.bias.requires_grad))
    )


@torch.no_grad()
def move_into_arena(sites: list[tuple[LoRALinear, ...]], dtype: torch.dtype) -> tuple[Arena, list[ArenaSite]]:
    """An `Arena` for these sites; each frozen weight and bias becomes a view of it (no second copy).

    Returns the arena and each site's `ArenaSite` (`arena.views`).
    """
    device = sites[0][0].base.weight.device
    arena = Arena(
        [
            ([m.base.out_features for m in ms], ms[0].base.in_features, [m.rank for m in ms],
             any(m.base.bias is not None for m in ms))
            for ms in sites
        ],
        dtype,
        device,
    )  # fmt: skip
    for i, members in enumerate(sites):
        matrix, bias = arena.matrix(i), arena.bias(i)
        for m, rows in zip(members, arena.member_rows(i)):
            w = matrix[rows, : m.base.in_features]
            w.copy_(m.base.weight)
            m.base.weight.data = w
            if m.base.bias is not None:
                bias[rows].copy_(m.base.bias)
                m.base.bias.data = bias[rows]
    return arena, arena.views
