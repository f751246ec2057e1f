"""Attention kernels and the optional libraries behind them (see docs/kernels.md).

`attention` (training and prefill), `decode` (attention over a KV cache), `roles`/`columns` (how both read
the projection output), `triton_attention`/`triton_decode` (the Triton kernels, imported on first use) and
`norm` (LayerNorm).
"""
