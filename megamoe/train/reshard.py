"""Optimizer state that any layout can load: every parameter's Adam moments (and the fp32 master weights of a
ZeRO or bf16 optimizer) saved in the parameter's global coordinates with torch.distributed.checkpoint (DCP), so a
run resumed under another tensor-, pipeline-, expert- or data-parallel size, or ZeRO stage, continues with them.
It is a checkpoint's only copy of the optimizer state (ZeRO-3 aside: train/saving.py), read at the saved
layout too, each rank reading its own part.

Why DCP and not DeepSpeed's universal checkpoint: the universal format is an offline conversion (ds_to_universal)
of ZeRO files into one file per parameter holding the whole tensor, which every rank then reads whole; it knows
neither megamoe's expert shards nor ZeRO-0. DCP writes each rank's pieces as they are, records where every piece
sits in its global tensor, and on load reads, for each rank, only the saved pieces that overlap what that rank
needs (its own tensor-parallel part, its experts, its ZeRO partition).

Coordinates: each parameter is a 2-D global tensor. A tensor-parallel parameter split along dimension d > 0 is
[prod(shape[:d]), prod(shape[d:])] (its shards are blocks of columns), every other one [shape[0], prod(shape[1:])]
(tensor-parallel shards along d = 0 are blocks of rows; with megatron's partition stride s, a rank's shard is s
blocks). A routed-expert parameter [num_local, ...] is rows [first_expert, first_expert + num_local) of a tensor of
all the experts (PEER's table rows alike). Names are global: a pipeline stage's layers are numbered from the first
layer of the model. Keys: `exp_avg/<name>`, `exp_avg_sq/<name>` and, for optimizers holding fp32 master weights
apart from the model's (ZeRO 1-2, bf16), `master/<name>`. A ZeRO partition is a range of the flattened parameter:
saved and loaded as the rectangles (a part row, whole rows, a part row) that cover it. Replicas (data-parallel
ranks holding the same values) offer the same pieces and DCP writes each once, spread over them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megamoe.models.sharding import shift_layer_index
from megamoe.moe.experts import Experts
from megamoe.parallel.groups import ParallelGroups
from megamoe.train.deepspeed import base_optimizer, optimized_parameters, partition_moments, set_partitioned_state
from megamoe.train.integrity import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP_FILE = "optimizer.json"
PIECE_BYTES = 4 << 20
"""Largest piece a rank writes: a rank loading part of a tensor reads whole saved pieces that overlap it."""


Copy = Callable[[str, torch.Tensor], torch.Tensor]
"""(a name for the tensor, the tensor) -> the tensor to write (a snapshot's copy, or the live tensor)."""

Rect = tuple[int, int, int, int]
"""Rows [r0, r1) and columns [c0, c1) of a local 2-D view."""


@dataclass(frozen=True)
class Block:
    """Part of a rank's local 2-D view (rows [r0, r1), columns [c0, c1)) and where it sits in the global tensor."""

    r0: int
    r1: int
    c0: int
    c1: int
    row: int
    col: int


@dataclass(frozen=True)
class Geometry:
    """Where a rank's local parameter sits in its global 2-D tensor."""

    name: str
    local: tuple[int, int]
    size: tuple[int, int]
    blocks: tuple[Block, ...]


def geometry(name: str, param: torch.Tensor, groups: ParallelGroups, expert: Experts | None) -> Geometry:
    """`param`'s place in its global tensor (`name`: its global name; `expert`: the module if it holds experts)."""
    shape = tuple(param.shape) or (1,)
    sharded = bool(getattr(param, "tensor_model_parallel", False)) and groups.tp_size > 1
    dim = param.partition_dim if sharded else 0
    split = max(dim, 1)
    rows, cols = math.prod(shape[:split]), math.prod(shape[split:])
    tp, rank, stride = groups.tp_size, groups.tp_rank, getattr(param, "partition_stride", 1)
    if expert is not None:
        if sharded and dim == 0:
            raise ValueError(f"{name}: an expert parameter split over tensor-parallel ranks along its expert dimension")
        first = expert.first_expert
        cols_total = cols * tp if sharded else cols
        col = rank * cols if sharded else 0
        block = Block(0, rows, 0, cols, first, col)
        return Geometry(name, (rows, cols), (rows * groups.ep_size, cols_total), (block,))
    if not sharded:
        return Geometry(name, (rows, cols), (rows, cols), (Block(0, rows, 0, cols, 0, 0),))
    if dim == 0:
        height = rows // stride
        blocks = tuple(Block(j * height, (j + 1) * height, 0, cols, (j * tp + rank) * height, 0) for j in range(stride))
        return Geometry(name, (rows, cols), (rows * tp, cols), blocks)
    width = cols // stride
    blocks = tuple(Block(0, rows, j * width, (j + 1) * width, 0, (j * tp + rank) * width) for j in range(stride))
    return Geometry(name, (rows, cols), (rows, cols * tp), blocks)


def flat_rectangles(start: int, numel: int, cols: int) -> list[Rect]:
    """The rectangles (r0, r1, c0, c1) of a [rows, cols] view that cover the flat range [start, start + numel), in
    order: a part of a row, whole rows, a part of a row."""
    end, out = start + numel, []
    while start < end:
        row, col = divmod(start, cols)
        if col or end - start < cols:
            stop = min(end, (row + 1) * cols)
            out.append((row, row + 1, col, stop - row * cols))
        else:
            stop = (end // cols) * cols
            out.append((row, stop // cols, 0, cols))
        start = stop
    return out


@dataclass
class Piece:
    """A rectangle of a global tensor: `key` names the tensor, `offsets` its corner; `tensor` the values."""

    key: str
    offsets: tuple[int, int]
    size: tuple[int, int]
    tensor: torch.Tensor


def overlaps(geo: Geometry, rect: Rect | None) -> list[tuple[Rect, tuple[int, int]]]:
    """The parts of a local rectangle (default: all of the local tensor) in each block: (local part, its global
    corner)."""
    r0, r1, c0, c1 = rect or (0, geo.local[0], 0, geo.local[1])
    out = []
    for b in geo.blocks:
        lo_r, hi_r, lo_c, hi_c = max(r0, b.r0), min(r1, b.r1), max(c0, b.c0), min(c1, b.c1)
        if lo_r < hi_r and lo_c < hi_c:
            out.append(((lo_r, hi_r, lo_c, hi_c), (b.row + lo_r - b.r0, b.col + lo_c - b.c0)))
    return out


def pieces_of(key: str, geo: Geometry, values: torch.Tensor, rect: Rect | None = None) -> list[Piece]:
    """The pieces of a local rectangle (default: the whole local tensor), `values` its 2-D values, each at most
    PIECE_BYTES."""
    r0, c0 = (rect[0], rect[2]) if rect else (0, 0)
    out = []
    for (lo_r, hi_r, lo_c, hi_c), (row, col) in overlaps(geo, rect):
        part = values[lo_r - r0:hi_r - r0, lo_c - c0:hi_c - c0]
        rows_per_piece = max(1, PIECE_BYTES // max(1, part.shape[1] * part.element_size()))
        out += [Piece(key, (row + start, col), geo.size, part[start:start + rows_per_piece])
                for start in range(0, part.shape[0], rows_per_piece)]
    return out


# ---- what this rank holds ----

@dataclass
class Entry:
    """One optimized parameter of this rank."""

    geo: Geometry
    param: torch.nn.Parameter
    fragment: object | None
    """DeepSpeed's `_hp_mapping` (ZeRO 1-2, bf16: this rank's range of the flattened parameter), else None."""


def entries(model: torch.nn.Module, groups: ParallelGroups, optimized: set[int]) -> list[Entry]:
    """Every parameter whose optimizer state this rank holds (all it updates; under ZeRO, those with a range in
    its partition), with its global geometry, in the model's order."""
    from megamoe.train.checkpoint import layer_offset

    offset = layer_offset(model)
    experts = {name: m for name, m in model.named_modules() if isinstance(m, Experts)}
    out = []
    for name, param in model.named_parameters():
        if id(param) not in optimized or (hasattr(param, "_hp_mapping") and param._hp_mapping is None):
            continue  # not optimized, or (ZeRO) wholly in other ranks' partitions
        owner, _, leaf = name.rpartition(".")
        expert = experts.get(owner) if "." not in leaf else None
        geo = geometry(shift_layer_index(name, offset), param, groups, expert)
        out.append(Entry(geo, param, getattr(param, "_hp_mapping", None)))
    return out


def _fragment_rectangles(entry: Entry) -> list[Rect]:
    address = entry.fragment.lp_fragment_address
    return flat_rectangles(address.start, address.numel, entry.geo.local[1])


def _fragment_values(flat: torch.Tensor, rect: Rect, start: int, cols: int) -> torch.Tensor:
    """The rectangle's values within a fragment (a flat tensor starting at flat index `start`)."""
    r0, r1, c0, c1 = rect
    first = r0 * cols + c0 - start
    return flat[first:first + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)


# ---- save ----

@dataclass
class OptimizerSnapshot:
    """This rank's optimizer state in host memory (`pieces`) and the run's scalars (`record`: the optimizer step,
    the loss scaler's state), taken at a step boundary and written later, possibly while training goes on."""

    pieces: list[Piece]
    record: dict


def snapshot(engine, model: torch.nn.Module, groups: ParallelGroups, copy: Copy | None = None) -> OptimizerSnapshot:
    """This rank's optimizer state, each piece passed through `copy` (default `in_host_memory`: the live values
    where they already are in host memory). Collective (the step count is agreed over ranks)."""
    copy = copy or in_host_memory
    pieces: list[Piece] = []
    state = base_optimizer(engine).state
    for entry in entries(model, groups, optimized_parameters(engine)):
        if entry.fragment is not None:
            cols, start = entry.geo.local[1], entry.fragment.lp_fragment_address.start
            tensors = {"master": entry.fragment.get_hp_fragment(), **partition_moments(engine, entry.fragment, MOMENTS)}
            for key, flat in tensors.items():
                for rect in _fragment_rectangles(entry):
                    pieces += pieces_of(f"{key}/{entry.geo.name}", entry.geo,
                                        _fragment_values(flat.detach(), rect, start, cols), rect)
        else:
            for key in MOMENTS:
                if key in state.get(entry.param, {}):
                    local = state[entry.param][key].detach().reshape(entry.geo.local)
                    pieces += pieces_of(f"{key}/{entry.geo.name}", entry.geo, local)
    for piece in pieces:
        piece.tensor = copy(f"{piece.key}@{piece.offsets}", piece.tensor)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # copies to pinned host memory are asynchronous
    steps = _all_steps(engine)
    return OptimizerSnapshot(pieces, {"step": max(steps) if steps else 0, "loss_scaler": loss_scaler_state(engine)})


def in_host_memory(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself where it is in host memory, else a host copy: for a write that training waits for."""
    return tensor.detach().cpu()


class HostCopies:
    """Copies into host-memory buffers kept from one save to the next, for a write that runs while training changes
    the live tensors. A buffer is reused once the write that read it is done (at most one is in flight): a copy into
    memory already mapped costs a memcpy, into a fresh buffer also its page faults. On a GPU the buffers are pinned
    and the copies asynchronous (synchronise before writing)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        pinned = tensor.device.type == "cuda"
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self.buffers[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
        return buffer.copy_(tensor.detach(), non_blocking=pinned)


LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""The dynamic loss scaler's state (fp16): a resume continues with the scale the run had reached."""


def loss_scaler_state(engine) -> dict:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {k: float(getattr(scaler, k)) for k in LOSS_SCALER_FIELDS if isinstance(getattr(scaler, k, None),
                                                                                    (int, float))}


def set_loss_scaler_state(engine, values: dict) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in values.items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, type(getattr(scaler, key))(value))


def write(snap: OptimizerSnapshot, directory: Path, group: dist.ProcessGroup | None = None) -> None:
    """Write a snapshot into `directory`; every rank of `group` (all ranks; None: the default group) calls it."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        dcp.save({}, storage_writer=dcp.FileSystemWriter(str(directory)), planner=_PieceSavePlanner(snap.pieces),
                 process_group=group)
    except CheckpointException as err:  # a BaseException, which `except Exception` handlers would let through
        raise _first_failure(err) from None
    if dist.get_rank() == 0:
        (directory / STEP_FILE).write_text(json.dumps(snap.record))


def _first_failure(err: CheckpointException) -> Exception:
    """DCP's report of failed ranks as an ordinary exception: the first failed rank's, caused by its own error (so a
    full disk is recognised as one)."""
    rank, (cause, _) = min(err.failures.items(), key=lambda item: item[0])
    failure = RuntimeError(f"rank {rank}: {type(cause).__name__}: {cause}")
    failure.__cause__ = cause
    return failure


def _all_steps(engine) -> list[int]:
    """The optimizer steps its state counts, over every rank (one per parameter group that has state)."""
    optimizer = base_optimizer(engine)
    mine = [int(group["step"]) for group in optimizer.param_groups if "step" in group]  # apex FusedAdam
    mine += [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return [step for part in gathered for step in part]


class _PieceSavePlanner(DefaultSavePlanner):
    """Writes the given pieces (DCP dedups pieces several ranks offer, writing each once)."""

    def __init__(self, pieces: list[Piece]) -> None:
        super().__init__(flatten_state_dict=False, dedup_save_to_lowest_rank=False, enable_plan_caching=False)
        self.by_index = {(p.key, p.offsets): p.tensor.contiguous() for p in pieces}
        self.pieces = pieces

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(p.key, torch.Size(p.offsets)), type=WriteItemType.SHARD,
                           tensor_data=TensorWriteData(
                               chunk=ChunkStorageMetadata(offsets=torch.Size(p.offsets),
                                                          sizes=torch.Size(p.tensor.shape)),
                               properties=TensorProperties.create_from_tensor(p.tensor), size=torch.Size(p.size)))
                 for p in self.pieces]
        self.plan = SavePlan(items)
        return self.plan

    def lookup_object(self, index: MetadataIndex):
        return self.by_index[(index.fqn, tuple(index.offset))]


# ---- load ----

@dataclass
class Request:
    """A rectangle of a saved tensor this rank needs, read into `buffer`."""

    key: str
    offsets: tuple[int, int]
    buffer: torch.Tensor


def requests_of(key: str, geo: Geometry, rect: Rect | None = None) -> list[tuple[Request, Rect]]:
    """The requests covering a local rectangle (default: the whole local tensor), each with its local part."""
    # Zeros: rows beyond the saved tensor (megatron's vocabulary padding at another TP size) stay 0.
    return [(Request(key, corner, torch.zeros(hi_r - lo_r, hi_c - lo_c)), (lo_r, hi_r, lo_c, hi_c))
            for (lo_r, hi_r, lo_c, hi_c), corner in overlaps(geo, rect)]


def load(engine, model: torch.nn.Module, groups: ParallelGroups, directory: Path) -> int:
    """Fill the optimizer's state from `directory`, written under any layout; returns the optimizer step. Every
    rank calls it, after the model's weights are loaded (they give the fp32 master weights where none were
    saved)."""
    record = json.loads((directory / STEP_FILE).read_text())
    step = record["step"]
    set_loss_scaler_state(engine, record.get("loss_scaler", {}))
    plan: list[tuple[Entry, str, list]] = []
    for entry in entries(model, groups, optimized_parameters(engine)):
        keys = ("master", *MOMENTS) if entry.fragment is not None else MOMENTS
        for key in keys:
            rects = _fragment_rectangles(entry) if entry.fragment is not None else [None]
            plan.append((entry, key, [r for rect in rects for r in requests_of(f"{key}/{entry.geo.name}",
                                                                                 entry.geo, rect)]))
    requests = [request for _, _, parts in plan for request, _ in parts]
    found = _read(requests, directory)
    optimizer = base_optimizer(engine)
    fragments: dict[int, dict[str, torch.Tensor]] = {}
    for entry, key, parts in plan:
        if not all((r.key, r.offsets) in found for r, _ in parts):
            if key == "master":
                continue  # saved without one (ZeRO-0, fp32): the loaded weights are the master weights
            raise KeyError(f"{directory}: no {key} for {entry.geo.name}: the checkpoint does not hold this model's "
                           "optimizer state")
        if entry.fragment is not None:
            flat = torch.empty(entry.fragment.lp_fragment_address.numel)
            start, cols = entry.fragment.lp_fragment_address.start, entry.geo.local[1]
            for request, rect in parts:
                _fragment_values(flat, rect, start, cols)[...] = request.buffer
            fragments.setdefault(id(entry.param), {})[key] = flat
        else:
            local = torch.empty(entry.geo.local)
            for request, (r0, r1, c0, c1) in parts:
                local[r0:r1, c0:c1] = request.buffer
            value = local.view_as(entry.param).to(entry.param.device, torch.float32)
            optimizer.state[entry.param][key] = value
            optimizer.state[entry.param]["step"] = torch.tensor(float(step), device=entry.param.device)
    for group in optimizer.param_groups:
        if "step" in group:  # apex FusedAdam counts steps per group
            group["step"] = step
    if fragments:
        set_partitioned_state(engine, fragments, step, MOMENTS)
    return step


def _read(requests: list[Request], directory: Path) -> set[tuple[str, tuple[int, int]]]:
    """Read every request's overlap with the saved pieces; returns the requests whose tensor was saved."""
    planner = _RequestLoadPlanner(requests)
    try:
        dcp.load({}, storage_reader=dcp.FileSystemReader(str(directory)), planner=planner)
    except CheckpointException as err:
        raise CheckpointError(f"{directory}: the optimizer state could not be read ({_first_failure(err)}): the "
                              "checkpoint is damaged; resume from an earlier one") from None
    return planner.found


class _RequestLoadPlanner(DefaultLoadPlanner):
    """Reads, for each request, the parts of the saved pieces that overlap it."""

    def __init__(self, requests: list[Request]) -> None:
        super().__init__(flatten_state_dict=False, allow_partial_load=True)
        self.requests = {(r.key, r.offsets): r for r in requests}
        self.found: set[tuple[str, tuple[int, int]]] = set()

    def create_local_plan(self) -> LoadPlan:
        items = []
        for (key, offsets), request in self.requests.items():
            saved = self.metadata.state_dict_metadata.get(key)
            if not isinstance(saved, TensorStorageMetadata):
                continue
            self.found.add((key, offsets))
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=request.buffer.shape)
            items += create_read_items_for_chunk_list(key, saved, [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.requests[(index.fqn, tuple(index.offset))].buffer


def read_whole(directory: Path, kind: str) -> dict[str, torch.Tensor]:
    """Every saved tensor of `kind` ("master", "exp_avg", "exp_avg_sq") whole, in its 2-D global coordinates, by
    global parameter name (one process reads everything: tools, not training)."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    requests = [Request(key, (0, 0), torch.zeros(tuple(saved.size)))
                for key, saved in metadata.state_dict_metadata.items()
                if key.startswith(f"{kind}/") and isinstance(saved, TensorStorageMetadata)]
    _read(requests, directory)
    return {r.key.removeprefix(f"{kind}/"): r.buffer for r in requests}
