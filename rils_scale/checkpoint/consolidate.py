"""DeepSpeed checkpoint (any ZeRO stage x TP x DP, fp32 or bf16 run) -> one fp32 state dict with
the names of the single-process :class:`~rils_scale.models.RILS`.

Two steps, streamed tensor by tensor:

1. **ZeRO, per TP rank.** Each TP rank's files are an independent ZeRO checkpoint over the DP
   group. Its fp32 master weights are rebuilt the way DeepSpeed's ``zero_to_fp32.py`` does,
   but for every ``mp_rank_XX`` (that script reads only ``mp_rank_00``):

   - ZeRO-3: every parameter is cut into ``ceil(numel / dp)`` elements per DP rank, stored in
     the rank's ``fp32_flat_groups``; its slices are concatenated over DP ranks and the
     padding dropped. Shapes and order come from ``param_shapes`` in the model-states file.
   - ZeRO-1/2: each optimizer group is one flat fp32 vector split evenly over DP ranks
     (``single_partition_of_fp32_groups``); parameters follow each other in ``param_shapes``
     order with ``param_alignment_paddings`` between them.
   - ZeRO-0: fp32 runs store the weights in ``module``; bf16 runs keep fp32 masters in the
     optimizer's ``fp32_groups``, in optimizer-group order (rebuilt with the trainer's own
     :func:`rils_scale.models.param_groups.optimizer_groups` and checked against the shapes).
   - weights-only checkpoints written by :func:`rils_scale.checkpoint.export.export_deepspeed`.

2. **TP merge.** The split rule of every parameter comes from the model itself
   (:func:`.layout.tensor_parallel_layout_for`): column-parallel weights and biases, q/v biases
   and the vocab-parallel embedding on dim 0 (fused qkv with stride 3; the embedding's padding
   rows dropped), row-parallel weights on dim 1, via :func:`rils_scale.parallel.sharding.merge_shards`.
   Every other parameter is replicated, and its copies must agree across TP ranks: a copy that
   differs raises :class:`ReplicaMismatchError` naming the parameter (``replica_tolerance``
   relaxes the check from bit-exact to a max-abs-difference bound).

Memory: files are memory-mapped, each full tensor is built, handed to the caller and freed,
and the mappings are dropped every ``release_every`` bytes so the pages already read do not
stay resident. Peak RSS is about one tensor plus ``release_every`` (measured in
``benchmarks/bench_convert.py``; see docs/checkpoints.md).
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from ..models.config import RILSConfig
from ..parallel.sharding import ShardSpec, merge_shards
from .layout import (CheckpointError, CheckpointRef, ShardFiles, discover_files, resolve_checkpoint,
                     tensor_parallel_layout_for)
from .serialization import iter_safetensors, load_ds_file

OPTIMIZER_KINDS = ("exp_avg", "exp_avg_sq")
"""Adam's per-parameter moments, read like the fp32 masters (``kind=`` of ``get`` / ``full_tensor``)."""

DEFAULT_RELEASE_EVERY = 256 * 2 ** 20
"""Bytes of tensors produced between two drops of the file mappings."""


class ReplicaMismatchError(CheckpointError):
    """A replicated parameter differs between TP ranks."""


@contextlib.contextmanager
def _naming(where: Union[str, Callable[[], str]]):
    """Turn the KeyError / TypeError ... of a file that is not what its name says into a
    ``CheckpointError`` naming the file (or tag) being read, as ``--resume`` does."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, RuntimeError) as err:
        place = where() if callable(where) else where
        raise CheckpointError(f"{place}: malformed checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None


# ------------------------------------------------------------------------- per-TP-rank readers
class _RankReader:
    """One TP rank's checkpoint: ``names()`` in storage order, TP-local ``shapes``, ``get(name)``."""

    def __init__(self, files: ShardFiles, tp_rank: int, trusted: bool):
        self.files, self.tp_rank, self.trusted = files, tp_rank, trusted
        self._cache: Dict[str, object] = {}
        self.last_path: Optional[str] = None
        """The file read last (named in errors)."""

    def _load(self, path: str) -> dict:
        self.last_path = path
        if path not in self._cache:
            self._cache[path] = load_ds_file(path, trusted=self.trusted)
        return self._cache[path]

    def release(self) -> None:
        """Drop the file mappings (they are re-opened on demand)."""
        self._cache.clear()

    def names(self) -> List[str]:
        return list(self.shapes())

    def shapes(self) -> "OrderedDict[str, torch.Size]":
        raise NotImplementedError

    def get(self, name: str, kind: str = "fp32") -> torch.Tensor:
        raise NotImplementedError

    def has_optimizer_state(self) -> bool:
        return False

    def optimizer_step(self) -> Optional[int]:
        return None

    def _fp32_only(self, kind: str) -> None:
        if kind != "fp32":
            raise CheckpointError(f"optimizer state ({kind}) is read from ZeRO-3 and weights-only checkpoints only; "
                                  f"this one is {type(self).__name__[1:-6]} (convert with --weights-only)")


class _Zero3Reader(_RankReader):
    def __init__(self, files, tp_rank, trusted):
        super().__init__(files, tp_rank, trusted)
        states = load_ds_file(files.model_files[tp_rank][0], trusted=trusted)
        groups = states["param_shapes"]
        self._shapes = OrderedDict((n, torch.Size(s)) for g in groups for n, s in g.items())
        self.dp = files.dp_size
        self._offsets: Dict[str, int] = {}
        offset = 0
        for name, shape in self._shapes.items():
            self._offsets[name] = offset
            offset += math.ceil(shape.numel() / self.dp)
        self._per_rank_numel = offset
        self._group_sizes: Optional[List[int]] = None

    def shapes(self):
        return self._shapes

    def _inner_state(self, dp_rank: int) -> dict:
        """The torch optimizer's ``state`` over this DP rank's flat fp32 sub-groups (index order)."""
        osd = self._load(self.files.optim_files[self.tp_rank][dp_rank])["optimizer_state_dict"]
        return (osd.get("optimizer_state_dict") or {}).get("state") or {}

    def has_optimizer_state(self) -> bool:
        state = self._inner_state(0)
        return bool(state) and all(k in v for v in state.values() for k in OPTIMIZER_KINDS)

    def optimizer_step(self) -> Optional[int]:
        steps = {int(v["step"]) for d in range(self.dp) for v in self._inner_state(d).values() if "step" in v}
        if len(steps) > 1:
            raise CheckpointError(f"TP rank {self.tp_rank}: Adam step counts differ across sub-groups/DP ranks: {steps}")
        return steps.pop() if steps else None

    def _flat_groups(self, dp_rank: int, kind: str = "fp32") -> List[torch.Tensor]:
        osd = self._load(self.files.optim_files[self.tp_rank][dp_rank])["optimizer_state_dict"]
        groups = osd["fp32_flat_groups"]
        if kind != "fp32":
            state = self._inner_state(dp_rank)
            moments = [state[i][kind] for i in sorted(state)]
            if [m.numel() for m in moments] != [g.numel() for g in groups]:
                raise CheckpointError(f"TP rank {self.tp_rank}: {kind} partitions do not match the fp32 partitions")
            groups = moments
        if self._group_sizes is None:
            self._group_sizes = [g.numel() for g in groups]
            if sum(self._group_sizes) != self._per_rank_numel:
                raise CheckpointError(
                    f"TP rank {self.tp_rank}: fp32 partitions hold {sum(self._group_sizes)} elements per DP rank "
                    f"but param_shapes need {self._per_rank_numel}: files from different runs mixed?")
        return groups

    def _slice(self, dp_rank: int, start: int, length: int, kind: str = "fp32") -> torch.Tensor:
        groups = self._flat_groups(dp_rank, kind)
        pieces, base = [], 0
        for g in groups:  # a parameter may in principle cross a sub-group boundary
            lo, hi = max(start, base), min(start + length, base + g.numel())
            if lo < hi:
                pieces.append(g[lo - base:hi - base])
            base += g.numel()
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def get(self, name, kind="fp32"):
        shape = self._shapes[name]
        per = math.ceil(shape.numel() / self.dp)
        parts = [self._slice(d, self._offsets[name], per, kind) for d in range(self.dp)]
        flat = torch.cat(parts)[:shape.numel()] if self.dp > 1 else parts[0][:shape.numel()].clone()
        return flat.float().view(shape)


class _Zero12Reader(_RankReader):
    def __init__(self, files, tp_rank, trusted):
        super().__init__(files, tp_rank, trusted)
        states = load_ds_file(files.model_files[tp_rank][0], trusted=trusted)
        self._groups = [OrderedDict((n, torch.Size(s)) for n, s in g.items()) for g in states["param_shapes"]]
        self._shapes = OrderedDict((n, s) for g in self._groups for n, s in g.items())
        first = load_ds_file(files.optim_files[tp_rank][0], trusted=trusted)["optimizer_state_dict"]
        paddings = first.get("param_alignment_paddings")
        self._where: Dict[str, Tuple[int, int]] = {}
        for gi, group in enumerate(self._groups):
            offset = 0
            for pi, (name, shape) in enumerate(group.items()):
                self._where[name] = (gi, offset)
                offset += shape.numel() + (paddings[gi][pi] if paddings is not None else 0)

    def shapes(self):
        return self._shapes

    def get(self, name, kind="fp32"):
        self._fp32_only(kind)
        gi, start = self._where[name]
        shape = self._shapes[name]
        end = start + shape.numel()
        pieces, base = [], 0
        for d in range(self.files.dp_size):
            part = self._load(self.files.optim_files[self.tp_rank][d])["optimizer_state_dict"][
                "single_partition_of_fp32_groups"][gi]
            lo, hi = max(start, base), min(end, base + part.numel())
            if lo < hi:
                pieces.append(part[lo - base:hi - base])
            base += part.numel()
        if sum(p.numel() for p in pieces) != shape.numel():
            raise CheckpointError(f"TP rank {self.tp_rank}: {name} runs past the end of its fp32 partitions")
        return torch.cat(pieces).float().view(shape)


class _Zero0Reader(_RankReader):
    def __init__(self, files, tp_rank, trusted, model_cfg: RILSConfig):
        super().__init__(files, tp_rank, trusted)
        states = self._load(files.model_files[tp_rank][0])
        module = states["module"]
        self._shapes = OrderedDict((n, t.shape) for n, t in module.items() if n not in states.get("buffer_names", []))
        self._master: Dict[str, Tuple[int, int]] = {}
        opt = states.get("optimizer") or {}
        fp32_groups = opt.get("fp32_groups") if isinstance(opt, dict) else None
        low_precision = any(t.dtype != torch.float32 for t in module.values() if t.is_floating_point())
        if low_precision:
            if not fp32_groups:
                raise CheckpointError(f"{files.model_files[tp_rank][0]}: bf16 weights without fp32 master groups")
            order = _optimizer_group_names(model_cfg, files.tp_size)
            for gi, (names, tensors) in enumerate(zip(order, fp32_groups)):
                if len(names) != len(tensors):
                    raise CheckpointError(f"TP rank {tp_rank}: optimizer group {gi} has {len(tensors)} fp32 masters, "
                                          f"the model's group has {len(names)} parameters")
                for pi, (name, t) in enumerate(zip(names, tensors)):
                    if tuple(t.shape) != tuple(self._shapes[name]):
                        raise CheckpointError(f"TP rank {tp_rank}: fp32 master {gi}.{pi} has shape {tuple(t.shape)}, "
                                              f"{name} has {tuple(self._shapes[name])}")
                    self._master[name] = (gi, pi)

    def shapes(self):
        return self._shapes

    def get(self, name, kind="fp32"):
        self._fp32_only(kind)
        states = self._load(self.files.model_files[self.tp_rank][0])
        if name in self._master:
            gi, pi = self._master[name]
            return states["optimizer"]["fp32_groups"][gi][pi].float().clone()
        return states["module"][name].float().clone()


class _WeightsOnlyReader(_RankReader):
    def __init__(self, files, tp_rank, trusted):
        super().__init__(files, tp_rank, trusted)
        import json
        import os
        from .layout import WEIGHTS_ONLY_MARKER
        from .serialization import open_safetensors
        self._path = files.model_files[tp_rank][0]
        with open_safetensors(self._path) as f:
            self._shapes = OrderedDict((n, torch.Size(f.get_slice(n).get_shape())) for n in f.keys())
        tag_dir = os.path.dirname(self._path)
        with open(os.path.join(tag_dir, WEIGHTS_ONLY_MARKER)) as f:
            opt = json.load(f).get("optimizer")
        self._optim = opt if isinstance(opt, dict) else None
        self._optim_path = os.path.join(tag_dir, opt["files"][tp_rank]) if self._optim else None

    def shapes(self):
        return self._shapes

    def has_optimizer_state(self) -> bool:
        return self._optim is not None

    def optimizer_step(self) -> Optional[int]:
        return int(self._optim["step"]) if self._optim and self._optim.get("step") is not None else None

    def get(self, name, kind="fp32"):
        if kind == "fp32":
            path, key = self._path, name
        elif self._optim is None:
            raise CheckpointError(f"{self._path}: weights-only checkpoint without optimizer state")
        else:
            path, key = self._optim_path, f"{kind}.{name}"
        for _, t in iter_safetensors(path, [key]):
            return t.float()


def _optimizer_group_names(cfg: RILSConfig, tp_size: int) -> List[List[str]]:
    """Parameter names of each optimizer group, in the order the trainer builds them."""
    from ..models import ParallelSpec, build_model
    from ..models.param_groups import optimizer_groups
    from .layout import _pretend_tensor_parallel, _structural_config
    with _pretend_tensor_parallel(tp_size):
        model = build_model(_structural_config(cfg, tp_size),
                            ParallelSpec(tp_group=object() if tp_size > 1 else None), attn_backend="math")
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer_groups(model, 0.1)]


# ------------------------------------------------------------------------- the checkpoint
class Checkpoint:
    """An opened checkpoint: metadata plus streamed access to TP-local and merged tensors."""

    def __init__(self, ref: CheckpointRef, *, trusted: bool = False, replica_tolerance: float = 0.0):
        self.ref = ref
        with _naming(ref.path):
            self.files = discover_files(ref.path)
        self.trusted, self.replica_tolerance = trusted, replica_tolerance
        first = self.files.model_files[0][0]
        with _naming(first):
            self.client_state, self.lr_scheduler = self._read_client_state()
            cfg = self.client_state.get("model_config") or (ref.run_config() or {}).get("model")
            if cfg is None:
                raise CheckpointError(f"{ref.path}: no model configuration in the checkpoint or its run's config.json")
            self.model_config = RILSConfig.from_dict(cfg)
        self.layout: Dict[str, ShardSpec] = tensor_parallel_layout_for(self.model_config, self.tp_size)
        self.readers = []
        for t in range(self.tp_size):
            with _naming(self.files.model_files[t][0]):
                self.readers.append(self._reader(t))
        # SemMIM's momentum branch: fp32 EMA files of its own (checkpoint/momentum.py), read like a
        # ZeRO-3 checkpoint; they replace any compute-dtype copy DeepSpeed kept of these weights.
        from .momentum import open_momentum_state
        self.momentum = open_momentum_state(ref.path)
        if self.momentum is not None and self.momentum.tp_size != self.tp_size:
            raise CheckpointError(f"{ref.path}: SemMIM state for TP={self.momentum.tp_size}, weights for TP={self.tp_size}")
        self._momentum_names = set(self.momentum.names()) if self.momentum is not None else set()
        self._check_names()

    # metadata -------------------------------------------------------------------------------
    @property
    def tp_size(self) -> int:
        return self.files.tp_size

    @property
    def dp_size(self) -> int:
        return self.files.dp_size

    @property
    def kind(self) -> str:
        return self.files.kind

    @property
    def step(self) -> Optional[int]:
        step = self.client_state.get("step")
        return int(step) if step is not None else None

    def describe(self) -> dict:
        return {"path": self.ref.path, "tag": self.ref.tag, "step": self.step, "layout": self.kind,
                "tensor_parallel": self.tp_size, "data_parallel": self.dp_size}

    def _read_client_state(self) -> Tuple[dict, Optional[dict]]:
        if self.kind == "weights_only":
            import json
            import os
            from .layout import WEIGHTS_ONLY_MARKER
            with open(os.path.join(self.ref.path, WEIGHTS_ONLY_MARKER)) as f:
                meta = json.load(f)
            return dict(meta.get("client_state", {})), meta.get("lr_scheduler")
        states = load_ds_file(self.files.model_files[0][0], trusted=self.trusted)
        client = {k: v for k, v in states.items() if k in ("step", "batches_consumed", "skipped", "nonfinite_steps",
                                                           "model_config", "tensor_parallel", "global_steps",
                                                           "global_samples", "tokenizer_sha256", "skip_batches",
                                                           "rollbacks")}
        declared = client.get("tensor_parallel")
        if declared is not None and int(declared) != self.files.tp_size:
            raise CheckpointError(f"{self.ref.path}: client state says TP={declared} but files exist for "
                                  f"TP={self.files.tp_size} (incomplete copy?)")
        return client, states.get("lr_scheduler")

    def _reader(self, tp_rank: int) -> _RankReader:
        kind = self.kind
        if kind == "zero3":
            return _Zero3Reader(self.files, tp_rank, self.trusted)
        if kind == "zero12":
            return _Zero12Reader(self.files, tp_rank, self.trusted)
        if kind == "zero0":
            return _Zero0Reader(self.files, tp_rank, self.trusted, self.model_config)
        return _WeightsOnlyReader(self.files, tp_rank, self.trusted)

    def _readers_for(self, name: str) -> List[_RankReader]:
        return self.momentum.readers if name in self._momentum_names else self.readers

    def _check_names(self) -> None:
        reference = set(self.readers[0].names())
        for r in self.readers[1:]:
            if set(r.names()) != reference:
                diff = sorted(set(r.names()) ^ reference)[:5]
                raise CheckpointError(f"TP rank {r.tp_rank} has different parameters than TP rank 0: {diff}")
        unknown = sorted(set(self.layout) - set(self.names()))
        if unknown:
            raise CheckpointError(f"the model built from the checkpoint's config has TP-sharded parameters the "
                                  f"checkpoint lacks (code and checkpoint out of sync?): {unknown[:5]}")

    # shapes ----------------------------------------------------------------------------------
    def names(self) -> List[str]:
        own = [n for n in self.readers[0].names() if n not in self._momentum_names]
        return own + (self.momentum.names() if self.momentum is not None else [])

    def full_shape(self, name: str) -> torch.Size:
        local = self._readers_for(name)[0].shapes()[name]
        spec = self.layout.get(name)
        if spec is None:
            return local
        shape = list(local)
        shape[spec.partition_dim] = spec.vocab_size if spec.vocab_size is not None else local[spec.partition_dim] * self.tp_size
        return torch.Size(shape)

    def full_shapes(self) -> "OrderedDict[str, torch.Size]":
        return OrderedDict((n, self.full_shape(n)) for n in self.names())

    def numel(self) -> int:
        return sum(s.numel() for s in self.full_shapes().values())

    # tensors ---------------------------------------------------------------------------------
    def release(self) -> None:
        for r in self.readers:
            r.release()

    def has_optimizer_state(self) -> bool:
        """Adam moments are stored (ZeRO-3 runs; converter outputs written ``--with-optimizer``)."""
        return all(r.has_optimizer_state() for r in self.readers)

    def optimizer_step(self) -> Optional[int]:
        """Adam's step count (bias correction), identical on every rank of a consistent checkpoint."""
        steps = {r.optimizer_step() for r in self.readers}
        if len(steps) > 1:
            raise CheckpointError(f"Adam step counts differ across TP ranks: {sorted(steps, key=str)}")
        return steps.pop()

    def full_tensor(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """The TP = 1 fp32 tensor of ``name`` (merged, or checked across replicas); ``kind``
        ``"exp_avg"`` / ``"exp_avg_sq"`` gives Adam's moments of that parameter instead."""
        spec = self.layout.get(name)
        readers = self._readers_for(name)
        if spec is not None:
            shards = [self._get(r, name, kind) for r in readers]
            for r, s in zip(readers, shards):
                if s.shape != readers[0].shapes()[name]:
                    raise CheckpointError(f"{name}: TP rank {r.tp_rank} shard has shape {tuple(s.shape)}")
            return merge_shards(shards, spec.partition_dim, spec.stride, spec.vocab_size)
        first = self._get(readers[0], name, kind)
        for r in readers[1:]:
            other = self._get(r, name, kind)
            if other.shape != first.shape:
                raise ReplicaMismatchError(f"replicated parameter {name}: shape {tuple(other.shape)} on TP rank "
                                           f"{r.tp_rank}, {tuple(first.shape)} on TP rank 0")
            if torch.equal(other, first):
                continue
            diff = (other - first).abs().max().item()
            if not diff <= self.replica_tolerance:  # also catches NaN
                raise ReplicaMismatchError(
                    f"replicated parameter {name!r} differs between TP rank 0 and TP rank {r.tp_rank} "
                    f"(max abs difference {diff:.3g} > tolerance {self.replica_tolerance:g}). TP peers must hold "
                    "identical copies; a difference means a corrupted file or a training bug (a replicated "
                    "parameter's gradient not identical across TP). Pass --replica-tolerance to accept small drift.")
        return first

    def _get(self, reader: _RankReader, name: str, kind: str) -> torch.Tensor:
        with _naming(lambda: f"{getattr(reader, 'last_path', None) or self.ref.path} ({kind} {name})"):
            return reader.get(name, kind)

    def iter_full_tensors(self, names: Optional[List[str]] = None, release_every: int = DEFAULT_RELEASE_EVERY,
                          kind: str = "fp32") -> Iterator[Tuple[str, torch.Tensor]]:
        """``(name, fp32 TP=1 tensor)`` one at a time; file mappings dropped every ``release_every`` bytes."""
        produced = 0
        for name in (names if names is not None else self.names()):
            tensor = self.full_tensor(name, kind)
            produced += tensor.numel() * tensor.element_size() * max(1, self.tp_size)
            yield name, tensor
            if produced >= release_every:
                self.release()
                produced = 0
        self.release()

    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict(self.iter_full_tensors())


def open_checkpoint(path: str, tag: Optional[str] = None, *, trusted: bool = False,
                    replica_tolerance: float = 0.0) -> Checkpoint:
    """Resolve ``path`` (run dir, ``checkpoints/`` dir or tag dir) and open the checkpoint."""
    return Checkpoint(resolve_checkpoint(path, tag), trusted=trusted, replica_tolerance=replica_tolerance)


def consolidate(path: str, tag: Optional[str] = None, *, trusted: bool = False,
                replica_tolerance: float = 0.0) -> Tuple["OrderedDict[str, torch.Tensor]", Checkpoint]:
    """One fp32 state dict for the single-process ``RILS`` model, plus the opened checkpoint."""
    ckpt = open_checkpoint(path, tag, trusted=trusted, replica_tolerance=replica_tolerance)
    return ckpt.state_dict(), ckpt
