"""Optimizers and learning-rate schedules with torch.optim's exact update rules.

They update ``model.params`` in place from ``model.grads`` (filled by ``model.backward``), keyed
by torchvision's parameter names. Weight decay is L2 added to the gradient, as torch does;
``no_decay_bn_bias=True`` exempts batch-norm parameters and biases (torchvision's reference
``--norm-weight-decay 0.0 --bias-weight-decay 0.0``).

SGD (torch.optim.SGD):   g = grad + wd * p
                         buf = g (first step) | momentum * buf + (1 - dampening) * g
                         g = g + momentum * buf (nesterov) | buf;     p -= lr * g
RMSprop (torch.optim.RMSprop):
                         g = grad + wd * p;   v = alpha * v + (1 - alpha) * g^2
                         avg = sqrt(v - m^2) + eps with m = alpha*m + (1-alpha)*g if centered,
                               else sqrt(v) + eps
                         buf = momentum * buf + g / avg;  p -= lr * buf   (momentum > 0)
                         p -= lr * g / avg                               (momentum = 0)
torchvision's MobileNetV3 recipe uses RMSprop(alpha=0.9, eps=0.0316, momentum=0.9), lr 0.064,
wd 1e-5, StepLR(step_size=2, gamma=0.973) (torchvision ``references/classification/README.md``,
MobileNetV3 recipe): ``rmsprop_torchvision``.
"""

from __future__ import annotations

import numpy as np


def _is_norm_or_bias(model, key: str) -> bool:
    if key.endswith(".bias"):
        return True
    module = key.rsplit(".", 1)[0]
    return f"{module}.running_mean" in model.buffers       # a batch-norm layer


class Optimizer:
    """Shared bookkeeping: per-parameter weight decay, state, lr, (de)serialisation."""

    def __init__(self, model, lr: float, weight_decay: float = 0.0,
                 no_decay_bn_bias: bool = False):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {lr}, {weight_decay}")
        self.model, self.lr, self.initial_lr = model, float(lr), float(lr)
        self.weight_decay = {k: (0.0 if no_decay_bn_bias and _is_norm_or_bias(model, k)
                                 else float(weight_decay))
                             for k, _ in model.named_parameters()}
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self.steps = 0

    def _grad(self, key, p):
        g = self.model.grads.get(key)
        if g is None:
            return None
        wd = self.weight_decay[key]
        return g + wd * p if wd else g

    def step(self):
        for key, p in self.model.named_parameters():
            g = self._grad(key, p)
            if g is not None:                    # like torch: parameters without grad skip
                self._update(key, p, g.astype(p.dtype, copy=False))
        self.steps += 1

    def zero_grad(self):
        self.model.zero_grad()

    def state_dict(self) -> dict:
        flat = {"lr": np.array(self.lr), "initial_lr": np.array(self.initial_lr),
                "steps": np.array(self.steps)}
        for key, st in self.state.items():
            for name, v in st.items():
                flat[f"{name}/{key}"] = v
        return flat

    def load_state_dict(self, flat: dict):
        self.lr, self.initial_lr = float(flat["lr"]), float(flat["initial_lr"])
        self.steps = int(flat["steps"])
        self.state = {}
        params = dict(self.model.named_parameters())
        for k, v in flat.items():
            if "/" in k:
                name, key = k.split("/", 1)
                if key not in params:
                    raise ValueError(f"optimizer state for unknown parameter {key!r}")
                self.state.setdefault(key, {})[name] = np.array(v, dtype=params[key].dtype)


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening, nesterov, weight decay."""

    def __init__(self, model, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                 no_decay_bn_bias=False):
        super().__init__(model, lr, weight_decay, no_decay_bn_bias)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening = 0")
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov

    def _update(self, key, p, g):
        if self.momentum:
            st = self.state.setdefault(key, {})
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = g.copy()
            else:
                buf = st["momentum_buffer"]
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            buf = st["momentum_buffer"]
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g


class RMSprop(Optimizer):
    """torch.optim.RMSprop (torch's defaults: alpha 0.99, eps 1e-8, no momentum)."""

    def __init__(self, model, lr=0.01, alpha=0.99, eps=1e-8, momentum=0.0, centered=False,
                 weight_decay=0.0, no_decay_bn_bias=False):
        super().__init__(model, lr, weight_decay, no_decay_bn_bias)
        self.alpha, self.eps, self.momentum, self.centered = alpha, eps, momentum, centered

    def _update(self, key, p, g):
        st = self.state.setdefault(key, {})
        v = st.setdefault("square_avg", np.zeros_like(p))
        v *= self.alpha
        v += (1 - self.alpha) * g * g
        if self.centered:
            m = st.setdefault("grad_avg", np.zeros_like(p))
            m *= self.alpha
            m += (1 - self.alpha) * g
            avg = np.sqrt(v - m * m) + self.eps
        else:
            avg = np.sqrt(v) + self.eps
        if self.momentum > 0:
            buf = st.setdefault("momentum_buffer", np.zeros_like(p))
            buf *= self.momentum
            buf += g / avg
            p -= self.lr * buf
        else:
            p -= self.lr * (g / avg)


def rmsprop_torchvision(model, lr=0.064, weight_decay=1e-5, no_decay_bn_bias=False,
                        momentum=0.9) -> RMSprop:
    """RMSprop as torchvision's reference script builds it for MobileNetV3."""
    return RMSprop(model, lr=lr, alpha=0.9, eps=0.0316, momentum=momentum,
                   weight_decay=weight_decay, no_decay_bn_bias=no_decay_bn_bias)


class StepLR:
    """lr = initial_lr * gamma ** (epoch // step_size) (torch.optim.lr_scheduler.StepLR)."""

    def __init__(self, optimizer, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"step_size must be >= 1, got {step_size}")
        self.optimizer, self.step_size, self.gamma, self.epoch = optimizer, step_size, gamma, 0

    def step(self):
        self.epoch += 1
        if self.epoch % self.step_size == 0:      # torch multiplies in place at each boundary
            self.optimizer.lr *= self.gamma


class ExponentialLR:
    """lr = lr * gamma after every epoch (torch.optim.lr_scheduler.ExponentialLR)."""

    def __init__(self, optimizer, gamma: float):
        self.optimizer, self.gamma, self.epoch = optimizer, gamma, 0

    def step(self):
        self.epoch += 1
        self.optimizer.lr *= self.gamma
