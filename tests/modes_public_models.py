"""Small models written the way public code writes them, exercising what capture and modes got
wrong before: in-place buffer updates, random ops in forward, Python control flow on
``self.training``, BatchNorm with ``momentum=None``. Used by tests/test_modes_public.py."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class StepCounter(nn.Module):
    """``self.step += 1`` on a registered buffer, and a warm-up that reads it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.step += 1
        return self.lin(x) * torch.clamp(self.step.float() / 10.0, max=1.0)


class EMANorm(nn.Module):
    """An EMA of the batch mean, updated under no_grad in train mode, read in eval mode."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.register_buffer("ema", torch.zeros(8))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = self.lin(x)
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * h.mean(0))
                self.seen.add_(1)
            return h - h.mean(0)
        return h - self.ema


class CumulativeBN(nn.Module):
    """BatchNorm with ``momentum=None``: a cumulative average driven by num_batches_tracked."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8, momentum=None)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.lin(x))))


class RandomOps(nn.Module):
    """Random draws in forward: a rand_like feature mask, bernoulli, F.dropout on self.training,
    alpha_dropout."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x):
        if self.training:
            x = x * (torch.rand_like(x) > 0.2).float()
        h = torch.selu(self.a(x))
        h = F.alpha_dropout(h, 0.1, training=self.training)
        keep = torch.bernoulli(torch.full_like(h, 0.9))
        h = F.dropout(h * keep, p=0.25, training=self.training)
        return self.b(h)


class TrainingBranch(nn.Module):
    """Data-independent Python control flow on ``self.training`` (auxiliary loss term in train)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.aux = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.enc(x))
        if self.training:
            return self.head(h) + 0.1 * self.aux(h.detach() * 2)
        return torch.sigmoid(self.head(h))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


MODELS = {
    "step_counter": StepCounter,
    "ema_buffer": EMANorm,
    "bn_momentum_none": CumulativeBN,
    "random_ops": RandomOps,
    "training_branch": TrainingBranch,
    "plain": Plain,
}
