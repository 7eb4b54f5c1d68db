"""scaleswap.runtime: model, quantization, scale bank, engine, trainer."""
