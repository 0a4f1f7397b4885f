"""inkseg shared code: one module per concept (fragments, store, synth, data, model, losses, metrics, infer, rle)."""
