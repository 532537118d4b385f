import pytest
import torch

from trainer.errors import UserError
from trainer.loop.losses import BCEOneVsRest, MSEOnSoftmax, NLLOnLogSoftmax
from trainer.models.cnn import CNN
from trainer.models.logistic import LogisticRegression
from trainer.models.mlp import MLP

MODELS = {
    "logistic": lambda: LogisticRegression((1, 28, 28), 10),
    "mlp": lambda: MLP((1, 28, 28), 10, hidden_sizes=[64, 32], activation="GELU", dropout=0.0),
    "cnn": lambda: CNN((1, 28, 28), 10, channels=[8, 16], kernel_sizes=[3, 5], hidden=32, dropout=0.0,
                       batch_norm=True, activation="ReLU", convs_per_stage=1, pool_first=False),
}


@pytest.mark.parametrize("name", MODELS)
def test_output_is_logits_per_class(name):
    assert MODELS[name]()(torch.randn(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize("name", MODELS)
def test_can_overfit_one_batch(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x, y = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05 and (model(x).argmax(1) == y).all()


def test_cnn_takes_other_input_shapes_and_no_batch_norm():
    model = CNN((3, 32, 32), 7, channels=[4], kernel_sizes=[3], hidden=8, dropout=0.5, batch_norm=False,
                activation="SiLU", convs_per_stage=1, pool_first=False)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_convs_per_stage_stacks_convolutions_before_each_pool():
    model = CNN((1, 28, 28), 10, channels=[4, 8], kernel_sizes=[3, 3], hidden=8, dropout=0.0, batch_norm=True,
                activation="ReLU", convs_per_stage=2, pool_first=False)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 4), (4, 8), (8, 8)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.features) == 4
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.features) == 2
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)



def test_pool_first_pools_each_stage_straight_after_its_last_convolution():
    model = CNN((1, 28, 28), 10, channels=[4, 8], kernel_sizes=[3, 3], hidden=8, dropout=0.0, batch_norm=True,
                activation="ReLU", convs_per_stage=2, pool_first=True)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"] * 2
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_pool_first_without_batch_norm_is_the_same_function():
    # max-pooling commutes with a monotone activation, so only the cost changes
    torch.manual_seed(0)
    args = dict(channels=[4, 8], kernel_sizes=[3, 3], hidden=8, dropout=0.0, batch_norm=False, activation="ReLU",
                convs_per_stage=1)
    late, early = CNN((1, 28, 28), 10, **args, pool_first=False), CNN((1, 28, 28), 10, **args, pool_first=True)
    early.load_state_dict(late.state_dict())  # the convolutions keep their indices (0 and 3) in both orders
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(early(x), late(x))

@pytest.mark.parametrize("build, message", [
    (lambda: MLP((1, 28, 28), 10, hidden_sizes=[0], activation="ReLU", dropout=0.0), "hidden_sizes"),
    (lambda: MLP((1, 28, 28), 10, hidden_sizes=[8], activation="Relu", dropout=0.0), "'Relu'"),
    (lambda: MLP((1, 28, 28), 10, hidden_sizes=[8], activation="Linear", dropout=0.0), "'Linear'"),
    (lambda: MLP((1, 28, 28), 10, hidden_sizes=[8], activation="ReLU", dropout=1.0), "dropout"),
    (lambda: CNN((1, 28, 28), 10, [8, 8], [3], 8, 0.0, True, "ReLU", 1, False), "same length"),
    (lambda: CNN((1, 28, 28), 10, [8], [4], 8, 0.0, True, "ReLU", 1, False), "odd"),
    (lambda: CNN((1, 28, 28), 10, [8] * 6, [3] * 6, 8, 0.0, True, "ReLU", 1, False), "shrink"),
    (lambda: CNN((1, 28, 28), 10, [8], [3], 8, 0.0, True, "ReLU", 0, False), "convs_per_stage=0"),
    (lambda: CNN((1, 28, 28), 10, [8], [3], 8, 0.0, True, "ReLU", 1.5, False), "convs_per_stage=1.5"),
    (lambda: CNN((1, 28, 28), 10, [8], [3], 8, 0.0, True, "ReLU", 1, 1), "pool_first=1"),
])
def test_bad_model_settings_are_named(build, message):
    with pytest.raises(UserError, match=message):
        build()


def test_losses_take_logits():
    logits, y = torch.randn(6, 10), torch.arange(6)
    assert torch.allclose(NLLOnLogSoftmax()(logits, y), torch.nn.functional.cross_entropy(logits, y))
    expected = ((logits.softmax(1) - torch.nn.functional.one_hot(y, 10)) ** 2).mean()
    assert torch.allclose(MSEOnSoftmax()(logits, y), expected)
    one_hot = torch.nn.functional.one_hot(y, 10).float()
    p = logits.sigmoid()
    by_hand = -(one_hot * p.log() + (1 - one_hot) * (1 - p).log()).mean()  # BCE over all B x K outputs
    assert torch.allclose(BCEOneVsRest()(logits, y), by_hand, atol=1e-6)
    weighted = -(9 * one_hot * p.log() + (1 - one_hot) * (1 - p).log()).mean()
    assert torch.allclose(BCEOneVsRest(pos_weight=9.0)(logits, y), weighted, atol=1e-6)
