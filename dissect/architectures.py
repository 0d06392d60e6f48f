"""The architectures a checkpoint can name: the paper's tiny CNN, AlexNet, AlexNet-B and VGG16.

They live with the checkpoint format (dissect.checkpoint) because `dissect run`
must rebuild a checkpoint's model without the training code; `cgl-train`
builds them from here too (cgl_train.models adds the grouping defaults).

Every constructor takes `num_classes` and `input_size`. The architectures do
not depend on `input_size`: AlexNet and VGG16 end their convolutional part in
an adaptive average pool (as torchvision's), so they run at any input of at
least `MIN_INPUT_SIZE[name]` pixels (AlexNet 63, VGG16 32; 224 by default).
Smaller inputs raise InputError. `input_size` is validated, stored on the
model and travels in the checkpoint's `arch_kwargs`.

Every ReLU is out-of-place: an in-place ReLU would overwrite the conv output
that the group losses read as the pre-activation.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torchvision import models as tvm

from broden.errors import InputError

__all__ = ["TinyCNN", "MODELS", "MIN_INPUT_SIZE", "DEFAULT_INPUT_SIZE", "MAX_WIDTH", "MAX_CLASSES",
           "MAX_PARAMETERS", "build_model", "tiny_cnn", "alexnet", "alexnet_b", "vgg16"]


class TinyCNN(nn.Module):
    """The paper's synthetic-experiment network (section 4.1).

    conv1 3->width1 3x3 -> ReLU -> maxpool 2 -> conv2 width1->width2 3x3 -> ReLU
    -> global average pool -> fc. Both convs pad by 1 so maps keep their size.
    """

    def __init__(self, num_classes: int = 2, width1: int = 128, width2: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width1, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU(inplace=False)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width1, width2, kernel_size=3, padding=1)
        self.relu2 = nn.ReLU(inplace=False)
        self.pool2 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of images (N, 3, H, W)."""
        x = self.pool1(self.relu1(self.conv1(x)))  # (N, w1, H/2, W/2)
        x = self.pool2(self.relu2(self.conv2(x)))  # (N, w2, 1, 1)
        return self.fc(torch.flatten(x, 1))


def _no_inplace(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return model


# Sane upper bounds: a checkpoint's arch_kwargs come from a file, and an absurd size must be an
# InputError naming the argument, not a failed (or machine-filling) allocation.
MAX_WIDTH = 65536
MAX_CLASSES = 10 ** 6
MAX_INPUT_SIZE = 65536
MAX_PARAMETERS = 2 ** 31  # 8 GiB of float32 weights; VGG16 has 138 M


def _check_int(name: str, arg: str, value: Any, low: int, high: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"model {name!r}: {arg} must be an int in {low}..{high}{why}, got {value!r}")


def _check_common(name: str, num_classes: int, input_size: int) -> None:
    _check_int(name, "num_classes", num_classes, 1, MAX_CLASSES)
    _check_int(name, "input_size", input_size, MIN_INPUT_SIZE[name], MAX_INPUT_SIZE,
               " (smaller maps vanish in its pooling layers)")


def tiny_cnn(num_classes: int = 2, input_size: int = 64, width1: int = 128,
             width2: int = 256) -> nn.Module:
    """The paper's two-conv CNN; `width1`/`width2` shrink it for tests (defaults 128/256)."""
    _check_common("tiny_cnn", num_classes, input_size)
    _check_int("tiny_cnn", "width1", width1, 1, MAX_WIDTH)
    _check_int("tiny_cnn", "width2", width2, 1, MAX_WIDTH)
    model = TinyCNN(num_classes, width1, width2)
    model.input_size = input_size
    return model


def alexnet(num_classes: int = 1000, input_size: int = 224, dropout: float = 0.5) -> nn.Module:
    """torchvision's AlexNet, randomly initialised."""
    _check_common("alexnet", num_classes, input_size)
    model = _no_inplace(tvm.alexnet(weights=None, num_classes=num_classes, dropout=dropout))
    model.input_size = input_size
    return model


def alexnet_b(num_classes: int = 1000, input_size: int = 224, dropout: float = 0.5) -> nn.Module:
    """AlexNet-B: torchvision's AlexNet with a BatchNorm2d after every conv, before its ReLU.

    Layer names become features.0 (conv1), features.4, features.8, features.11,
    features.14 (convs), each followed by its BN at index + 1.
    """
    _check_common("alexnet_b", num_classes, input_size)
    model = _no_inplace(tvm.alexnet(weights=None, num_classes=num_classes, dropout=dropout))
    layers: list[nn.Module] = []
    for m in model.features:
        layers.append(m)
        if isinstance(m, nn.Conv2d):
            layers.append(nn.BatchNorm2d(m.out_channels))
    model.features = nn.Sequential(*layers)
    model.input_size = input_size
    return model


def vgg16(num_classes: int = 1000, input_size: int = 224, dropout: float = 0.5) -> nn.Module:
    """torchvision's VGG16 (no batch-norm), randomly initialised."""
    _check_common("vgg16", num_classes, input_size)
    model = _no_inplace(tvm.vgg16(weights=None, num_classes=num_classes, dropout=dropout))
    model.input_size = input_size
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "tiny_cnn": tiny_cnn,
    "alexnet": alexnet,
    "alexnet_b": alexnet_b,
    "vgg16": vgg16,
}
MIN_INPUT_SIZE: dict[str, int] = {"tiny_cnn": 2, "alexnet": 63, "alexnet_b": 63, "vgg16": 32}
DEFAULT_INPUT_SIZE: dict[str, int] = {"tiny_cnn": 64, "alexnet": 224, "alexnet_b": 224, "vgg16": 224}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Construct the model registered as `name` with constructor kwargs (InputError lists valid names)."""
    if name not in MODELS:
        raise InputError(f"unknown architecture {name!r}; valid names: {', '.join(sorted(MODELS))}")
    try:
        # first on the meta device (no memory): sizes each within bounds can still multiply out
        # to more weights than any machine holds
        with torch.device("meta"):
            count = sum(p.numel() for p in MODELS[name](**kwargs).parameters())
        if count > MAX_PARAMETERS:
            raise InputError(f"architecture {name!r} with arguments {kwargs}: {count:,} parameters, more than "
                             f"{MAX_PARAMETERS:,} ({MAX_PARAMETERS * 4 // 2 ** 30} GiB of float32 weights); "
                             f"check the sizes")
        return MODELS[name](**kwargs)
    except TypeError as e:  # an unknown keyword argument
        raise InputError(f"architecture {name!r}: bad constructor arguments {kwargs}: {e}") from e

