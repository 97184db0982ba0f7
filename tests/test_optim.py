"""qlorakit.optim: PagedAdamW / PagedAdam held to torch.optim.AdamW / Adam.

On the CPU the optimizers run torch's own op sequence, so the tests expect the very same
parameters as torch (and assert the 1e-6 relative bound the contract names); the update
kernel's exact source runs on the CPU through the CUDA emulation shim and is held to the CPU
path; the ``gpu`` tests repeat the comparisons on CUDA with the states in managed memory.
"""

from __future__ import annotations

import gc
import io
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn

from qlorakit.optim import PagedAdam, PagedAdamW
from qlorakit.optim.update import KERNEL_FILE, KERNEL_NAME, AdamStep, cpu_update, kernel_arguments

TOLERANCE = 1e-6  # the contract: parameters match torch to 1e-6, relative


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # conftest skips gpu tests without GPU or CuPy


def _mlp(device: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(1234)
    model = nn.Sequential(nn.Linear(7, 33), nn.Tanh(), nn.Linear(33, 17), nn.Tanh(), nn.Linear(17, 5))
    return model.to(device=device, dtype=dtype)


def _batches(steps: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four fixed batches of a teacher network's outputs, cycled: a smooth regression, so that
    a last-bit difference in one update is not amplified by chasing noise. (Measured over 200
    steps: fitting random targets at lr 3e-3, torch in float32 drifted from torch in float64 by
    up to 7e-6; on these batches at lr 1e-3 by up to 2e-6, while the CUDA kernel's arithmetic,
    emulated on the CPU, stayed within 2.1e-7 of torch's CPU ops.)"""
    generator = torch.Generator().manual_seed(99)
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 5))
    inputs = torch.randn(4, 16, 7, generator=generator)
    with torch.no_grad():
        targets = teacher(inputs)
    return [(inputs[i % 4].to(device), targets[i % 4].to(device)) for i in range(steps)]


def _relative_deviation(ours: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """The largest ``max|ours - ref| / max|ref|`` over the tensors (0.0 means bit-identical)."""
    worst = 0.0
    for a, b in zip(ours, reference, strict=True):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        scale = b.abs().max().item() or 1.0
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


def _through_bytes(obj: dict) -> dict:
    """``obj`` saved with torch.save and loaded back, as a checkpoint would be."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train(
    model: nn.Module,
    make_optimizer: Callable[[], torch.optim.Optimizer],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    reload_at: int | None = None,
    clip: float | None = None,
    make_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
) -> torch.optim.Optimizer:
    optimizer = make_optimizer()
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    for index, (x, y) in enumerate(batches):
        if index == reload_at:
            # A checkpoint round trip through bytes, into a fresh optimizer (and scheduler).
            saved = _through_bytes(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler and scheduler.state_dict()}
            )
            optimizer = make_optimizer()
            if scheduler is not None and make_scheduler is not None:
                scheduler = make_scheduler(optimizer)
                scheduler.load_state_dict(saved["scheduler"])
            optimizer.load_state_dict(saved["optimizer"])
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return optimizer


PAIRS = {"AdamW": (PagedAdamW, torch.optim.AdamW), "Adam": (PagedAdam, torch.optim.Adam)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reload_at", [None, 100], ids=["straight", "reload@100"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["wd0", "wd0.05"])
@pytest.mark.parametrize("kind", ["AdamW", "Adam"])
def test_200_steps_match_torch(kind: str, weight_decay: float, reload_at: int | None, device: str) -> None:
    ours_cls, torch_cls = PAIRS[kind]
    batches = _batches(200, device)
    ours, reference = _mlp(device), _mlp(device)
    kwargs = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": weight_decay}
    _train(ours, lambda: ours_cls(ours.parameters(), **kwargs), batches, reload_at=reload_at)
    _train(reference, lambda: torch_cls(reference.parameters(), **kwargs), batches)
    deviation = _relative_deviation(list(ours.parameters()), list(reference.parameters()))
    assert deviation <= TOLERANCE, f"max relative deviation {deviation:.3e}"
    if device == "cpu":
        assert deviation == 0.0  # the CPU path is torch's own op sequence
    moved = _relative_deviation(list(ours.parameters()), list(_mlp(device).parameters()))
    assert moved > 1e-3  # the comparison is not vacuous: training changed the parameters


@pytest.mark.parametrize("device", DEVICES)
def test_scheduler_clipping_and_param_groups_match_torch(device: str) -> None:
    batches = _batches(60, device)

    def groups(model: nn.Module) -> list[dict]:
        layers = list(model)
        return [
            {"params": layers[0].parameters(), "lr": 5e-3, "weight_decay": 0.1},
            {"params": [*layers[2].parameters(), *layers[4].parameters()], "betas": (0.8, 0.95)},
        ]

    def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[10])

    ours, reference = _mlp(device), _mlp(device)
    optimizer = _train(
        ours,
        lambda: PagedAdamW(groups(ours), lr=2e-3),
        batches,
        reload_at=30,
        clip=0.05,
        make_scheduler=scheduler,
    )
    torch_optimizer = _train(
        reference, lambda: torch.optim.AdamW(groups(reference), lr=2e-3), batches, clip=0.05, make_scheduler=scheduler
    )
    deviation = _relative_deviation(list(ours.parameters()), list(reference.parameters()))
    assert deviation <= TOLERANCE, f"max relative deviation {deviation:.3e}"
    # The schedule really ran (and was restored): the learning rates are the decayed ones.
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in torch_optimizer.param_groups]
    assert optimizer.param_groups[0]["lr"] < 5e-3 / 2


@pytest.mark.parametrize("device", DEVICES)
def test_parameters_without_gradients_are_skipped(device: str) -> None:
    model = _mlp(device)
    unused = nn.Parameter(torch.randn(4, 4, device=device))
    frozen = model[2].weight
    frozen.requires_grad_(False)
    before = {"unused": unused.detach().clone(), "frozen": frozen.detach().clone()}
    optimizer = PagedAdamW([*model.parameters(), unused], lr=1e-2)
    _train(model, lambda: optimizer, _batches(3, device))
    assert torch.equal(unused, before["unused"]) and torch.equal(frozen, before["frozen"])
    assert unused not in optimizer.state and frozen not in optimizer.state
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(optimizer.state[p]["step"].item() == 3.0 for p in trained)
    assert len(optimizer.state_dict()["state"]) == len(trained)


def _shadow_reference(param: torch.Tensor, grads: Sequence[torch.Tensor], **kwargs: float) -> torch.Tensor:
    """The mixed-precision contract spelled with torch: each step, a float32 copy of the
    half-precision parameter takes one torch.optim.AdamW step (float32 moments) and is
    rounded back into the parameter once."""
    param = param.detach().clone()
    shadow = nn.Parameter(param.float())
    optimizer = torch.optim.AdamW([shadow], **kwargs)
    for grad in grads:
        shadow.data.copy_(param.float())
        shadow.grad = grad.float()
        optimizer.step()
        param.copy_(shadow.detach())
    return param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_parameters_use_float32_states(dtype: torch.dtype, device: str) -> None:
    generator = torch.Generator().manual_seed(5)
    initial = torch.randn(37, 29, generator=generator).to(dtype)
    grads = [torch.randn(37, 29, generator=generator).to(dtype) for _ in range(40)]
    kwargs = {"lr": 1e-2, "weight_decay": 0.1}

    param = nn.Parameter(initial.clone().to(device))
    optimizer = PagedAdamW([param], **kwargs)
    for index, grad in enumerate(grads):
        if index == 20:  # the float32 moments survive a save/load round trip
            saved = optimizer.state_dict()
            optimizer = PagedAdamW([param], **kwargs)
            optimizer.load_state_dict(saved)
        param.grad = grad.to(device)
        optimizer.step()

    state = optimizer.state[param]
    assert param.dtype == dtype
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    expected = _shadow_reference(initial, grads, **kwargs)
    # Same float32 math, one rounding: identical (a different float32 last bit could at
    # most flip one rounding to the half type, hence the one-ulp bound as well).
    ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((param.detach().cpu().float() - expected.float()).abs() <= ulp).all()
    if device == "cpu":
        assert torch.equal(param.detach(), expected)


def test_state_dict_layout_and_exchange_with_torch() -> None:
    batches = _batches(40, "cpu")
    ours, reference = _mlp("cpu"), _mlp("cpu")
    optimizer = _train(ours, lambda: PagedAdamW(ours.parameters(), lr=1e-2), batches[:20])
    state_dict = optimizer.state_dict()
    first = state_dict["state"][0]
    assert set(first) == {"step", "exp_avg", "exp_avg_sq"}
    assert first["step"].dtype == torch.float32 and first["step"].item() == 20.0
    assert first["exp_avg"].dtype == torch.float32 and first["exp_avg"].shape == ours[0].weight.shape

    # Ours -> torch.optim.AdamW, and torch's -> ours: training continues identically.
    reference.load_state_dict(ours.state_dict())
    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    torch_optimizer.load_state_dict(_through_bytes(state_dict))
    _train(reference, lambda: torch_optimizer, batches[20:30])
    _train(ours, lambda: optimizer, batches[20:30])
    assert _relative_deviation(list(ours.parameters()), list(reference.parameters())) == 0.0

    optimizer = PagedAdamW(ours.parameters(), lr=1e-2)
    optimizer.load_state_dict(_through_bytes(torch_optimizer.state_dict()))
    _train(reference, lambda: torch_optimizer, batches[30:])
    _train(ours, lambda: optimizer, batches[30:])
    assert _relative_deviation(list(ours.parameters()), list(reference.parameters())) == 0.0


def test_rejects_what_it_does_not_implement() -> None:
    params = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="amsgrad"):
        PagedAdamW(params, amsgrad=True)
    with pytest.raises(ValueError, match="learning rate"):
        PagedAdam(params, lr=-1.0)
    with pytest.raises(ValueError, match="beta"):
        PagedAdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="amsgrad"):  # an amsgrad checkpoint from torch
        amsgrad = torch.optim.AdamW(params, amsgrad=True)
        params[0].grad = torch.ones(3)
        amsgrad.step()
        PagedAdamW(params).load_state_dict(amsgrad.state_dict())

    double = nn.Parameter(torch.randn(3, dtype=torch.float64))
    double.grad = torch.ones_like(double)
    with pytest.raises(TypeError, match="float64"):
        PagedAdamW([double]).step()

    embedding = nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        PagedAdamW(embedding.parameters()).step()

    optimizer = PagedAdamW(params)
    optimizer.step()  # a state of shape (3,)
    with pytest.raises(ValueError, match="shape"):
        PagedAdamW([nn.Parameter(torch.randn(4))]).load_state_dict(optimizer.state_dict())


# --- the update kernel's exact source, run on the CPU ---------------------------------------

_KERNEL_TYPES = {
    torch.float32: ("float", np.float32),
    torch.bfloat16: ("__nv_bfloat16", np.uint16),  # numpy has no bf16: pass the raw bits
    torch.float16: ("__half", np.float16),
}


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16).copy()
    return tensor.numpy().copy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _fma(a: np.ndarray | np.float32, b: np.ndarray | np.float32, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add: the product of two floats is exact in double, then one rounding
    of the sum (to double, then float: a double rounding that is off only on exact ties of float
    midpoints, which these random inputs do not produce)."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32)


def _reference_math(param: torch.Tensor, grad: torch.Tensor, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, s: AdamStep):
    """The update as the kernel's header spells it, in numpy float32 (every op correctly rounded):
    returns the new parameter (in its dtype) and updates the moments in place."""
    grad_wd, param_scale, w1, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step = kernel_arguments(s)
    p, g = param.float().numpy().copy(), grad.float().numpy().copy()
    if grad_wd != 0:
        g = _fma(p, grad_wd, g)
    if param_scale != 1:
        p = p * param_scale
    small = -0.5 < w1 < 0.5
    exp_avg[:] = _fma(w1 if small else w1 - np.float32(1), g - exp_avg, exp_avg if small else g)
    exp_avg_sq[:] = _fma(one_minus_beta2 * g, g, exp_avg_sq * beta2)
    p = p + (neg_step * exp_avg) / (np.sqrt(exp_avg_sq) / bc2_sqrt + eps)
    return torch.from_numpy(p).to(param.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    ("decoupled", "weight_decay", "betas"),
    [(True, 0.1, (0.9, 0.999)), (False, 0.1, (0.9, 0.999)), (True, 0.0, (0.3, 0.9))],
    ids=["adamw", "adam-l2", "no-decay-large-lerp-weight"],
)
def test_kernel_emulation_matches_reference_math(
    dtype: torch.dtype, decoupled: bool, weight_decay: float, betas: tuple[float, float]
) -> None:
    from helpers.kernel_emulation import build, compiler_available

    if not compiler_available():
        pytest.skip("the CPU emulation needs a host C++ compiler")
    c_type, np_type = _KERNEL_TYPES[dtype]
    module = build(KERNEL_FILE, {"QK_PARAM_T": c_type})
    generator = torch.Generator().manual_seed(11)
    n = 1000  # grid 3 x block 64 < n: the grid-stride loop runs several rounds and a tail
    initial = (torch.randn(n, generator=generator) * 0.5).to(dtype)
    # Three runs of the same steps: the emulated kernel, the reference math, the CPU path (torch ops).
    emulated = [_as_numpy(initial), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    reference = [initial.clone(), np.zeros(n, np.float32), np.zeros(n, np.float32)]
    cpu = [initial.clone(), torch.zeros(n), torch.zeros(n)]
    for step in range(1, 8):
        grad = (torch.randn(n, generator=generator) * 10.0 ** (step % 3 - 1)).to(dtype)
        grad[:3] = 0.0  # zero gradients: the moments decay, the denominators approach eps
        scalars = AdamStep(
            lr=1e-2,
            beta1=betas[0],
            beta2=betas[1],
            eps=1e-8,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled,
            step=float(step),
        )
        args = [emulated[0], _as_numpy(grad), emulated[1], emulated[2], np.int64(n), *kernel_arguments(scalars)]
        assert emulated[0].dtype == np_type
        module.launch(KERNEL_NAME, (3,), (64,), args)
        reference[0] = _reference_math(reference[0], grad, reference[1], reference[2], scalars)
        cpu_update(cpu[0], grad, cpu[1], cpu[2], scalars)

    got = [_from_numpy(emulated[0], dtype), torch.from_numpy(emulated[1]), torch.from_numpy(emulated[2])]
    assert (got[0] != initial).float().mean().item() > 0.9  # the steps moved the parameter
    # The kernel is the reference math, to the bit ...
    assert torch.equal(got[0], reference[0])
    assert np.array_equal(emulated[1], reference[1]) and np.array_equal(emulated[2], reference[2])
    # ... and agrees with torch's CPU ops, which differ in the last bit where torch's float32 sqrt
    # (MKL's on x86 builds) is not correctly rounded.
    deviation = _relative_deviation(got, cpu)
    assert deviation <= TOLERANCE, f"max relative deviation {deviation:.3e}"


# --- CUDA: managed memory -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.gpu
def test_cuda_states_live_in_managed_memory(dtype: torch.dtype) -> None:
    import cupy

    from qlorakit.optim.managed import managed_buffer, prefetch_to_device

    param = nn.Parameter(torch.randn(300, 7, device="cuda", dtype=dtype))
    param.grad = torch.randn_like(param)
    optimizer = PagedAdamW([param], lr=1e-2)
    optimizer.step()
    state = optimizer.state[param]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    assert exp_avg.is_cuda and exp_avg.dtype == torch.float32 and exp_avg.shape == param.shape
    buffer = managed_buffer(exp_avg)
    assert buffer is not None and managed_buffer(exp_avg_sq) is buffer  # one allocation per parameter
    assert exp_avg.untyped_storage().data_ptr() == buffer.memory.ptr  # wrapped, not copied
    assert isinstance(buffer.memory.mem, cupy.cuda.memory.ManagedMemory)
    attributes = cupy.cuda.runtime.pointerGetAttributes(buffer.memory.ptr)
    # cudaMemoryTypeManaged; CuPy names the field ``type`` (older releases: ``isManaged``)
    assert getattr(attributes, "type", None) == 3 or getattr(attributes, "isManaged", 0) == 1
    assert prefetch_to_device(exp_avg)
    assert exp_avg.abs().sum().item() > 0 and exp_avg_sq.min().item() > 0

    # The allocation lives as long as a tensor on it does, and not longer.
    pointer = buffer.memory.ptr
    expected = exp_avg_sq.clone()
    del optimizer, state, exp_avg, buffer
    gc.collect()
    assert torch.equal(exp_avg_sq, expected)
    del exp_avg_sq
    gc.collect()
    from qlorakit.optim import managed

    assert pointer not in managed._BUFFERS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_kernel_matches_cpu_path_step_by_step(dtype: torch.dtype) -> None:
    """Same gradients on both devices: the fused kernel and the CPU path (torch ops) agree over
    30 steps with a save/load round trip in between."""
    from qlorakit.optim.managed import managed_buffer

    generator = torch.Generator().manual_seed(3)
    initial = torch.randn(513, 65, generator=generator).to(dtype)
    on_gpu, on_cpu = nn.Parameter(initial.cuda()), nn.Parameter(initial.clone())
    gpu_optimizer, cpu_optimizer = PagedAdamW([on_gpu], lr=1e-2), PagedAdamW([on_cpu], lr=1e-2)
    for step in range(30):
        grad = torch.randn(initial.shape, generator=generator).to(dtype)
        on_gpu.grad, on_cpu.grad = grad.cuda(), grad
        gpu_optimizer.step()
        cpu_optimizer.step()
        if step == 14:
            saved = gpu_optimizer.state_dict()
            assert all(not t.is_cuda for s in saved["state"].values() for t in s.values())
            gpu_optimizer = PagedAdamW([on_gpu], lr=1e-2)
            gpu_optimizer.load_state_dict(saved)
            assert managed_buffer(gpu_optimizer.state[on_gpu]["exp_avg"]) is not None
    gpu_state, cpu_state = gpu_optimizer.state[on_gpu], cpu_optimizer.state[on_cpu]
    deviation = _relative_deviation(
        [on_gpu, gpu_state["exp_avg"], gpu_state["exp_avg_sq"]], [on_cpu, cpu_state["exp_avg"], cpu_state["exp_avg_sq"]]
    )
    assert deviation <= TOLERANCE, f"max relative deviation {deviation:.3e}"
