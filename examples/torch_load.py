"""PyTorch CUDA load test: show what a job sees of Python, PyTorch and CUDA, then load every visible GPU.

Run it as a zmgpu job to check that the job gets exactly the GPUs it asked for, and that they compute:

    zmgpu submit --gpus 2 --interactive "python examples/torch_load.py --seconds 30"

Each visible GPU gets its own thread running back-to-back matrix multiplies for the given time, so all of them
are busy at once (watch them with nvidia-smi); each reports its own TFLOP/s.  Without PyTorch the script says
so and exits 0; without CUDA it says so and runs a short matrix multiply on the CPU instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass

CPU_MAX_SIZE = 1024  # the CPU fallback only shows that PyTorch computes; keep it short
CPU_MAX_SECONDS = 2.0
ENV_SHOWN = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "ZMGPU_JOB_ID", "ZMGPU_NODE_ID")


@dataclass
class LoadResult:
    """What one device achieved."""

    device: str
    matmuls: int = 0
    seconds: float = 0.0
    error: str | None = None

    def tflops(self, size: int) -> float:
        """Achieved rate: one n x n matmul is 2 n^3 floating-point operations."""
        return 2 * size ** 3 * self.matmuls / self.seconds / 1e12 if self.seconds else 0.0


def positive(kind):
    """An argparse type: ``kind`` (int or float) greater than zero."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    return convert


def get_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Report the CUDA environment and load each visible GPU.")
    parser.add_argument("--seconds", type=positive(float), default=10.0,
                        help="how long to load each GPU, in seconds (default: 10)")
    parser.add_argument("--size", type=positive(int), default=8192,
                        help="matrix side n of the n x n matrix multiply (default: 8192)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="element type on the GPU (default: float16); the CPU always uses float32")
    return parser


def report_environment(torch) -> None:
    """Print versions, CUDA availability, the variables zmgpu sets, and each visible GPU."""
    print(f"PyTorch {torch.__version__}, built for CUDA {torch.version.cuda or 'none (CPU-only build)'}")
    print(f"CUDA available: {'yes' if torch.cuda.is_available() else 'no'}")
    for name in ENV_SHOWN:
        print(f"{name}={os.environ.get(name, '(not set)')}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"GPU {index}: {props.name}, {props.total_memory / 2 ** 30:.1f} GiB")


def load(torch, device: str, size: int, seconds: float, dtype, result: LoadResult) -> None:
    """Multiply two random matrices on ``device`` back to back for ``seconds``; fill in ``result``."""
    try:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda _device: None)
        torch.mm(a, b)  # warm-up: the first call pays for kernel selection
        sync(device)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            sync(device)  # wait for the kernel, so the clock measures work done, not work queued
            result.matmuls += 1
        result.seconds = time.perf_counter() - start
    except RuntimeError as exc:  # out of memory, a GPU fault: report it with the device, not as a traceback
        result.error = str(exc).splitlines()[0]


def run_load(torch, args) -> int:
    """Load every visible GPU at once (one thread each), or the CPU briefly; print each rate."""
    if torch.cuda.is_available():
        devices = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
        size, seconds, dtype = args.size, args.seconds, getattr(torch, args.dtype)
    else:
        print("CUDA is not available: running a short matrix multiply on the CPU instead")
        devices = ["cpu"]
        size, seconds, dtype = min(args.size, CPU_MAX_SIZE), min(args.seconds, CPU_MAX_SECONDS), torch.float32
    print(f"load: {size}x{size} {str(dtype).replace('torch.', '')} matmul for {seconds:g} s on {len(devices)} "
          f"device(s)", flush=True)
    results = [LoadResult(device) for device in devices]
    threads = [threading.Thread(target=load, args=(torch, r.device, size, seconds, dtype, r)) for r in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for r in results:
        if r.error:
            print(f"{r.device}: failed: {r.error}")
        else:
            print(f"{r.device}: {r.matmuls} matmuls in {r.seconds:.2f} s: {r.tflops(size):.2f} TFLOP/s")
    return 1 if any(r.error for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    print(f"Python {platform.python_version()} ({sys.executable}) on {platform.node()}")
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: nothing to load (pip install torch)")
        return 0
    report_environment(torch)
    return run_load(torch, args)


if __name__ == "__main__":
    sys.exit(main())
