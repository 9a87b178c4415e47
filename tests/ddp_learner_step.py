"""Run by test_ddp.py, alone or under torchrun: one PPO update of a policy and one reward-model fit on a
fixed batch, each process computing its block of every minibatch; rank 0 writes the models' state and the
update's metrics to the file named on the command line.

Float64 and plain SGD, so that rounding cannot hide whether the maths agree: in float32, a different split
of the sums breaks near-ties of ResNet's max-pool the other way and routes some of conv1's gradient
elsewhere, and Adam's first step moves every weight by +-lr whatever the size of its gradient."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp import Ranks, wrap_ddp
from global_batchnorm import use_global_batchnorm
from learner import one_hot_rewards, reward_model_update
from models import PolicyModel, RewardModel
from ppo import ppo_update
from run_config import PPOConfig


def main(out):
    ranks = Ranks.from_environment()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(13, 3, 32, 32, generator=gen, dtype=torch.float64)
    answers = torch.randint(0, 2, (13,), generator=gen)
    rewards = one_hot_rewards(answers, 2).double() * torch.rand(13, 1, generator=gen, dtype=torch.float64)
    result = {}
    for name, model_cls in (("policy", PolicyModel), ("reward_model", RewardModel)):
        torch.manual_seed(0)
        model = model_cls(2).double()
        if ranks.active:
            use_global_batchnorm(model)
        net = wrap_ddp(model, ranks)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        step_gen = torch.Generator().manual_seed(2)
        if name == "policy":
            cfg = PPOConfig(update_epochs=2, num_minibatches=2, kl_coef=0.1)
            torch.manual_seed(5)
            reference = model_cls(2).double().requires_grad_(False)  # another start: KL to it is not 0
            if ranks.active:
                use_global_batchnorm(reference)
            for m in reference.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = 0.0
            stats = ppo_update(net, opt, x, rewards, cfg, reference=reference, generator=step_gen, ranks=ranks)
        else:
            stats = {"rm_loss": reward_model_update(net, opt, x, answers, 3, 10, step_gen, ranks)}
        result[name] = {k: v.clone() for k, v in model.state_dict().items()}
        result[name + "_stats"] = stats
    if ranks.is_main:
        torch.save(result, out)
    ranks.close()


if __name__ == "__main__":
    main(sys.argv[1])
