"""OnePixelConv2d: the same outputs and gradients as nn.Conv2d where its output is one pixel."""
import pytest
import torch

from models import OnePixelConv2d, PolicyModel


@pytest.mark.parametrize("size, kernel, stride, padding", [
    (1, 3, 1, 1),   # layer4's 3x3 convolutions at 32 px
    (2, 3, 2, 1),   # layer4's first, from layer3's 2x2 maps
    (2, 1, 2, 0),   # layer4's downsample
    (3, 3, 1, 0),   # a valid window that covers the whole input
    (5, 3, 2, 1),   # an output of 3x3: nn.Conv2d's own path
    (5, 3, 1, "valid"),  # padding by name: nn.Conv2d's own path
    (3, 3, 1, "valid"),  # the same, where the output is one pixel
    ((1, 2), 3, (1, 2), 1),  # a one-pixel output from a row of two
])
def test_outputs_and_gradients_match_nn_conv2d(size, kernel, stride, padding):
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(6, 5, kernel, stride, padding, bias=True)
    fast = OnePixelConv2d(6, 5, kernel, stride, padding, bias=True)
    fast.load_state_dict(plain.state_dict())
    size = size if isinstance(size, tuple) else (size, size)
    x = torch.randn(4, 6, *size, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_(True)
    out, out_fast = plain(x), fast(x_fast)
    assert out_fast.shape == out.shape
    assert torch.allclose(out_fast, out, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_fast.backward(grad)
    assert torch.allclose(x_fast.grad, x.grad, atol=1e-5)
    assert torch.allclose(fast.weight.grad, plain.weight.grad, atol=1e-5)
    assert torch.allclose(fast.bias.grad, plain.bias.grad, atol=1e-5)


def test_the_networks_use_it_and_keep_torchvisions_state_dict():
    policy = PolicyModel(3)
    convs = [m for m in policy.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(type(m) is OnePixelConv2d for m in convs)
    plain = PolicyModel(3)
    for m in plain.modules():
        if type(m) is OnePixelConv2d:
            m.__class__ = torch.nn.Conv2d
    plain.load_state_dict(policy.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(policy.eval()(x), plain.eval()(x), atol=1e-5)


@pytest.mark.parametrize("size", [32, 64])
def test_eval_forward_in_channels_last_gives_the_default_layouts_scores(size):
    torch.manual_seed(0)
    net = PolicyModel(3).eval()
    seen = []
    net.model.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        scores, plain = net(x), net.model(x)  # net.model: the layout it is given
    assert seen == [True, False]
    assert torch.allclose(scores, plain, atol=1e-5)
    net.train()
    net(x)
    assert seen[-1] is False  # training keeps the default layout


def test_a_channels_last_weight_gives_the_same_outputs():
    """batch_classifier keeps its folded network's weights channels-last."""
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(6, 5, 3, 2, 1)
    fast = OnePixelConv2d(6, 5, 3, 2, 1).to(memory_format=torch.channels_last)
    fast.load_state_dict(plain.state_dict())
    assert fast.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 6, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(fast(x), plain(x), atol=1e-5)
