"""Semi-structured and block sparsity of ViT linear layers (the `sparsify` pass).

`config` holds the recipe schema and the pattern grammar (light: the pass registry imports it),
`select` the mask selection and weight update (magnitude, and second-order OBS as in SparseGPT),
`engine` the pass itself: calibration, allocation across layers, masks, report.
"""
