"""BatchNorm whose statistics span every process of a torchrun job: a model trained by several processes
learns what one process holding the whole batch would (torch.nn.SyncBatchNorm is GPU-only)."""
import torch
import torch.distributed as dist


class _SumOverProcesses(torch.autograd.Function):
    """Sum of a tensor over the processes whose gradient is the sum of the gradients (each process's loss
    depends on every process's share)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch across every process, on CPU as on GPU
    (torch.nn.SyncBatchNorm is GPU-only). The sum goes through an autograd-aware all_reduce, so gradients are
    those of one process holding the whole batch. Same parameters and buffers as BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        count = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        stats = _SumOverProcesses.apply(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


def use_global_batchnorm(module):
    """Turn every BatchNorm2d in `module` into a GlobalBatchNorm2d, in place (state dicts stay compatible)."""
    for m in module.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
    return module
