"""What a run shows: the TensorBoard logger, the pictures and result files at its end, and the model summary."""
