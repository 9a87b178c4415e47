"""The two networks of the RLHF loop. Knows nothing about training.

PolicyModel: ResNet18 -> K logits, the classifier the person teaches.
RewardModel: ResNet18 -> K logits of which class the person would answer; the predicted human reward
of class k is 2 * P(answer = k) - 1, the expected value of the +1/-1 reward rule.
"""
import os
import socket
import warnings

import torch
import torch.nn as nn
import torchvision

FINETUNE_CHOICES = ("all", "layer4", "head")


class WeightsError(Exception):
    """Weights that cannot be loaded; the message names the file and the fix."""


def _resnet18(num_outputs, backbone_state):
    net = torchvision.models.resnet18(weights=None)
    if backbone_state is not None:
        net.load_state_dict(backbone_state)
    net.fc = nn.Linear(net.fc.in_features, num_outputs)
    return net


class PolicyModel(nn.Module):
    """ResNet18 image classifier returning K logits; `model.` key prefix as in the original script."""

    def __init__(self, num_classes, backbone_state=None):
        super().__init__()
        self.model = _resnet18(num_classes, backbone_state)

    def forward(self, x):
        return self.model(x)


class RewardModel(nn.Module):
    """ResNet18 that predicts, for each class, the reward the person would give to that answer."""

    def __init__(self, num_classes, backbone_state=None):
        super().__init__()
        self.model = _resnet18(num_classes, backbone_state)

    def forward(self, x):
        return self.model(x)

    @staticmethod
    def rewards_from_logits(logits):
        """Expected +1/-1 reward of every class: 2 * P(person answers that class) - 1."""
        return 2.0 * torch.softmax(logits, dim=-1) - 1.0


def resolve_backbone_weights(spec, download_timeout=15.0):
    """Map --weights auto|imagenet|none|PATH to (ImageNet-style state dict or None, origin string).

    `auto` uses torchvision's ImageNet weights when cached or downloadable and otherwise warns and
    falls back to random init; `imagenet` insists on them.
    """
    if spec == "none":
        return None, "random"
    if spec in ("auto", "imagenet"):
        enum = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(download_timeout)
        try:
            return enum.get_state_dict(progress=False, check_hash=True), "imagenet"
        except Exception as err:  # offline, proxy, corrupt cache: all mean "no ImageNet weights here"
            if spec == "imagenet":
                raise WeightsError(
                    f"ImageNet weights are not in {cached} and could not be downloaded ({type(err).__name__}): "
                    f"copy resnet18 weights there or pass --weights none") from None
            warnings.warn(f"ImageNet weights unavailable ({type(err).__name__}; expected at {cached}): "
                          "starting from random init, which needs many more answers", stacklevel=2)
            return None, "random"
        finally:
            socket.setdefaulttimeout(old_timeout)
    if not os.path.isfile(spec):
        raise WeightsError(f"weights file {spec} does not exist: pass --weights auto|imagenet|none|PATH")
    try:
        state = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"weights file {spec} is not a torch state dict ({type(err).__name__}): "
                           "pass a ResNet18 state_dict saved with torch.save") from None
    if isinstance(state, dict) and "policy" in state and isinstance(state["policy"], dict):
        state = {k[len("model."):]: v for k, v in state["policy"].items()}  # one of our checkpoints
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    probe = torchvision.models.resnet18(weights=None)
    missing, unexpected = probe.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise WeightsError(f"weights file {spec} is not a ResNet18 backbone: pass --weights auto|imagenet|none")
    full = probe.state_dict()
    return full, f"file:{os.path.abspath(spec)}"


def set_finetune(model, mode):
    """Freeze what `mode` keeps fixed: all trains everything, layer4 trains layer4 + head, head the head."""
    if mode not in FINETUNE_CHOICES:
        raise ValueError(f"finetune must be one of {FINETUNE_CHOICES}")
    net = model.model
    for name, p in net.named_parameters():
        p.requires_grad = (mode == "all" or name.startswith("fc.")
                           or (mode == "layer4" and name.startswith("layer4.")))
    return [p for p in model.parameters() if p.requires_grad]


def frozen_modules(model, mode):
    """Submodules whose BatchNorm statistics must stay fixed because their weights do."""
    net = model.model
    if mode == "all":
        return []
    keep_training = {"fc"} | ({"layer4"} if mode == "layer4" else set())
    return [m for name, m in net.named_children() if name not in keep_training]
