"""Our checkpoints one layer at a time, whatever layout saved them, and back.

A ``dist_checkpointing`` checkpoint stores global tensors, so a single process can read any slice of
it. :class:`LayerReader` builds the model once on the meta device (no memory) in the single-process
layout, takes megatron-core's sharded state dict of it (which knows every module's global key, layer
offset and SwiGLU / Mamba split) and loads only the entries of one layer at a time: peak memory is one
layer, not the model. :class:`LayerWriter` writes one the same way (the import), as a checkpoint any
layout can load.
"""

from __future__ import annotations

import copy
import os
import re
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from megatron_ext.mcore_compat import canonical_name

SINGLE = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
          "expert_model_parallel_size": 1, "sequence_parallel": False}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@contextmanager
def single_process() -> Iterator[None]:
    """A one-process group and megatron-core's parallel state, for tools outside torchrun."""
    from megatron_ext import distributed

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    distributed.initialize(SINGLE, seed=0)
    try:
        yield
    finally:
        distributed.destroy()


def checkpoint_vocab_size(checkpoint: Path) -> int:
    """The (padded) vocabulary the checkpoint's embedding was saved with (padding depends on its TP)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    return int(meta["embedding.word_embeddings.weight"].global_shape[0])


def build_single(model_cfg: Mapping[str, Any], vocab_size: int, device: str = "meta") -> torch.nn.Module:
    """The model in the single-process layout (inside :func:`single_process`)."""
    from megatron_ext import model_builder

    config = model_builder.transformer_config(model_cfg, SINGLE)
    config.perform_initialization = device != "meta"
    with torch.device(device):
        (model,) = model_builder.build_model(model_cfg, config, vocab_size)
    return model


class LayerReader:
    """Read one layer's parameters (named as in the single-process model's ``state_dict``, minus the
    ``decoder.layers.<i>.`` prefix; :func:`~megatron_ext.mcore_compat.canonical_name` spelling), or the
    outer ones (embedding, final norm, output layer)."""

    def __init__(self, checkpoint: Path, model_cfg: Mapping[str, Any]):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        self.checkpoint = Path(checkpoint)
        self.vocab_size = checkpoint_vocab_size(self.checkpoint)
        model = build_single(model_cfg, self.vocab_size)
        entries = {canonical_name(k): v for k, v in model.sharded_state_dict().items()
                   if isinstance(v, (ShardedTensor, ShardedTensorFactory))}
        self.layers: dict[int, list[str]] = {}
        self.outer: list[str] = []
        for name in entries:
            m = _LAYER.match(name)
            (self.layers.setdefault(int(m.group(1)), []) if m else self.outer).append(name)
        self._entries = entries

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _load(self, names: list[str]) -> dict[str, torch.Tensor]:
        from megatron.core import dist_checkpointing

        request = {}
        for name in names:
            entry = copy.copy(self._entries[name])   # the meta model's entry, with real memory to load into
            entry.data = torch.empty(entry.data.shape, dtype=entry.data.dtype)
            request[name] = entry
        # megatron-core turns SwiGLU / Mamba factories into plain sharded tensors and merges them
        # back; the strategy reads each one's region of the stored global tensor. One layer is a
        # deliberately partial read: skip the check that requests cover every tensor.
        loaded = dist_checkpointing.load(request, str(self.checkpoint), sharded_strategy=_RegionLoad(),
                                         validate_access_integrity=False)
        return {name: loaded[name] for name in names}

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"decoder.layers.{layer}."
        return {name[len(prefix):]: t for name, t in self._load(self.layers[layer]).items()}

    def read_outer(self) -> dict[str, torch.Tensor]:
        return self._load(self.outer)


def _region_load_strategy_class():
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    try:   # megatron-core 0.16's strategy base class; 0.17+ calls any object with load()
        from megatron.core.dist_checkpointing.strategies.base import LoadShardedStrategy
    except ImportError:
        LoadShardedStrategy = object
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    def _stored(sh: ShardedTensor) -> torch.Tensor:
        """The destination viewed with the stored tensor's rank (stacked layers / experts add axes)."""
        return sh.data.view((1,) * sh.prepend_axis_num + tuple(sh.data.shape))

    class RegionPlanner(DefaultLoadPlanner):
        """Reads given regions of stored global tensors into given tensors (no process group)."""

        def __init__(self, regions: dict[str, list[ShardedTensor]]):
            super().__init__()
            self.regions = regions

        def create_local_plan(self):
            items = []
            for key, shards in self.regions.items():
                if key not in self.metadata.state_dict_metadata:
                    raise KeyError(f"{key} is not in the checkpoint")
                chunks = [ChunkStorageMetadata(offsets=torch.Size(sh.global_offset), sizes=_stored(sh).shape)
                          for sh in shards]
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], chunks)
            from torch.distributed.checkpoint.planner import LoadPlan

            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            dest = _stored(self.regions[read_item.dest_index.fqn][read_item.dest_index.index])
            for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                dest = dest.narrow(dim, offset, length)
            return dest

        def commit_tensor(self, read_item, tensor):
            pass   # resolve_tensor returned a view of the destination

    class RegionLoad(LoadShardedStrategy):
        """A megatron-core load strategy for torch_dist checkpoints that reads exactly the requested
        regions in one process, whatever the checkpoint's layout."""

        def load(self, sharded_state_dict, checkpoint_dir, *_async_strategy):
            regions: dict[str, list[ShardedTensor]] = {}
            for sh in nested_values(sharded_state_dict):
                assert isinstance(sh, ShardedTensor) and sh.flattened_range is None, sh
                regions.setdefault(sh.key, []).append(sh)
            dcp_load({}, storage_reader=FileSystemReader(str(checkpoint_dir)), planner=RegionPlanner(regions),
                     no_dist=True)
            dict_list_map_inplace(lambda sh: sh.data, sharded_state_dict)
            return sharded_state_dict

        def load_tensors_metadata(self, checkpoint_dir):
            raise NotImplementedError

        def load_sharded_metadata(self, checkpoint_dir):
            raise NotImplementedError

        def check_backend_compatibility(self, loaded_backend):
            pass

        def check_version_compatibility(self, loaded_version):
            pass

        @property
        def can_handle_sharded_objects(self):
            return False

    return RegionLoad


def _RegionLoad():
    global _REGION_LOAD
    if _REGION_LOAD is None:
        _REGION_LOAD = _region_load_strategy_class()
    return _REGION_LOAD()


_REGION_LOAD = None


class LayerWriter:
    """Write a checkpoint one layer at a time (the import): peak memory is one layer, not the model.

    Each layer is saved by megatron-core as a partial checkpoint (its share of the global tensors,
    in the single-process layout), then :meth:`finish` merges the partials' torch-DCP metadata and
    files into one checkpoint folder, the same one a whole-model save writes, loadable under any layout.
    """

    def __init__(self, path: Path, model_cfg: Mapping[str, Any], vocab_size: int):
        from megatron_ext.errors import ConfigError

        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()):
            raise ConfigError(f"{path} exists and is not empty: choose a new output folder (nothing is overwritten)")
        self.path.mkdir(parents=True, exist_ok=True)
        model = build_single(model_cfg, vocab_size)
        # tensors, factories and the modules' extra state, under the names the import passes
        self._entries = {canonical_name(k): v for k, v in model.sharded_state_dict().items()}
        self._partials: list[Path] = []
        self._outer: Path | None = None

    def _names(self, layer: int | None) -> list[str]:
        def layer_of(name: str) -> int | None:
            m = _LAYER.match(name)
            return int(m.group(1)) if m else None
        return [n for n in self._entries if layer_of(n) == layer]

    def _save(self, tensors: Mapping[str, torch.Tensor], names: list[str], common: dict | None = None) -> None:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        unknown = sorted(set(tensors) - set(names))
        assert not unknown, f"tensors the model does not have: {unknown[:5]}"
        request: dict[str, Any] = dict(common or {})
        for name in names:
            entry = self._entries[name]
            if isinstance(entry, (ShardedTensor, ShardedTensorFactory)):
                if name not in tensors:
                    raise KeyError(f"no tensor given for {name}")
                entry = copy.copy(entry)
                entry.data = tensors[name].contiguous()
                assert entry.data.shape == self._entries[name].data.shape, (name, entry.data.shape)
            request[name] = entry
        partial = self.path / f".partial-{len(self._partials):05d}"
        partial.mkdir()
        _save_partial(request, partial)
        self._partials.append(partial)
        if common:
            self._outer = partial

    def write_layer(self, layer: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """``tensors``: layer ``layer``'s parameters named without the ``decoder.layers.<i>.`` prefix."""
        prefix = f"decoder.layers.{layer}."
        self._save({prefix + k: v for k, v in tensors.items()}, self._names(layer))

    def write_outer(self, tensors: Mapping[str, torch.Tensor], progress: dict | None = None) -> None:
        from megatron_ext import checkpointing

        progress = dict(progress or {}, step=0, world_size=1, model_parallel=checkpointing.model_parallel_sizes())
        self._save(tensors, self._names(None), common={"progress": progress})

    def finish(self) -> Path:
        """Merge the partial checkpoints into ``path`` (the outer partial carries common.pt)."""
        assert self._outer is not None, "write_outer first"
        import os
        import pickle
        import shutil

        from torch.distributed.checkpoint import FileSystemReader

        merged = None
        for i, partial in enumerate(self._partials):
            md = FileSystemReader(str(partial)).read_metadata()
            for index, info in md.storage_data.items():
                info.relative_path = f"p{i:05d}{info.relative_path}"
            for file in partial.glob("*.distcp"):
                os.replace(file, self.path / f"p{i:05d}{file.name}")
            if merged is None:
                merged = md
            else:
                for key, meta in md.state_dict_metadata.items():
                    if key in merged.state_dict_metadata and hasattr(meta, "chunks"):
                        merged.state_dict_metadata[key].chunks.extend(meta.chunks)
                    else:
                        merged.state_dict_metadata[key] = meta
                merged.storage_data.update(md.storage_data)
        shutil.copy(self._outer / "common.pt", self.path / "common.pt")   # the progress record
        shutil.copy(self._outer / "metadata.json", self.path / "metadata.json")
        merged.all_local_plans = None
        with open(self.path / ".metadata", "wb") as f:
            pickle.dump(merged, f)
        for partial in self._partials:
            shutil.rmtree(partial)
        return self.path


def _save_partial(state: dict, path: Path) -> None:
    """Write part of a model's sharded state dict as a torch_dist checkpoint folder.

    megatron-core's own save cannot: in one process it takes the other layers' fragments of a stacked
    tensor for this rank's and refuses. This writes the same files (torch DCP shards + .metadata,
    megatron-core's common.pt and metadata.json) with a planner that declares exactly the given chunks.
    """
    import io
    import json

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    common = {k: v for k, v in state.items() if k == "progress"}
    sharded = {k: v for k, v in state.items() if k != "progress"}
    apply_factories(sharded)   # SwiGLU / Mamba factories -> the sharded tensors they store
    data: dict[tuple, Any] = {}
    items = []
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            t = sh.data.contiguous().view((1,) * sh.prepend_axis_num + tuple(sh.data.shape))
            offsets = torch.Size(sh.global_offset)
            items.append(WriteItem(index=MetadataIndex(sh.key, offsets), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets, t.shape),
                                                               properties=TensorProperties.create_from_tensor(t),
                                                               size=torch.Size(sh.global_shape))))
            data[(sh.key, tuple(offsets))] = t
        else:
            assert isinstance(sh, ShardedObject), sh
            buffer = io.BytesIO()
            torch.save([sh.data], buffer)   # as megatron-core stores a rank's objects of one key
            buffer.seek(0)
            items.append(WriteItem(index=MetadataIndex(sh.unique_key), type=WriteItemType.BYTE_IO))
            data[(sh.unique_key, ())] = buffer

    class Planner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items, planner_data={})
            return self.plan

        def resolve_data(self, write_item: WriteItem):
            return data[(write_item.index.fqn, tuple(write_item.index.offset or ()))]

    dcp_save({}, storage_writer=FileSystemWriter(str(path), single_file_per_rank=True, thread_count=1),
             planner=Planner(), no_dist=True)
    data.clear()   # the planner class is in a reference cycle: free the layer now, not at the next GC
    torch.save(common, path / "common.pt")
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                    "common_backend": "torch", "common_backend_version": 1}))
