"""Running under torchrun: which process this is, and the few collectives training and inference share.

`torchrun --nproc_per_node=N script.py ...` starts N copies of a script with RANK, WORLD_SIZE and the
rendezvous in the environment; `Ranks.from_environment` joins them (gloo on CPU, nccl on CUDA). Without
torchrun, `Ranks()` is a single process and every helper here is a no-op, so the scripts have one code path.

Work is split in contiguous row blocks (`Ranks.block`): every process holds the whole batch, computes its
block, and the blocks are put back together with a sum (`Ranks.assemble`), which is exact because each
row is written by one process and zero elsewhere.
"""
import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

from user_errors import UserError, first_line, launched_by_torchrun


class DeviceError(UserError, ValueError):
    """A --device that this machine cannot give; the message says what to use instead."""


def pick_device(choice, ranks=None):
    """The torch device for --device auto|cpu|cuda (this process's GPU under torchrun)."""
    if choice == "cpu":
        return "cpu"  # without importing torch: a CPU job on ONNX Runtime never needs it
    import torch
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available here: use --device cpu or auto")
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{ranks.local_rank}" if ranks is not None and ranks.active else "cuda"


class PeerLostError(RuntimeError):
    """Another process of the torchrun job stopped: this one cannot go on alone."""


@contextlib.contextmanager
def _collective():
    """A collective that fails means another process of the job is gone."""
    try:
        yield
    except RuntimeError as err:
        raise PeerLostError(first_line(err)) from None


@dataclass(frozen=True)
class Ranks:
    """This process's place in the torchrun job; the default is a process on its own."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world > 1

    @staticmethod
    def launched():
        """True under torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
        return launched_by_torchrun()

    @classmethod
    def from_environment(cls, device="cpu", timeout_s=600):
        """Join the torchrun job described by the environment (a single process without one)."""
        if not cls.launched():
            return cls()
        import torch.distributed as dist
        if not dist.is_initialized():
            backend = "nccl" if str(device).startswith("cuda") else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def block(self, n):
        """The rows [start, stop) of n that this process handles: contiguous, sizes differing by at most 1."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def assemble(self, part, n, start):
        """The (n, ...) tensor whose rows [start, start + len(part)) each process computed, on every process."""
        if not self.active:
            return part
        import torch
        full = torch.zeros((n,) + tuple(part.shape[1:]), dtype=part.dtype, device=part.device)
        full[start:start + part.shape[0]] = part
        self.all_reduce(full)
        return full

    def map_rows(self, fn, x):
        """fn over the rows of x, each process doing its block; the whole result on every process."""
        if not self.active:
            return fn(x)
        start, stop = self.block(x.shape[0])
        return self.assemble(fn(x[start:stop]), x.shape[0], start)

    def all_reduce(self, tensor):
        """In-place sum over the processes (no-op alone)."""
        if self.active:
            import torch.distributed as dist
            with _collective():
                dist.all_reduce(tensor)
        return tensor

    def sum_floats(self, values):
        """Sum of each float over the processes (statistics for the metrics)."""
        if not self.active:
            return list(values)
        import torch
        return self.all_reduce(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def gather(self, obj):
        """Every process's picklable `obj`, in rank order, on every process."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        with _collective():
            dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's picklable `obj` on every process."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj]
        with _collective():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn, errors=(), share=True):
        """fn() on rank 0 only, its result on every process (share=False: on rank 0 only); an error of a
        type in `errors` that it raises is raised on every process, so none waits forever."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except errors as err:
                error = err
        error = self.broadcast(error)
        if error is not None:
            raise error
        return self.broadcast(result) if share else result

    def close(self):
        if not self.active:
            return
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(net, ranks):
    """net in DistributedDataParallel when there are several processes (gradients averaged), else itself."""
    if not ranks.active:
        return net
    import torch
    device_ids = [ranks.local_rank] if next(net.parameters()).is_cuda else None
    # Buffers are not broadcast: GlobalBatchNorm2d keeps them equal, and a broadcast in every forward
    # would need every process to run every forward. (torch 2.14 warns that the flag will be renamed; its
    # replacement, forward_sync_buffers, would still sync at start-up, which is harmless but not yet needed.)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False)

