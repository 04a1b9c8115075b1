"""Per-step optimizer-side work of an SSL method (scheduled weight decay, official lr curves), shared by DINO,
Leopart, SparK and the hybrid: the training loop owns the optimizer, so a method acts on it through a step pre-hook."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_GLOBAL_HOOKS: list[tuple[Any, Any]] = []  # (weakref to the method, hook handle)


class OptimizerControl:
    """Per-step optimizer-side work of a method, applied just before ``optimizer.step()``.

    The training loop builds the optimizer from ``method.param_groups(...)`` but does not hand it to the method.
    The method therefore registers a global ``torch.optim`` step pre-hook that acts only on an optimizer holding
    the method's own parameters (and does nothing for any other optimizer). A loop that calls
    ``method.attach_optimizer(optimizer)`` replaces the global hook by a hook on that optimizer. The hook reads
    the optimizer's *current* param groups every step, so it keeps working after a checkpoint resume replaced
    the group dicts. Subclasses implement :meth:`before_optimizer_step`.
    """

    _HOOK_STATE = ("_attached", "_global_handle", "_owned_cache")

    def _init_optimizer_control(self) -> None:
        self._attached = None
        self._global_handle = None

    def __getstate__(self):
        # hook handles and the weak cache are process-local (e.g. DataLoader workers pickling `views`)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k not in self._HOOK_STATE}

    def __setstate__(self, state):
        super().__setstate__(state) if hasattr(super(), "__setstate__") else self.__dict__.update(state)
        self._attached = None
        self._global_handle = None

    def _scheduled_decay_groups(self, named_params, weight_decay: float, no_decay) -> list[dict]:
        """Two groups (decayed, not decayed by `no_decay(name, p)`) whose weight decay the hook schedules."""
        decay, plain = [], []
        for name, p in named_params:
            if p.requires_grad:
                (plain if no_decay(name, p) else decay).append(p)
        self._wd_base = float(weight_decay)
        self._decay_ids = {id(p) for p in decay}
        self._register_optimizer_hook()
        groups = [{"params": decay, "weight_decay": float(weight_decay)}]
        if plain:
            groups.append({"params": plain, "weight_decay": 0.0})
        return groups

    def _register_optimizer_hook(self) -> None:
        if self._attached is not None or self._global_handle is not None:
            return
        # forget hooks of methods that no longer exist (never done from inside a step)
        for ref, handle in list(_GLOBAL_HOOKS):
            if ref() is None:
                handle.remove()
                _GLOBAL_HOOKS.remove((ref, handle))
        ref = weakref.ref(self)

        def hook(optimizer, args, kwargs):
            method = ref()
            if method is not None and method._attached is None and method._owns(optimizer):
                method.before_optimizer_step(optimizer)

        self._global_handle = register_optimizer_step_pre_hook(hook)
        _GLOBAL_HOOKS.append((ref, self._global_handle))

    def _owns(self, optimizer) -> bool:
        cache = self.__dict__.setdefault("_owned_cache", weakref.WeakKeyDictionary())
        if optimizer not in cache:
            anchor = self._anchor_param()
            cache[optimizer] = any(p is anchor for g in optimizer.param_groups for p in g["params"])
        return cache[optimizer]

    def attach_optimizer(self, optimizer) -> None:
        """Bind to ``optimizer`` explicitly (optional; the global hook finds it otherwise)."""
        self._attached = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_optimizer_step(opt))
        handle = getattr(self, "_global_handle", None)
        if handle is not None:
            handle.remove()
            self._global_handle = None

    def _anchor_param(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def before_optimizer_step(self, optimizer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
