"""Law families, one module each (SCIENCE.md §5, §8).

Pair families: :mod:`.rescaling` (units, channels, gated products), :mod:`.attention` (heads,
RoPE planes, grouped queries), :mod:`.velocity` (momentum). Families beyond layer pairs are
proposed by :mod:`.proposals` (bias before a normalization, LayerNorm centering, embedding
padding row, key bias, cross-entropy translation, approximate scale laws).

This package imports nothing itself, so that the math of one family can be imported without
the machinery of the others.
"""
