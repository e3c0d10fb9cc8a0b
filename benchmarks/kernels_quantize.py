"""Time XQuant's group-quantization kernels (Tomar et al., XQuant, arXiv 2508.10395): reference vs Triton.

Measured per bit width, at cache-like sizes (tokens x latent width, projected to `--out` columns):
- quantize_pack: PyTorch reference vs the Triton kernel;
- dequant_matmul: the reference (dequantize in PyTorch, then matmul), the unfused peer (Triton dequantize, then
  torch.matmul / cuBLAS) and the fused Triton kernel, for the per-token and the per-channel layout.

`--device cuda` times all paths (warm-up, torch.cuda.synchronize, median over repeats) after checking the Triton
outputs against the reference. `--device cpu` times the reference only: the Triton interpreter is a correctness
tool, not a speed measurement.

    python benchmarks/kernels_quantize.py --device cuda
    python benchmarks/kernels_quantize.py --device cpu --tokens 1024
    python benchmarks/kernels_quantize.py --device cpu --interpret --tokens 64 --latent 32 --out 16 --group 16 \
        --repeats 1 --warmup 0   # smoke-test of the Triton path under the interpreter; timings meaningless

`--json PATH` writes every time of the table (rows keyed "op/layout/int<bits>", times in ms, None for a path not
timed) and the setting (device, interpreter or not, sizes, versions).
"""

from __future__ import annotations

import argparse
import functools
import os

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _median_ms(fn, device: str, warmup: int, repeats: int) -> float:
    from hf_fastslow.evaluation.timing import interleave  # not at the top: see TRITON_INTERPRET in main()

    sync = torch.cuda.synchronize if device == "cuda" else None
    timing = interleave({"op": fn}, repeats=repeats, warmup=warmup, sync=sync, keep_values=False)
    return timing["op"].spread.median * 1e3


def _unfused(dequantize_fn, q, weight, bias, transposed):
    # The peer a fused kernel must beat: the Triton dequantize written to memory, then cuBLAS.
    a = dequantize_fn(q, weight.dtype)
    return torch.matmul(a.transpose(-1, -2) if transposed else a, weight) + bias


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:6.2f}x" if a is not None and b else "     -"


def _fmt(ms: float | None) -> str:
    return f"{ms:9.3f}" if ms is not None else "        -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--latent", type=int, default=192, help="quantized width (XQuant latent / d_kv)")
    parser.add_argument("--out", type=int, default=192, help="columns of the projection weight")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="activation/weight dtype (default: float16 on cuda, float32 on cpu)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--interpret", action="store_true",
                        help="with --device cpu: also run the Triton path under TRITON_INTERPRET=1, to check the "
                        "harness on a machine without a GPU (use tiny sizes; the times mean nothing)")
    parser.add_argument("--json", default=None, help="write every time of the table to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(1)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available; use --device cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    if args.interpret and device != "cpu":
        parser.error("--interpret is for --device cpu")
    use_triton = device == "cuda" or args.interpret
    if args.interpret:
        # Triton reads this when it decorates its own library functions too, so it must be set before anything
        # imports triton; hence the package imports below, not at the top of the file.
        os.environ["TRITON_INTERPRET"] = "1"
    from hf_fastslow.kernels.quantize import dequant_matmul_reference, quantize_pack_reference

    if use_triton:
        from hf_fastslow.kernels.quantize_triton import (
            dequant_matmul_triton,
            dequantize_triton,
            quantize_pack_triton,
        )
    if args.interpret:
        print("device: cpu under the Triton interpreter - a harness check: these times are NOT speed measurements")
    elif use_triton:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    else:
        print("device: cpu (1 thread) - reference path only: the Triton interpreter is not a speed measurement")
    print(f"tokens={args.tokens} latent={args.latent} out={args.out} group={args.group} dtype={dtype} "
          f"median of {args.repeats} after {args.warmup} warm-up runs; times in ms\n")

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.latent, generator=gen).to(device=device, dtype=dtype)
    x_channel = x.t().contiguous()  # (latent, tokens): per-channel layout, quantized along tokens
    weight = (torch.randn(args.latent, args.out, generator=gen) / args.latent ** 0.5).to(device=device, dtype=dtype)
    bias = torch.randn(args.out, generator=gen).to(device=device, dtype=dtype)

    report = {"benchmark": "kernels_quantize", "device": device, "interpret": args.interpret,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "timed_paths": "reference, unfused, triton" if use_triton else "reference",
              "dtype": str(dtype).replace("torch.", ""), "tokens": args.tokens, "latent": args.latent, "out": args.out,
              "group": args.group, "bits": args.bits, "warmup": args.warmup, "repeats": args.repeats,
              "torch": torch.__version__, "rows": {}}

    def record(op, layout, nbits, ref, peer, tri):
        report["rows"][f"{op}/{layout}/int{nbits}"] = dict(op=op, layout=layout, bits=nbits, reference_ms=ref,
                                                           unfused_ms=peer, triton_ms=tri)

    header = (f"{'op':<16}{'layout':<12}{'bits':>5}{'reference':>11}{'unfused':>11}{'triton':>11}"
              f"{'ref/triton':>12}{'unfused/triton':>16}")
    print(header)
    print("-" * len(header))
    for nbits in args.bits:
        timed = functools.partial(_median_ms, device=device, warmup=args.warmup, repeats=args.repeats)
        ref_q = timed(functools.partial(quantize_pack_reference, x, nbits, args.group))
        tri_q = None
        if use_triton:
            got, want = quantize_pack_triton(x, nbits, args.group), quantize_pack_reference(x, nbits, args.group)
            if not torch.equal(got.packed, want.packed):
                raise SystemExit(f"quantize_pack_triton differs from the reference at {nbits} bits")
            tri_q = timed(functools.partial(quantize_pack_triton, x, nbits, args.group))
        print(f"{'quantize_pack':<16}{'per-token':<12}{nbits:>5}{_fmt(ref_q):>11}{_fmt(None):>11}{_fmt(tri_q):>11}"
              f"{_ratio(ref_q, tri_q):>12}{_ratio(None, tri_q):>16}")
        record("quantize_pack", "per-token", nbits, ref_q, None, tri_q)

        for layout, src, transposed in (("per-token", x, False), ("per-channel", x_channel, True)):
            q = quantize_pack_reference(src, nbits, args.group)
            ref = timed(functools.partial(dequant_matmul_reference, q, weight, bias, transposed))
            peer = tri = None
            if use_triton:
                want = dequant_matmul_reference(q, weight, bias, transposed).float()
                got = dequant_matmul_triton(q, weight, bias, transposed).float()
                err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
                if err > 1e-2:
                    raise SystemExit(f"dequant_matmul_triton differs from the reference ({layout}, {nbits} bits): "
                                     f"relative error {err:.3g}")

                peer = timed(functools.partial(_unfused, dequantize_triton, q, weight, bias, transposed))
                tri = timed(functools.partial(dequant_matmul_triton, q, weight, bias, transposed))
            print(f"{'dequant_matmul':<16}{layout:<12}{nbits:>5}{_fmt(ref):>11}{_fmt(peer):>11}{_fmt(tri):>11}"
                  f"{_ratio(ref, tri):>12}{_ratio(peer, tri):>16}")
            record("dequant_matmul", layout, nbits, ref, peer, tri)

    if args.json:
        from hf_fastslow.evaluation.cli_support import write_report_json

        if use_triton:
            import triton

            report["triton"] = triton.__version__
        write_report_json(args.json, report)


if __name__ == "__main__":
    main()
