"""spiralkit: make trained PyTorch models smaller and faster."""
