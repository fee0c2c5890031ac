"""The speed wing: what makes a step fast without changing what it computes.

- `kernels`: each LoRA linear as one autograd function (`low_rank_linear`), `mm_scaled`.
- `cast`: `cast_packed`, many small matrices cast to the autocast dtype in a few kernels.
- `arena`: LoRA's frozen weights kept beside their A and B (6 GEMMs a layer instead of 8).
- `plan`: where an adapter's casts go for one pass (`fits_arena`, `move_into_arena`).
- `precision`: frozen weights stored once in the autocast dtype; the torch.compile modes.

It works on tensors and the small wrapped-layer protocol (`base`, `lora_A`, `lora_B`, `rank`,
`dropout`), and imports nothing from the model or the adapters. Measured figures: docs/speed.md.
"""
