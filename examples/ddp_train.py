"""Distributed data-parallel training of a tiny MLP on synthetic data: a check that a multi-GPU job trains.

Every rank fits the same small MLP to its own shard of a synthetic regression problem (y = x @ W plus a
little noise), with PyTorch's DistributedDataParallel averaging the gradients.  It uses NCCL when CUDA is
available and gloo on CPUs, and reads everything it needs from the torchrun-style variables zmgpu gives each
rank (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK), so the same command works on one node or many.

One process per GPU, started by zmgpu itself (each gets one GPU, its own RANK and LOCAL_RANK):

    zmgpu submit --gpus 4 --per-gpu --interactive -- python examples/ddp_train.py

One process per node, with torchrun starting a worker per GPU of that node (single quotes, so that the
variables are expanded on the node, not here):

    zmgpu submit --gpus 8 --interactive 'torchrun --nnodes $NNODES --node_rank $NODE_RANK
        --nproc_per_node $LOCAL_WORLD_SIZE --master_addr $MASTER_ADDR --master_port $MASTER_PORT
        examples/ddp_train.py --steps 500'

Run directly (`python examples/ddp_train.py`) it trains alone, as a world of one.  Each rank prints its
progress; rank 0 ends with a line giving the final loss and the world size.  The exit status is 0 when the
loss went down and every rank ended with the same weights, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

INPUT_DIM = 32
OUTPUT_DIM = 4
NOISE = 0.01
WEIGHT_TOLERANCE = 1e-4  # ranks apply the same averaged gradients, so their weights agree to rounding


def get_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="Train a tiny MLP with DistributedDataParallel.")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per rank and step (default: 64)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden layer width (default: 128)")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate (default: 0.02)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress lines (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default: 0)")
    parser.add_argument("--init-timeout", type=float, default=300,
                        help="seconds to wait for every rank to join (default: 300)")
    return parser


def free_port() -> int:
    """A free TCP port on loopback, for a run outside any launcher."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous() -> tuple[int, int, int]:
    """RANK, WORLD_SIZE and LOCAL_RANK from the environment; a world of one when no launcher set them."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    return rank, world_size, local_rank


def pick_device(torch, local_rank: int):
    """This rank's GPU, or the CPU.

    Under torchrun a process sees all of its node's GPUs and LOCAL_RANK picks one; a process zmgpu started
    per GPU sees only its own, whatever its LOCAL_RANK: the modulo covers both.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def make_model(torch, hidden: int, seed: int):
    """The MLP, with the same initial weights on every rank (DDP also broadcasts rank 0's)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(INPUT_DIM, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, OUTPUT_DIM))


def batches(torch, args, rank: int, device):
    """An endless stream of (x, y) for this rank: its own samples of the one shared target map."""
    shared = torch.Generator().manual_seed(args.seed)
    target = torch.randn(INPUT_DIM, OUTPUT_DIM, generator=shared) / INPUT_DIM ** 0.5
    own = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)
    while True:
        x = torch.randn(args.batch_size, INPUT_DIM, generator=own)
        y = x @ target + NOISE * torch.randn(args.batch_size, OUTPUT_DIM, generator=own)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def world_mean(torch, dist, value: float, device) -> float:
    """The mean of ``value`` over all ranks."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def weights_agree(torch, dist, model, device) -> bool:
    """True when every rank holds the same weights (checked through their sums' spread)."""
    total = sum(p.detach().double().sum() for p in model.parameters()).to(device)
    low, high = total.clone(), total.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return (high - low).abs().item() <= WEIGHT_TOLERANCE * max(1.0, high.abs().item())


def train(torch, dist, args, rank: int, world_size: int, device) -> int:
    """The training loop; the exit status."""
    from torch.nn.parallel import DistributedDataParallel

    model = make_model(torch, args.hidden, args.seed).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = torch.nn.MSELoss()
    data = batches(torch, args, rank, device)
    first_loss = loss = None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = next(data)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x), y)
        loss.backward()  # DDP all-reduces the gradients here
        optimizer.step()
        if first_loss is None:
            first_loss = loss.item()
        if step % args.log_every == 0 or step == args.steps:
            print(f"[rank {rank}/{world_size}] step {step}/{args.steps} loss {loss.item():.5f}", flush=True)
    seconds = time.perf_counter() - start
    final, initial = world_mean(torch, dist, loss.item(), device), world_mean(torch, dist, first_loss, device)
    agree = weights_agree(torch, dist, model, device)
    if rank == 0:
        print(f"done: {args.steps} steps in {seconds:.1f} s, world size {world_size}, backend "
              f"{dist.get_backend()}, loss {initial:.5f} -> {final:.5f}, "
              f"weights {'identical on every rank' if agree else 'DIFFER between ranks'}", flush=True)
    return 0 if agree and final < initial else 1


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        print("PyTorch is not installed: nothing to train (pip install torch)", file=sys.stderr)
        return 1
    rank, world_size, local_rank = rendezvous()
    device = pick_device(torch, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    print(f"[rank {rank}/{world_size}] on {socket.gethostname()}, device {device}, backend {backend}, "
          f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(not set)')}, "
          f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=args.init_timeout))
    try:
        return train(torch, dist, args, rank, world_size, device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
