"""The optimizer step inside backward: each parameter's update runs the moment backward completes its
gradient, and that gradient is freed at once, so no moment of a training step holds every gradient.

    optimizer = attach(model, lambda params: AdamW(params, lr=3e-3, weight_decay=0.1))
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:     # before backward: the steps happen inside it
            group["lr"] = learning_rate(step)
        lm_loss(model, x, y).backward()          # every parameter stepped, no .grad left
        # no optimizer.step(), no zero_grad()

Each parameter gets an optimizer of its own (the class and keyword arguments a single optimizer
over all parameters would have), stepped in the parameter's post-accumulate-grad hook: the hook
runs once per backward, after every contribution to that parameter's gradient (a weight used
twice included) has been summed into .grad. AdamW's update of one parameter reads only that
parameter, its gradient and its state, so the per-parameter steps are the same arithmetic as one
step over all parameters: the same bits.

The update must be the last use of the gradient: no clipping by the norm of all gradients, no
accumulation over micro-batches, no reduction over processes (the training job refuses those
combinations in its configuration). Checkpoints hold the state dict of one optimizer over all
parameters (`InBackwardOptimizer.state_dict`), so a run resumes with or without the option.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
"""Builds the optimizer of a list of parameters (here always one), e.g. `lambda ps: AdamW(ps, lr=1e-3)`."""


class InBackwardOptimizer:
    """One optimizer per parameter, stepped inside backward; what a training loop holds in place of
    the optimizer. The loop sets the learning rate through `param_groups` before backward and
    calls neither step() nor zero_grad(): backward steps every parameter that gets a gradient
    (others keep no state, as with one optimizer) and leaves no gradient behind."""

    def __init__(self, params: Iterable[nn.Parameter], optimizer_factory: OptimizerFactory) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("InBackwardOptimizer: params is empty")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("InBackwardOptimizer: params lists a parameter twice")
        self.optimizers = [optimizer_factory([p]) for p in self.params]
        for optimizer in self.optimizers:
            if len(optimizer.param_groups) != 1 or len(optimizer.param_groups[0]["params"]) != 1:
                raise ValueError("InBackwardOptimizer: optimizer_factory must return an optimizer over exactly "
                                 "the one parameter it is given")
        self._handles = [p.register_post_accumulate_grad_hook(_step_and_free(optimizer))
                         for p, optimizer in zip(self.params, self.optimizers, strict=True) if p.requires_grad]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every per-parameter optimizer's one group (in `params` order): set "lr" in each before backward."""
        return [optimizer.param_groups[0] for optimizer in self.optimizers]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each hook set its parameter's .grad to None after the step."""

    def state_dict(self) -> dict[str, Any]:
        """The state dict one optimizer over `params` (one group, in this order) would have: "state" keyed
        by the parameter's index, "param_groups" one group of the shared hyperparameters."""
        hyper = self._shared_hyperparameters()
        state = {}
        for index, optimizer in enumerate(self.optimizers):
            own = optimizer.state_dict()["state"]
            if own:  # a parameter that never had a gradient has no state, as in one optimizer
                state[index] = own[0]
        return {"state": state, "param_groups": [{**hyper, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the state dict of one optimizer over `params` (its `state_dict()` or ours), each
        parameter's state into its own optimizer."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or list(groups[0]["params"]) != list(range(len(self.params))):
            found = [len(group["params"]) for group in groups]
            raise ValueError(f"InBackwardOptimizer.load_state_dict: expected one parameter group of "
                             f"{len(self.params)} parameters, got groups of {found}")
        hyper = {key: value for key, value in groups[0].items() if key != "params"}
        for index, optimizer in enumerate(self.optimizers):
            own = {0: state_dict["state"][index]} if index in state_dict["state"] else {}
            optimizer.load_state_dict({"state": own, "param_groups": [{**hyper, "params": [0]}]})

    def remove_hooks(self) -> None:
        """Detach from the parameters: later backwards leave gradients in .grad and step nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _shared_hyperparameters(self) -> dict[str, Any]:
        """The per-parameter groups' hyperparameters, which one group can hold only when all are equal."""
        first, *rest = ({key: value for key, value in group.items() if key != "params"}
                        for group in self.param_groups)
        for index, group in enumerate(rest, start=1):
            if group != first:
                differ = sorted(key for key in first.keys() | group.keys() if first.get(key) != group.get(key))
                raise ValueError(f"InBackwardOptimizer.state_dict: parameter {index} has other {', '.join(differ)} "
                                 "than parameter 0; one optimizer's state dict holds one value of each")
        return first


def _step_and_free(optimizer: torch.optim.Optimizer) -> Callable[[nn.Parameter], None]:
    def hook(param: nn.Parameter) -> None:
        optimizer.step()
        param.grad = None  # the gradient's memory goes back now, not at the end of the step

    return hook


def attach(model: nn.Module, optimizer_factory: OptimizerFactory) -> InBackwardOptimizer:
    """Step every parameter of `model` inside backward: an `InBackwardOptimizer` over
    `model.parameters()`, one `optimizer_factory([p])` per parameter, hooked into each parameter.

    After it, each `loss.backward()` is a whole optimizer step: set the learning rate in
    `param_groups` first, and call neither `step()` nor `zero_grad()`. Its `state_dict()` is that of
    `optimizer_factory(list(model.parameters()))`. `remove_hooks()` undoes it.
    """
    return InBackwardOptimizer(model.parameters(), optimizer_factory)
