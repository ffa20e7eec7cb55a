"""Latency models of a deployment target, and compression that aims at a latency instead of MACs.

MACs are a poor proxy for time: on this project's CPU half the MACs gave 0.60 of the latency on ORT
fp32, low-rank at 0.69 of the MACs gave 0.81 of it, and the same pruned model is 1.0x or 1.4x faster
depending on runtime and batch. So, as NViT (Yang et al., CVPR 2023) does with its lookup table,
latency is measured on the target:

- `table`: what a latency table is keyed by (model family, CPU, runtime and version, precision,
  threads, batch), where it is cached, and how it interpolates between its grid points;
- `profile`: builds a table by timing small exported graphs (one block of a grid of shapes, and the
  fixed parts) interleaved on the target runtime, and calibrates it on the whole model;
- `predict`: a model's latency as the sum of its parts;
- `plan`: latency-aware pruning (Hessian saliency per millisecond saved), re-measured and adjusted;
- `tune`: the search for a goal "p50 <= X ms at <= Y points of top-1".

Nothing here is imported by `vitcompress --help`; torch and the runtimes load inside the functions.
"""
