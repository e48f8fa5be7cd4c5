"""Exponential moving average of a model's weights (the weights the generators sample with)."""

import torch


class EMA:
    """Exponential moving average of a model's parameters; buffers are copied as they are.

    `warmup=True` uses min(decay, (1 + n) / (10 + n)) after n updates, so that short runs
    (the CPU demo) do not end with weights still close to the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = False):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in _state_tensors(model).items()}
        self._param_names = {k for k, _ in model.named_parameters()}

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        decay = self.current_decay()
        self.num_updates += 1
        for name, value in _state_tensors(model).items():
            shadow = self.shadow[name]
            if name in self._param_names and value.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), 1.0 - decay)
            else:
                shadow.copy_(value.detach())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict):
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", False))
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module):
        for name, value in _state_tensors(model).items():
            value.copy_(self.shadow[name])


def _state_tensors(model):
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return tensors
