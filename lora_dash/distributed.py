"""A launch shared among ``torch.distributed`` ranks: who decomposes which weight, how they agree.

:func:`lora_dash.launch` under DDP or FSDP2 gives each adapted matrix to one rank
(:func:`assign_owners`), gathers a sharded weight to that rank alone (:func:`gather_to`), agrees on
the first error before anything is committed (:func:`raise_first_error`) and sends every selection
to every rank (:func:`broadcast_from`). :func:`select_shared` puts these together for the layers and
plugs into :data:`lora_dash.schedule.shared_selection` when this module is imported; the rest is
pure ``torch.distributed`` and knows nothing of layers.

Every function but :func:`is_active`, :func:`svd_cost`, :func:`cost_order`, :func:`assign_owners`
and :func:`rank_loads` is a collective: every rank of the default group must call it, in the same
order, with the same arguments where stated.
"""

import hashlib
import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from lora_dash import hooks
from lora_dash.bases import is_quantized, is_sharded
from lora_dash.directions import DashDirections
from lora_dash.layer import LoRADashLinear


def is_active() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank.

    Only then can a launch be shared.
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def svd_cost(n: int, m: int) -> int:
    """The cost model of one thin SVD of an ``(n, m)`` matrix: ``n·m·min(n, m)``.

    That is its flop count up to a constant factor.
    """
    return n * m * min(n, m)


def cost_order(costs: Sequence[int]) -> list[int]:
    """Item numbers by descending cost, equal costs by number (``sorted`` is stable)."""
    return sorted(range(len(costs)), key=lambda i: -costs[i])


def assign_owners(costs: Sequence[int], world: int) -> list[int]:
    """The rank that decomposes each matrix: largest cost first, each to the least-loaded rank.

    Longest-processing-time-first scheduling: matrices in descending cost (equal costs in index
    order), each to the rank with the smallest load so far (equal loads to the lowest rank).
    Deterministic, so every rank computes the same assignment; its largest load is at most ``4/3``
    of the best possible.

    Args:
        costs: one non-negative cost per matrix (e.g. :func:`svd_cost`), ``(L,)``.
        world: number of ranks, ``>= 1``.

    Returns:
        ``owners``, ``(L,)``: ``owners[i]`` is the rank of matrix ``i``.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    loads = [0] * world
    owners = [0] * len(costs)
    for index in cost_order(costs):
        # min() returns the first: ties to the lowest rank
        rank = min(range(world), key=lambda q: loads[q])
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def rank_loads(costs: Sequence[int], owners: Sequence[int], world: int) -> list[int]:
    """The summed cost each rank carries under ``owners``, ``(world,)``."""
    loads = [0] * world
    for cost, owner in zip(costs, owners):
        loads[owner] += cost
    return loads


def check_same_on_every_rank(key: str, what: str, device: torch.device) -> None:
    """Raise ``ValueError`` on every rank unless every rank passed the same ``key`` (a collective).

    One all-reduce of two numbers: the minimum of a 62-bit hash of ``key`` and of its negation, so
    the minimum and the maximum. ``what`` says in the message what differs.
    """
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 2
    extremes = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MIN)
    if int(extremes[0]) != -int(extremes[1]):
        raise ValueError(f"the ranks differ in {what}")


def raise_first_error(errors: dict[int, Exception], count: int, device: torch.device) -> None:
    """Agree on the ranks' errors; if any, raise the one of the lowest-numbered item on every rank.

    ``errors`` maps item numbers in ``[0, count)`` to this rank's errors. One all-reduce finds the
    lowest failing item (ties to the lowest rank); if there is one, that rank broadcasts its message
    and every rank raises it: ``ValueError`` for a ``ValueError``, ``RuntimeError`` for anything
    else, with the same message (the failing rank chains its own error). Without errors, nothing is
    raised.
    """
    world = dist.get_world_size()
    rank = dist.get_rank()
    first = min(errors, default=count)
    code = torch.tensor([first * world + rank], dtype=torch.int64, device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MIN)
    failed, source = divmod(int(code), world)
    if failed >= count:
        return
    error = errors.get(failed) if rank == source else None
    payload = [(isinstance(error, ValueError), str(error))]
    dist.broadcast_object_list(payload, src=source)
    is_value_error, message = payload[0]
    raise (ValueError if is_value_error else RuntimeError)(message) from error


def gather_to(tensor: Tensor, dst: int) -> Tensor | None:
    """``tensor`` whole on rank ``dst`` and ``None`` on the others (a collective for a ``DTensor``).

    - A plain tensor is whole already: ``dst`` gets it back, nothing is sent.
    - A ``DTensor`` sharded by rows over all ranks (FSDP2's layout, ``Shard(0)`` on a 1-D mesh of
      the whole world) is sent to ``dst`` alone: every rank pads its row shard to ``⌈n / world⌉``
      rows and ``dist.gather`` collects them, so ``dst`` receives ``n·m`` numbers and no other rank
      holds the whole.
    - Any other ``DTensor`` layout is all-gathered (``full_tensor``): every rank briefly holds it
      whole, and all but ``dst`` drop it at once.
    """
    rank = dist.get_rank()
    if not is_sharded(tensor):
        return tensor if rank == dst else None
    from torch.distributed.tensor import Shard  # loaded already: ``tensor`` is a DTensor

    mesh, world = tensor.device_mesh, dist.get_world_size()
    # Shard i is chunk i of torch.chunk, and the group's rank order matches the mesh's only when the
    # mesh is 0, 1, …, world - 1.
    if (
        mesh.ndim != 1
        or tuple(tensor.placements) != (Shard(0),)
        or mesh.mesh.tolist() != list(range(world))
    ):
        whole = tensor.full_tensor()
        return whole if rank == dst else None
    group = mesh.get_group()
    rows = math.ceil(tensor.shape[0] / world)  # torch.chunk's split, which FSDP2 and DTensor use
    local = tensor.to_local()
    padded = local.new_zeros((rows, *tensor.shape[1:]))
    padded[: local.shape[0]] = local
    # The shards land in place in one buffer: the whole weight once, no concatenated copy.
    whole = local.new_empty((world * rows, *tensor.shape[1:])) if rank == dst else None
    dist.gather(padded, list(whole.chunk(world)) if rank == dst else None, dst=dst, group=group)
    return whole[: tensor.shape[0]] if rank == dst else None


def broadcast_from(tensors: list[Tensor], src: int) -> list[Tensor]:
    """``src``'s ``tensors`` on every rank, in one broadcast (a collective).

    Every rank passes tensors of the same shapes and one dtype, all on the group's device: ``src``
    its values, the others placeholders (e.g. ``torch.empty``). Returns new tensors holding
    ``src``'s bits.
    """
    if not tensors:
        return []
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.broadcast(flat, src=src)
    return [
        piece.view_as(tensor)
        for piece, tensor in zip(flat.split([t.numel() for t in tensors]), tensors)
    ]


def _whole_on(layer: LoRADashLinear, owner: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(W, A, B)`` of ``layer``, whole, on rank ``owner``; ``None`` elsewhere.

    Every rank must call it: a sharded tensor is gathered to ``owner`` (:func:`gather_to`).
    """
    gather = partial(gather_to, dst=owner)
    A, B = gather(layer.lora_A), gather(layer.lora_B)
    if is_quantized(layer.base) and dist.get_rank() != owner:
        return None  # dequantized by its owner alone, as one process would
    weight = layer.base_weight(gather)
    return None if weight is None else (weight, A, B)


def select_shared(
    layers: dict[str, LoRADashLinear], strategy: str, generators: list[torch.Generator]
) -> dict[str, DashDirections] | None:
    """:func:`lora_dash.launch`'s selection, shared among the ranks of the default group.

    A collective; in one process it returns ``None``. It is the launch hook ``"shared_selection"``.

    Each layer's SVD and selection runs on one rank, chosen by :func:`assign_owners` (largest
    ``n·m·min(n, m)`` first, to the least-loaded rank); under FSDP2 only that rank gathers the whole
    weight (:func:`gather_to`). Each owner then broadcasts ``U_s``, ``V_s`` and the indices
    (``s·(n + m) + s`` numbers a layer), so every rank commits bit for bit what it would have
    selected alone. An error on any rank is raised on every rank with the same message (that of the
    lowest-numbered failing layer, as one process would raise it), before any layer launches.

    Rounds: in round ``j`` every rank gathers (if sharded) and then decomposes its ``j``-th layer,
    largest first, so each rank holds one whole weight and one full SVD at a time, and the ranks
    decompose in parallel. A rank that failed skips its later layers but keeps joining the gathers.
    Then the ranks agree on the first error, and each owner broadcasts its selections.
    """
    if not is_active():
        return None
    items = list(layers.values())
    rank, world = dist.get_rank(), dist.get_world_size()
    device = items[0].dash_U.device  # where the adapter lives: a tensor the process group can send
    layout = repr(
        [(name, layer.out_features, layer.in_features, layer.s) for name, layer in layers.items()]
    )
    check_same_on_every_rank(
        layout,
        "their LoRA-Dash layers (names, shapes or s); where each rank holds its own layers "
        "(pipeline stages), launch with distributed=False",
        device,
    )
    errors: dict[int, Exception] = {}
    for index, layer in enumerate(items):
        try:
            layer.check_launchable()
        except RuntimeError as error:
            errors[index] = error
            break
    raise_first_error(errors, len(items), device)

    costs = [svd_cost(layer.out_features, layer.in_features) for layer in items]
    owners = assign_owners(costs, world)
    queues = [
        [index for index in cost_order(costs) if owners[index] == owner] for owner in range(world)
    ]
    found: dict[int, DashDirections] = {}
    for round_index in range(max(map(len, queues))):
        own = None
        for owner, queue in enumerate(queues):
            if round_index < len(queue):
                index = queue[round_index]
                try:
                    whole = _whole_on(items[index], owner)
                except Exception as error:
                    # a quantized weight that fails to dequantize on its owner
                    errors[index], whole = error, None
                if whole is not None:
                    own = index, whole
        if own is not None and own[0] < min(errors, default=len(items)):
            index, whole = own
            try:
                found[index] = items[index].find_directions(
                    strategy=strategy, generator=generators[index], whole=whole
                )
            except Exception as error:  # raised on every rank below, once the ranks agree
                errors[index] = error
        own = whole = None  # the whole weight goes before the next round gathers another
    raise_first_error(errors, len(items), device)

    chosen: dict[int, DashDirections] = {}
    for owner, queue in enumerate(queues):
        if rank == owner:
            mine = [found[index] for index in queue]
        else:
            mine = [
                DashDirections(
                    U_s=torch.empty_like(items[index].dash_U, dtype=torch.float32),
                    V_s=torch.empty_like(items[index].dash_V, dtype=torch.float32),
                    index=torch.empty_like(items[index].dash_index),
                )
                for index in queue
            ]
        vectors = broadcast_from([v.to(device) for d in mine for v in (d.U_s, d.V_s)], src=owner)
        indices = broadcast_from([d.index.to(device) for d in mine], src=owner)
        for position, index in enumerate(queue):
            chosen[index] = DashDirections(
                U_s=vectors[2 * position], V_s=vectors[2 * position + 1], index=indices[position]
            )
    return {name: chosen[index] for index, name in enumerate(layers)}


hooks.set_launch_hook("shared_selection", select_shared)
