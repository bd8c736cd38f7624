"""The built-in model zoo and `load_model` for zoo, ``torchvision:``, ``timm:``, ``hf:`` and ``module:function`` specs."""

from spiralkit.models.hf import HFTextModel, encode_texts, hf_model, load_tokenizer, set_attention
from spiralkit.models.lenet import LeNet5, lenet5, lenet300
from spiralkit.models.loading import MODEL_SOURCES, ZOO, ModelSpec, load_model, load_weights
from spiralkit.models.mlp import MLP, mlp
from spiralkit.models.resnet_cifar import (
    BasicBlock,
    ChannelPadShortcut,
    CifarResNet,
    CifarResNetA,
    cifar_resnet20,
    cifar_resnet32,
    cifar_resnet44,
    cifar_resnet56,
    resnet20,
    resnet56,
)

__all__ = [
    "MLP",
    "MODEL_SOURCES",
    "ZOO",
    "BasicBlock",
    "ChannelPadShortcut",
    "CifarResNet",
    "CifarResNetA",
    "HFTextModel",
    "LeNet5",
    "ModelSpec",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "encode_texts",
    "hf_model",
    "lenet300",
    "lenet5",
    "load_model",
    "load_tokenizer",
    "load_weights",
    "mlp",
    "resnet20",
    "resnet56",
    "set_attention",
]
