"""The built-in model zoo and `load_model` for zoo, ``torchvision:`` and ``module:function`` specs."""

from spiralkit.models.lenet import LeNet5, lenet5, lenet300
from spiralkit.models.loading import ZOO, ModelSpec, load_model, load_weights
from spiralkit.models.mlp import MLP, mlp
from spiralkit.models.resnet_cifar import BasicBlock, CifarResNet, resnet20, resnet56

__all__ = [
    "MLP",
    "ZOO",
    "BasicBlock",
    "CifarResNet",
    "LeNet5",
    "ModelSpec",
    "lenet300",
    "lenet5",
    "load_model",
    "load_weights",
    "mlp",
    "resnet20",
    "resnet56",
]
