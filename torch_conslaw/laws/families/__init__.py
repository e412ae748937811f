"""Law families, one module each (rescaling, attention, normalization, velocity, ...)."""
