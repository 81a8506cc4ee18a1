"""GPU placement as pure functions over plain data, so unit tests need no sockets.

Policy in this version: first-come first-served.  A job that asks for more
GPUs than one node has free spans several nodes, all or nothing (gang).  Pinned
jobs (``--node-gpu-ids``) wait for exactly their GPUs and do not hold up the
queue, because the GPUs they wait for may stay busy for a long time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

Placement = list[tuple[str, list[int]]]   # (node id, GPU indices), one entry per rank


class WaitReason(str, enum.Enum):
    """Why a pending job has not started (the squeue vocabulary)."""

    RESOURCES = "Resources"            # not enough free GPUs now
    PRIORITY = "Priority"              # an earlier job is waiting first
    NODE_DOWN = "NodeDown"             # a pinned node is down
    PINNED_GPUS_BUSY = "PinnedGPUsBusy"


@dataclass(frozen=True)
class Request:
    """What a pending job asks for."""

    job_id: str
    gpus: int
    pins: dict[str, list[int]] | None = None


@dataclass(frozen=True)
class NodeCapacity:
    """A registered node's GPUs, for the feasibility check at submit."""

    node_id: str
    gpu_indices: tuple[int, ...]


def infeasible(request: Request, nodes: list[NodeCapacity]) -> str | None:
    """A sentence saying why no set of registered nodes could ever run ``request``, or None."""
    if not nodes:
        return "no node agent has registered with this master yet; start zmgpu-node first"
    by_id = {n.node_id: n for n in nodes}
    if request.pins:
        for node_id, indices in request.pins.items():
            node = by_id.get(node_id)
            if node is None:
                known = ", ".join(sorted(by_id))
                return f"unknown node '{node_id}' in --node-gpu-ids (registered nodes: {known})"
            missing = sorted(set(indices) - set(node.gpu_indices))
            if missing:
                have = ",".join(map(str, node.gpu_indices)) or "none"
                return f"node '{node_id}' has no GPU {missing[0]} (its GPUs: {have})"
        return None
    total = sum(len(n.gpu_indices) for n in nodes)
    if request.gpus > total:
        per_node = ", ".join(f"{n.node_id}: {len(n.gpu_indices)}" for n in nodes)
        return (f"--gpus {request.gpus} can never be satisfied: the registered nodes have "
                f"{total} GPU(s) in all ({per_node})")
    return None


def place(request: Request, free: dict[str, list[int]], load: dict[str, int]) -> Placement | None:
    """Where ``request`` can start now, or None.

    ``free`` maps each usable (up) node to its free GPU indices; ``load`` counts
    the job ranks already on each node, to spread CPU-only jobs.
    """
    if request.pins:
        if all(set(idx) <= set(free.get(node, ())) for node, idx in request.pins.items()):
            return [(node, list(idx)) for node, idx in request.pins.items()]
        return None
    if not free:
        return None
    if request.gpus == 0:
        node = min(free, key=lambda n: (load.get(n, 0), n))
        return [(node, [])]
    # One node if any fits: the tightest fit keeps big holes for big jobs.
    fitting = [n for n, idx in free.items() if len(idx) >= request.gpus]
    if fitting:
        node = min(fitting, key=lambda n: (len(free[n]), n))
        return [(node, sorted(free[node])[:request.gpus])]
    # Otherwise span nodes, fullest-free first, so the job touches as few nodes as possible.
    placement: Placement = []
    needed = request.gpus
    for node in sorted(free, key=lambda n: (-len(free[n]), n)):
        if needed == 0:
            break
        take = sorted(free[node])[:needed]
        if take:
            placement.append((node, take))
            needed -= len(take)
    return placement if needed == 0 else None


def schedule(pending: list[Request], free: dict[str, list[int]], load: dict[str, int],
             down: set[str]) -> tuple[list[tuple[str, Placement]], dict[str, WaitReason]]:
    """One first-come first-served pass.

    Returns the jobs to start with their placements, and a wait reason for each
    job left pending.  ``free`` and ``load`` are copied, not changed.
    """
    free = {n: list(idx) for n, idx in free.items()}
    load = dict(load)
    starts: list[tuple[str, Placement]] = []
    waits: dict[str, WaitReason] = {}
    blocked = False
    for req in pending:
        if blocked and not req.pins:
            waits[req.job_id] = WaitReason.PRIORITY
            continue
        placement = place(req, free, load)
        if placement is None:
            waits[req.job_id] = _why_not(req, down)
            blocked = blocked or not req.pins
            continue
        starts.append((req.job_id, placement))
        for node, indices in placement:
            taken = set(indices)
            free[node] = [i for i in free[node] if i not in taken]
            load[node] = load.get(node, 0) + 1
    return starts, waits


def _why_not(req: Request, down: set[str]) -> WaitReason:
    if req.pins:
        return WaitReason.NODE_DOWN if set(req.pins) & down else WaitReason.PINNED_GPUS_BUSY
    return WaitReason.RESOURCES
