"""The model summary: parameters, each layer's output shape and MACs per image, counted without changing the model."""

import torch

from trainer.models.cnn import CNN
from trainer.models.logistic import LogisticRegression
from trainer.models.mlp import MLP
from trainer.report.summary import summarize


def test_counts_match_the_arithmetic_of_each_layer():
    cnn = CNN((1, 28, 28), 10, channels=[8, 16], kernel_sizes=[3, 3], hidden=32, dropout=0.25, batch_norm=True,
              activation="ReLU", convs_per_stage=1, pool_first=False)
    s = summarize(cnn, torch.zeros(1, 1, 28, 28))
    convs = 28 * 28 * 8 * 9 + 14 * 14 * 16 * 8 * 9  # same-padded 3x3 convolutions, pooled by 2 after each
    assert s.macs_per_image == convs + 16 * 7 * 7 * 32 + 32 * 10
    assert s.params == s.trainable == sum(p.numel() for p in cnn.parameters())
    shapes = {name: shape for name, _, shape, _ in s.layers}
    assert shapes["features.0"] == (8, 28, 28) and shapes["features.7"] == (16, 7, 7) and shapes["head.5"] == (10,)
    mlp = MLP((3, 8, 8), 5, hidden_sizes=[20], activation="ReLU", dropout=0.0)
    assert summarize(mlp, torch.zeros(1, 3, 8, 8)).macs_per_image == 192 * 20 + 20 * 5
    logistic = LogisticRegression((1, 28, 28), 10)
    logistic.linear.weight.requires_grad_(False)
    s = summarize(logistic, torch.zeros(1, 1, 28, 28))
    assert (s.params, s.trainable, s.layers) == (7850, 10, [("linear", "Linear", (10,), 7850)])
    assert s.text().splitlines()[-1] == "LogisticRegression: 7,850 parameters (10 trainable), 0.01 M MACs per image"


def test_the_model_and_the_random_numbers_are_left_as_they_were():
    cnn = CNN((1, 28, 28), 10, channels=[4], kernel_sizes=[3], hidden=8, dropout=0.5, batch_norm=True,
              activation="ReLU", convs_per_stage=1, pool_first=False).train()
    before = {k: v.clone() for k, v in cnn.state_dict().items()}  # BN running stats included
    rng = torch.get_rng_state()
    summarize(cnn, torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert cnn.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    assert not cnn._forward_hooks and not any(m._forward_hooks for m in cnn.modules())
