"""The two networks of the RLHF loop. Knows nothing about training.

PolicyModel: ResNet18 -> K logits, the classifier the person teaches.
RewardModel: ResNet18 -> K logits of which class the person would answer; the predicted human reward
of class k is 2 * P(answer = k) - 1, the expected value of the +1/-1 reward rule.
"""
import os
import socket
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from checkpoint import CheckpointError, load_checkpoint, policy_spec
from run_config import FINETUNE_CHOICES
from user_errors import UserError


class WeightsError(UserError):
    """Weights that cannot be loaded; the message names the file and the fix."""


class KernelTaps(torch.autograd.Function):
    """The kernel taps [ph:ph+h, pw:pw+w] of a conv weight as one contiguous (Cout, h*w*Cin) matrix, taps-major.

    Autograd's own slice and reshape copy runs of two floats (a 2x2 box) and fill the whole gradient twice, which on
    some CPUs costs more than the matrix product they feed; copying Cin-long runs both ways does not."""

    @staticmethod
    def forward(ctx, weight, ph, pw, h, w):
        ctx.shape, ctx.box = weight.shape, (ph, pw, h, w)
        return weight.permute(0, 2, 3, 1)[:, ph:ph + h, pw:pw + w, :].reshape(weight.shape[0], -1).contiguous()

    @staticmethod
    def backward(ctx, grad):
        (ph, pw, h, w), (cout, cin, kh, kw) = ctx.box, ctx.shape
        if h * w == 1:  # one tap: a strided write into the weight's own layout beats a permuted copy back
            out = grad.new_zeros(ctx.shape)
            out[:, :, ph, pw] = grad
            return out, None, None, None, None
        out = grad.new_zeros((cout, kh, kw, cin))
        out[:, ph:ph + h, pw:pw + w, :] = grad.view(cout, h, w, cin)
        return out.permute(0, 3, 1, 2).contiguous(), None, None, None, None


class OnePixelConv2d(nn.Conv2d):
    """nn.Conv2d that computes an output of one pixel as one matrix product with the kernel taps the input meets.

    At 32 px ResNet18's layer4 maps are 1x1, and on some CPUs oneDNN's backward of those 3x3 convolutions costs
    many times their forward (docs/benchmarks.md); the same sum as a matrix product does not. Same parameters,
    same state dict; exports and every other shape take nn.Conv2d's own path."""

    def forward(self, x):
        if (isinstance(self.padding, str) or self.groups != 1 or self.dilation != (1, 1)
                or self.padding_mode != "zeros" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        (h, w), (kh, kw), (sh, sw), (ph, pw) = x.shape[-2:], self.kernel_size, self.stride, self.padding
        if not (0 <= h + 2 * ph - kh < sh and 0 <= w + 2 * pw - kw < sw):  # an output of more than one pixel
            return super().forward(x)
        h, w = min(h, kh - ph), min(w, kw - pw)  # input rows (columns) that the one output's window covers
        taps = KernelTaps.apply(self.weight, ph, pw, h, w)
        # the input in the taps' order (row, column, channel): a view of eval's channels-last maps
        return F.linear(x[:, :, :h, :w].permute(0, 2, 3, 1).reshape(x.shape[0], -1), taps, self.bias)[:, :, None, None]


def cpu_eval_layout(x, training):
    """x in channels-last memory for a CPU forward in eval mode: oneDNN's own layout, which scores a batch of small
    images faster (bench/eval_layout.py). Training keeps the default layout, where it is no faster
    and its smallest convolutions are slower. Same values to float rounding."""
    if (training or x.device.type != "cpu" or x.dim() != 4 or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _resnet18(num_outputs, backbone_state):
    net = torchvision.models.resnet18(weights=None)
    if backbone_state is not None:
        net.load_state_dict(backbone_state)
    net.fc = nn.Linear(net.fc.in_features, num_outputs)
    for conv in net.modules():
        if type(conv) is nn.Conv2d:
            conv.__class__ = OnePixelConv2d
    return net


class PolicyModel(nn.Module):
    """ResNet18 image classifier returning K logits; `model.` key prefix as in the original script."""

    def __init__(self, num_classes, backbone_state=None):
        super().__init__()
        self.model = _resnet18(num_classes, backbone_state)

    def forward(self, x):
        return self.model(cpu_eval_layout(x, self.training))


class RewardModel(nn.Module):
    """ResNet18 that predicts, for each class, the reward the person would give to that answer (it starts
    from the policy's weights: Learner copies them in)."""

    def __init__(self, num_classes):
        super().__init__()
        self.model = _resnet18(num_classes, None)

    def forward(self, x):
        return self.model(cpu_eval_layout(x, self.training))

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
        state = load_checkpoint(spec)
        policy = policy_spec(state, spec)  # one of our checkpoints, or the original script's
    except CheckpointError as err:
        raise WeightsError(f"--weights: {err}") from None
    if policy is not None:
        state = {k[len("model."):]: v for k, v in policy.state.items()}
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


def frozen_part(model, mode):
    """The layers `mode` keeps fixed, as a module mapping images to the trainable part's input.

    Its output never changes during a run, so it is computed once per image and cached (feature_cache.py).
    """
    net = model.model
    stem = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3]
    if mode == "all":
        return nn.Identity()
    if mode == "layer4":
        return nn.Sequential(*stem)
    return nn.Sequential(*stem, net.layer4, net.avgpool, nn.Flatten(1))


def trainable_part(model, mode):
    """The layers that learn under `mode`, sharing their parameters with `model`."""
    net = model.model
    if mode == "all":
        return model
    if mode == "layer4":
        return nn.Sequential(net.layer4, net.avgpool, nn.Flatten(1), net.fc)
    return net.fc


def fold_batchnorm(net):
    """Fold each eval-mode BatchNorm into the conv registered just before it (ResNet's order).

    Same outputs to float rounding, and one pass over every activation fewer.
    """
    for parent in list(net.modules()):
        prev = (None, None)
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d) and isinstance(prev[1], torch.nn.Conv2d):
                setattr(parent, prev[0], fuse_conv_bn_eval(prev[1], child))
                setattr(parent, name, torch.nn.Identity())
            prev = (name, child)
    return net
