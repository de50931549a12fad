"""Optimizers and schedules vs torch.optim: parameters after k steps (float64, 1e-10)."""

import numpy as np
import pytest
from support import RTOL64, assert_close, require_torch

import npmnv3
from npmnv3.optim import SGD, ExponentialLR, RMSprop, StepLR, rmsprop_torchvision


def twin(torch, seed=0):
    """An npmnv3 float64 model and torch tensors holding the same parameters."""
    model = npmnv3.mobilenet_v3_small(width_mult=0.5, num_classes=7, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed)
    for _k, p in model.named_parameters():           # BN weights/biases too: not all ones
        p += rng.standard_normal(p.shape) * 0.1
    tparams = {k: torch.from_numpy(p.copy()).requires_grad_() for k, p in
               model.named_parameters()}
    return model, tparams


def param_groups(torch, tparams, model, wd, no_decay):
    if not no_decay:
        return [{"params": list(tparams.values()), "weight_decay": wd}]
    decay, nodecay = [], []
    for k, t in tparams.items():
        is_bn = f"{k.rsplit('.', 1)[0]}.running_mean" in model.buffers
        (nodecay if k.endswith(".bias") or is_bn else decay).append(t)
    return [{"params": decay, "weight_decay": wd}, {"params": nodecay, "weight_decay": 0.0}]


def run(torch, make_ours, make_torch, sched=None, steps=5, no_decay=False, wd=1e-2, seed=0):
    model, tparams = twin(torch, seed)
    ours = make_ours(model)
    theirs = make_torch(param_groups(torch, tparams, model, wd, no_decay))
    s_ours = s_theirs = None
    if sched:
        s_ours, s_theirs = sched[0](ours), sched[1](theirs)
    rng = np.random.default_rng(seed + 1)
    for _ in range(steps):
        model.zero_grad()
        for k, p in model.named_parameters():
            g = rng.standard_normal(p.shape)
            model.grads[k] = g
            tparams[k].grad = torch.from_numpy(g.copy())
        ours.step()
        theirs.step()
        if sched:
            s_ours.step()
            s_theirs.step()
    for k, p in model.named_parameters():
        assert_close(k, p, tparams[k], np.float64, RTOL64)
    assert ours.lr == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-15)


@pytest.mark.parametrize("momentum, nesterov, dampening", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                           (0.9, True, 0.0), (0.9, False, 0.3)])
@pytest.mark.parametrize("no_decay", [False, True])
def test_sgd_matches_torch(momentum, nesterov, dampening, no_decay):
    torch = require_torch()
    kw = dict(lr=0.05, momentum=momentum, nesterov=nesterov, dampening=dampening)
    run(torch, lambda m: SGD(m, weight_decay=1e-2, no_decay_bn_bias=no_decay, **kw),
        lambda groups: torch.optim.SGD(groups, **kw), no_decay=no_decay)


@pytest.mark.parametrize("momentum, centered", [(0.0, False), (0.9, False), (0.5, True)])
def test_rmsprop_matches_torch(momentum, centered):
    torch = require_torch()
    kw = dict(lr=0.01, alpha=0.9, eps=1e-3, momentum=momentum, centered=centered)
    run(torch, lambda m: RMSprop(m, weight_decay=1e-2, **kw),
        lambda groups: torch.optim.RMSprop(groups, **kw))


def test_torchvision_recipe_rmsprop_with_step_and_exponential_schedules():
    torch = require_torch()
    # torchvision references/classification/train.py: RMSprop(eps=0.0316, alpha=0.9), StepLR.
    run(torch, lambda m: rmsprop_torchvision(m, lr=0.064, weight_decay=1e-5,
                                             no_decay_bn_bias=True),
        lambda groups: torch.optim.RMSprop(groups, lr=0.064, alpha=0.9, eps=0.0316,
                                           momentum=0.9),
        sched=(lambda o: StepLR(o, step_size=2, gamma=0.973),
               lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.973)),
        steps=6, no_decay=True, wd=1e-5)
    run(torch, lambda m: SGD(m, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
        sched=(lambda o: ExponentialLR(o, 0.9),
               lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)), steps=4)


def test_state_dict_resume_continues_exactly():
    """Two steps, save, restore into a fresh optimizer, two more == four uninterrupted."""
    rng = np.random.default_rng(5)
    grads = [{k: rng.standard_normal(p.shape) for k, p in
              npmnv3.mobilenet_v3_small(width_mult=0.5, seed=1).named_parameters()}
             for _ in range(4)]

    def train(split):
        model = npmnv3.mobilenet_v3_small(width_mult=0.5, seed=1, dtype=np.float64)
        opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3)
        for i, g in enumerate(grads):
            if i == split:
                state = {k: v.copy() for k, v in opt.state_dict().items()}
                opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3)   # a fresh one
                opt.load_state_dict(state)                # momentum buffers, lr, step count
            model.grads = dict(g)
            opt.step()
        return model.state_dict()

    a, b = train(split=None), train(split=2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bad_arguments():
    m = npmnv3.mobilenet_v3_small(width_mult=0.5)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(m, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        SGD(m, lr=-1)
    with pytest.raises(ValueError, match="step_size"):
        StepLR(SGD(m, lr=0.1), step_size=0)
