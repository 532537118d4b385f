from torch import nn

from trainer.errors import UserError


def activation(name: str) -> nn.Module:
    """A fresh activation module from its torch.nn class name, e.g. ReLU, GELU, SiLU, Tanh."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == "torch.nn.modules.activation"):
        raise UserError(f"activation {name!r} is not a torch.nn activation; use e.g. ReLU, GELU, SiLU, Tanh, ELU")
    return cls()
