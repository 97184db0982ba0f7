"""PagedAdam / PagedAdamW: torch.optim.Adam / AdamW whose states live in CUDA managed memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from qlorakit.optim.managed import managed_zeros
from qlorakit.optim.update import KERNEL_PARAM_TYPES, AdamStep, cpu_update, cuda_update

_MOMENTS = ("exp_avg", "exp_avg_sq")


class PagedAdam(Optimizer):
    """Adam (torch.optim.Adam semantics: ``weight_decay`` is an L2 term added to the gradient)
    whose moments live in CUDA managed memory, so that they page out to host RAM instead of
    failing with out-of-memory when the GPU runs short, and page back in for the update.

    Arguments are torch's (``lr``, ``betas``, ``eps``, ``weight_decay``; ``amsgrad`` must stay
    False) and may differ per parameter group. Parameters may be float32, bfloat16 or float16;
    the moments are always float32 and the update is computed in float32, rounding a
    half-precision parameter once per step. On CUDA each parameter's two moments share one
    managed allocation, prefetched to the GPU before the parameter's fused update kernel
    (``kernels/cuda/paged_adamw.cu``); on the CPU the same math runs as torch ops on ordinary memory.

    State per parameter, under torch's names: ``step`` (a float32 CPU scalar tensor, as torch
    keeps it), ``exp_avg`` and ``exp_avg_sq`` (float32, the parameter's shape). Parameters
    whose ``grad`` is None are skipped and get no state. ``state_dict()`` holds CUDA states as
    ordinary CPU tensors; ``load_state_dict()`` puts them back in managed memory (and also
    accepts a torch.optim.Adam/AdamW state dict, and vice versa).
    """

    #: Adam adds the decay to the gradient; AdamW decays the parameter (decoupled).
    decoupled_weight_decay: ClassVar[bool] = False

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad}
        _check_hyperparameters(defaults, type(self).__name__)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_hyperparameters(group, type(self).__name__)
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[param]
                if not state:
                    self._init_state(param, state)
                state["step"] += 1
                scalars = AdamStep(
                    lr=float(group["lr"]),
                    beta1=float(beta1),
                    beta2=float(beta2),
                    eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]),
                    decoupled_weight_decay=self.decoupled_weight_decay,
                    step=state["step"].item(),
                )
                update = cuda_update if param.is_cuda else cpu_update
                update(param, param.grad, state["exp_avg"], state["exp_avg_sq"], scalars)
        return loss

    def _init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        _check_param(param, type(self).__name__)
        # A float32 CPU tensor, like torch's non-capturable Adam: state dicts stay interchangeable.
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"], state["exp_avg_sq"] = _zero_moments(param)

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with every CUDA (managed) state copied to an ordinary CPU tensor:
        saving it takes no device memory, and it loads anywhere."""
        state_dict = super().state_dict()
        state_dict["state"] = {
            key: {name: _to_host(value) for name, value in param_state.items()}
            for key, param_state in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads groups like torch does and states into float32 (managed memory on CUDA).

        torch's own loading would cast each moment to its parameter's dtype (losing the
        float32 moments of a bf16 parameter) and first copy it into ordinary device memory;
        so torch loads the parameter groups (validation, hooks) from a state dict with the
        states left out, and the states are restored here."""
        saved_states = state_dict["state"]
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        super().load_state_dict({**state_dict, "state": {}})
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            if saved_id in saved_states:
                self.state[param] = self._restore_state(param, saved_states[saved_id])

    def _restore_state(self, param: torch.Tensor, saved: dict[str, Any]) -> dict[str, Any]:
        name = type(self).__name__
        if "max_exp_avg_sq" in saved:
            raise ValueError(f"{name} cannot load an amsgrad state (max_exp_avg_sq)")
        missing = [key for key in ("step", *_MOMENTS) if key not in saved]
        if missing:
            raise ValueError(f"{name}: a saved parameter state lacks {', '.join(missing)}")
        _check_param(param, name)
        state = {key: value for key, value in saved.items() if key not in ("step", *_MOMENTS)}
        state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
        moments = _zero_moments(param)
        for key, moment in zip(_MOMENTS, moments, strict=True):
            value = saved[key]
            if not isinstance(value, torch.Tensor) or value.shape != param.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{name}: saved {key} has shape {shape}, the parameter {tuple(param.shape)}")
            moment.copy_(value)  # to float32, onto the device (into managed memory on CUDA)
            state[key] = moment
        return state


class PagedAdamW(PagedAdam):
    """AdamW (torch.optim.AdamW semantics: decoupled weight decay, ``p *= 1 - lr * wd`` before
    the Adam update; default ``weight_decay=1e-2``) with its moments in CUDA managed memory.
    Everything else is as in :class:`PagedAdam`."""

    decoupled_weight_decay: ClassVar[bool] = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def _check_hyperparameters(group: dict[str, Any], name: str) -> None:
    """torch's checks, plus the options these optimizers do not implement."""
    if group.get("amsgrad", False):
        raise ValueError(f"{name} does not support amsgrad=True (use torch.optim.AdamW(amsgrad=True))")
    if group.get("maximize", False):
        raise ValueError(f"{name} does not support maximize=True")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"{name}: a Tensor lr must have one element")
    beta1, beta2 = group["betas"]
    checks = (
        (float(lr) >= 0.0, f"invalid learning rate: {float(lr)}"),
        (group["eps"] >= 0.0, f"invalid epsilon value: {group['eps']}"),
        (0.0 <= beta1 < 1.0, f"invalid beta parameter at index 0: {beta1}"),
        (0.0 <= beta2 < 1.0, f"invalid beta parameter at index 1: {beta2}"),
        (group["weight_decay"] >= 0.0, f"invalid weight_decay value: {group['weight_decay']}"),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{name}: {message}")


def _check_param(param: torch.Tensor, name: str) -> None:
    if param.dtype not in KERNEL_PARAM_TYPES:
        supported = ", ".join(str(dtype) for dtype in KERNEL_PARAM_TYPES)
        raise TypeError(f"{name} updates {supported} parameters, not {param.dtype}")
    if param.device.type not in ("cpu", "cuda"):
        raise TypeError(f"{name} runs on CPU and CUDA parameters, not {param.device.type}")


def _zero_moments(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 exp_avg and exp_avg_sq shaped like ``param``: on CUDA two halves of one
    managed allocation (one prefetch and one set of advice per parameter), else ordinary."""
    if param.is_cuda:
        both = managed_zeros(2 * param.numel(), param.device).view(2, *param.shape)
        return both[0], both[1]
    return (
        torch.zeros(param.shape, dtype=torch.float32, device=param.device),
        torch.zeros(param.shape, dtype=torch.float32, device=param.device),
    )


def _to_host(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_cuda:
        return value.detach().to("cpu", copy=True)
    return value
