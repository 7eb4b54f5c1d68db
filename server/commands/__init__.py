"""One module per `scaleswap` verb; each exposes register(subparsers)."""
