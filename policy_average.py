"""The model a person takes home: an exponential moving average of the policy's weights over its updates
(`--policy-ema`, Polyak averaging), not the last update's weights, which carry the noise of the last few batches.
With `debias` (`--policy-ema-debias`, Adam's bias correction) the t-th update weighs (1 - decay) / (1 - decay^t):
an equal average of the updates so far while t is small, so a long horizon does not keep the first update's weights.

    average = PolicyAverage(policy, decay=0.995, debias=True)   # decay 0: the policy itself is served
    average.update()                                            # after every policy update
    average.served()                                            # checkpoint.pt's "policy", inference and export

BatchNorm buffers are averaged with the weights (so a checkpoint written mid-epoch holds sane statistics) and are
recomputed over the pool at every epoch end with the policy's (Learner.recompute_batchnorm).
"""
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def debiased_ema(decay):
    """The multi_avg_fn of an exponential moving average whose t-th update weighs (1 - decay) / (1 - decay^t)."""
    def update(averaged, current, num_averaged):
        rate = (1.0 - decay) / (1.0 - decay ** (int(num_averaged) + 1))
        get_ema_multi_avg_fn(1.0 - rate)(averaged, current, num_averaged)
    return update


class PolicyAverage:
    """An exponential moving average of a policy's weights and BatchNorm buffers, or the policy itself (decay 0)."""

    def __init__(self, policy, decay, debias=False):
        self.policy, self.average = policy, None
        if decay > 0:
            rule = debiased_ema(float(decay)) if debias else get_ema_multi_avg_fn(float(decay))
            self.average = AveragedModel(policy, multi_avg_fn=rule, use_buffers=True)
            self.average.requires_grad_(False).eval()

    def update(self):
        """Fold the policy's weights after an update into the average (the first update is copied)."""
        if self.average is not None:
            self.average.update_parameters(self.policy)

    def served(self):
        """The model to serve: the average once it has seen an update, else the policy."""
        if self.average is None or int(self.average.n_averaged) == 0:
            return self.policy
        return self.average.module

    def state_dict(self):
        """What a checkpoint keeps beside the served weights: how many updates the average holds."""
        return {"n_averaged": 0 if self.average is None else int(self.average.n_averaged)}

    def load(self, served_state, state):
        """Resume the average from a checkpoint's served weights and its state_dict(); an older checkpoint (no
        state) starts a fresh average at the next update."""
        if self.average is None or not state or not state.get("n_averaged"):
            return
        self.average.module.load_state_dict(served_state)
        self.average.n_averaged.fill_(int(state["n_averaged"]))

