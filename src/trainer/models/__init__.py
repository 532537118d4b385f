"""Models. Each takes the input shape and class count from the dataset and returns logits."""
