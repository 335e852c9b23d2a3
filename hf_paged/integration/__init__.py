"""Integration: what hooks transformers.

`wrap`/`unwrap`, the attention and mask functions registered with transformers' interfaces, the
generate() wrapper (prefill once, fork rows, release), `torch.compile` of the decode step, the
refusals of models hf_paged cannot serve, and the public `memory_stats`.

May import: every layer below (`cache`, `attention`, `distributed`, `memory`), the root modules
(`_compat`, `config`, `errors`, `padding`, `model_state`) and `hf_paged.patches`.
"""
