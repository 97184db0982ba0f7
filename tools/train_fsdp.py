"""QLoRA on several processes with qlorakit: the 4-bit base sharded by torch FSDP2, or replicated by DDP.

A complete example, and what tests/test_distributed.py and tools/bench_fsdp.py run. Launch as usual::

    torchrun --nproc-per-node 2 tools/train_fsdp.py PACKED_DIR --out runs/fsdp            # FSDP2 (default)
    torchrun --nproc-per-node 2 tools/train_fsdp.py PACKED_DIR --parallel ddp --out runs/ddp
    python tools/train_fsdp.py PACKED_DIR --accumulate 2 --out runs/single                 # one process
    accelerate launch --multi_gpu --num_processes 2 tools/train_fsdp.py PACKED_DIR --out runs/fsdp
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 tools/train_fsdp.py PACKED_DIR --out runs/acc

With ``--multi_gpu`` accelerate only starts the processes, as torchrun does, and the script shards the model
itself with ``fully_shard``. With an FSDP2 config (``--use_fsdp --fsdp_version 2`` or a config file with
``distributed_type: FSDP`` and ``fsdp_version: 2``) the script goes through accelerate's own FSDP2 path
instead (``--parallel accelerate``, the default under such a launch): ``Accelerator.prepare(model,
optimizer)`` shards the model by the config's wrap policy, and ``Accelerator.backward`` runs the backward.
FSDP version 1 is refused (it flattens each group's parameters into one tensor of one dtype, which the uint8
codes and the float adapters cannot share). On GPUs the backend is NCCL and each rank takes
the GPU of its local rank; on the CPU it is gloo. The model is sharded with plain ``fully_shard``: each decoder
layer (the module classes transformers lists in ``model._no_split_modules``, as accelerate's FSDP wrap policy uses
them), the embeddings and the head (when not tied), then the whole model. Each step every rank runs
``--accumulate`` micro-batches; micro-batch ``i`` of a step is the same on any number of ranks, so one process
with ``--accumulate N`` computes what N ranks with 1 compute.

Writes into ``--out``: ``adapter/`` (PEFT's format, from rank 0), ``base/`` with ``--save-base`` (the 4-bit base
gathered from the shards, in bitsandbytes' format) and ``result.json`` (losses, the 4-bit bytes each rank holds,
peak, private and file-backed RSS per rank, step times).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import qlorakit
import qlorakit.distributed as qdist

#: The ways several ranks train: plain ``fully_shard``, DDP, accelerate's FSDP2 ``Accelerator.prepare``.
PARALLEL = ("fsdp", "ddp", "accelerate")


def _accelerate_fsdp_launch() -> bool:
    """Whether ``accelerate launch`` started this process with an FSDP config (it sets this variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packed", type=Path, help="packed 4-bit checkpoint directory (qlorakit quantize output)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument(
        "--parallel",
        choices=PARALLEL,
        default=None,
        help="with several ranks: fsdp (plain fully_shard), ddp, or accelerate (Accelerator.prepare with the FSDP2 "
        "plugin accelerate launch configured); default accelerate under an accelerate FSDP launch, else fsdp",
    )
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per rank and step (default 1)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch (default 2)")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8; alpha = 2 * rank)")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-base", action="store_true", help="also write the 4-bit base gathered from the shards")
    return parser


def _setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); a process group when launched by torchrun / accelerate."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _accelerator() -> Any:
    """accelerate's ``Accelerator`` with the FSDP2 plugin its launcher configured: refuses anything else, since
    the route exists to run accelerate's own FSDP2 preparation."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator()
    if accelerator.distributed_type != DistributedType.FSDP:
        raise SystemExit(
            f"--parallel accelerate needs an accelerate FSDP2 launch (accelerate launch --use_fsdp --fsdp_version 2, "
            f"or a config with distributed_type: FSDP); this process has {accelerator.distributed_type}"
        )
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise SystemExit(
            "accelerate's FSDP version 1 cannot shard a 4-bit model: it flattens each group's parameters into one "
            "tensor of one dtype, and the uint8 codes and the float adapters cannot share one; use --fsdp_version 2"
        )
    plugin = accelerator.state.fsdp_plugin
    if plugin.cpu_ram_efficient_loading:
        # accelerate's rank-0 loading moves the model to meta and reloads it from rank 0's state dict by parameter
        # name; bitsandbytes' 4-bit layout (``weight.absmax``, ``weight.quant_state...``) names no parameter, and
        # accelerate skips this loading for bitsandbytes' own 4-bit models too. It would save nothing here: every
        # rank memory-maps the packed file and fully_shard copies out only its own slice.
        plugin.cpu_ram_efficient_loading = False
        if accelerator.is_main_process:
            print("train_fsdp: fsdp_cpu_ram_efficient_loading turned off (each rank reads only its own shards)")
    return accelerator


def _shard(model: torch.nn.Module, device: torch.device, world: int) -> None:
    """Plain FSDP2: ``fully_shard`` on each decoder layer, then on the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise SystemExit(f"{type(model).__name__} lists no decoder layer classes (_no_split_modules)")
    # The embeddings and the head as their own groups too (unless tied: a shared parameter belongs to one group),
    # so that they are gathered only while used rather than held in full by the root from forward to backward.
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is not None and outputs.weight is not inputs.weight:
        layers += [inputs, outputs]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _fsdp_groups(model: torch.nn.Module) -> int:
    """How many modules ``fully_shard`` made FSDP2 groups (0 without FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in model.modules())


def _batches(args: argparse.Namespace, vocab: int, world: int) -> torch.Tensor:
    """``[steps, world * accumulate, micro_batch, seq_len]`` token ids, the same for any world size given the
    same number of micro-batches per step."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.steps, world * args.accumulate, args.micro_batch, args.seq_len)
    return torch.randint(3, vocab, shape, generator=generator)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_bytes() -> dict[str, int]:
    """This process's resident memory now: private (``RssAnon``) and file-backed (``RssFile``: pages of the
    memory-mapped checkpoint, shared with other processes and reclaimable)."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return {"private_bytes": fields.get("RssAnon", 0), "file_backed_bytes": fields.get("RssFile", 0)}


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.parallel is None:
        args.parallel = "accelerate" if _accelerate_fsdp_launch() else "fsdp"
    accelerator = _accelerator() if args.parallel == "accelerate" else None
    if accelerator is None:
        rank, world, device = _setup()
    else:  # the Accelerator set up the process group
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    compute_dtype = getattr(torch, args.compute_dtype)
    sharded = world > 1 and args.parallel in ("fsdp", "accelerate")
    # Under FSDP2 the model stays on the CPU, memory-mapped: fully_shard moves each module to the device as it
    # shards it, so a device never holds more than one full layer.
    load_device = torch.device("cpu") if sharded else device
    model = qlorakit.from_pretrained(args.packed, device=load_device, compute_dtype=compute_dtype)
    torch.manual_seed(args.seed)  # the same adapter initialization on every rank and in one process
    config = qlorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    qlorakit.add_lora(model, config)

    def adamw() -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    training = model
    if accelerator is not None:
        # accelerate's FSDP2 preparation shards the model in place (fully_shard by the plugin's wrap policy) and
        # swaps the optimizer's parameters for the sharded ones.
        model, optimizer = accelerator.prepare(model, adamw())
        training = model
    else:
        if sharded:
            _shard(model, device, world)
        elif world > 1:
            training = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = adamw()  # over the parameters as sharded
    held, total = qdist.quantized_bytes(model)
    groups = _fsdp_groups(model)
    data = _batches(args, model.config.vocab_size, world)
    losses, step_seconds, memory = [], [], []
    model.train()
    for step in range(args.steps):
        start = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for k in range(args.accumulate):
            ids = data[step, rank * args.accumulate + k].to(device)
            loss = training(input_ids=ids, labels=ids).loss / args.accumulate
            if accelerator is None:
                loss.backward()
            else:
                accelerator.backward(loss)
            step_loss += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(step_loss)
        losses.append(float(step_loss) / world)
        step_seconds.append(time.perf_counter() - start)
        memory.append(_memory_bytes())
    args.out.mkdir(parents=True, exist_ok=True)
    qdist.save_adapter(model, args.out / "adapter")
    if args.save_base:
        qdist.save_base_checkpoint(model, args.out / "base", force=True)
    per_rank = {
        "held_4bit_bytes": held,
        "peak_rss_bytes": _peak_rss_bytes(),
        "max_private_bytes": max(m["private_bytes"] for m in memory),
        "max_file_backed_bytes": max(m["file_backed_bytes"] for m in memory),
    }
    gathered = [per_rank]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, per_rank)
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return None
    result = {
        "world": world,
        "parallel": args.parallel if world > 1 else "none",
        "losses": losses,
        "step_seconds": step_seconds,
        "total_4bit_bytes": total,
        "fsdp_groups": groups,
        "ranks": gathered,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    result = run(build_parser().parse_args(argv))
    if result is not None:
        held = max(r["held_4bit_bytes"] for r in result["ranks"]) / result["total_4bit_bytes"]
        print(
            f"{result['parallel']} on {result['world']} rank(s): losses {[round(x, 4) for x in result['losses']]}, "
            f"4-bit base held per rank {held:.2f}x, peak RSS per rank "
            f"{[round(r['peak_rss_bytes'] / 2**20) for r in result['ranks']]} MiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
