"""``save_to`` / ``restore_from``: a model (or state dict), its config and its artifacts in one archive.

Archives use NeMo's layout (see :mod:`shardwise.archive.layout`), so NeMo restores them, and
shardwise restores NeMo's. Unlike NeMo:

- restoring never unpacks the archive: weights are read in place, straight into the model's
  parameters, and only the artifacts the config names are copied out;
- the class to build comes from the caller (``model_cls``); the config's ``target`` class path is
  imported only with ``allow_target``, because importing a path named by a file runs its code;
- ``nemo:`` artifact paths stay valid as long as the returned object lives (not just during the
  constructor).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import os
import shutil
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable

from ..atomic import process_temporary_folder
from ..errors import FormatError, LayoutError, OptionError
from ..plan import plan_output
from ..dtypes import name_of, parse_cast_dtype
from ..tensors import MemorySource, tensor_bytes
from .artifacts import plan_artifacts, references, resolve_references
from .layout import ranks_of_process
from .manifest import verify_members
from .reader import Archive
from .writer import planned_shards, write_archive
from ..storage import accepts_urls

__all__ = ["save_to", "restore_from", "ArchiveMixin", "RestoredArchive", "plain_config", "load_weights_into"]


def plain_config(config: Any) -> dict:
    """A deep, plain-dict copy of a config given as dict, OmegaConf config, dataclass, Namespace or None."""
    if config is None:
        return {}
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif not isinstance(config, dict) and hasattr(config, "__dict__"):
        config = vars(config)
    if not isinstance(config, dict):
        raise OptionError(f"config must be a mapping (dict, OmegaConf, dataclass), not {type(config).__name__}")
    return copy.deepcopy(config)


@accepts_urls(outputs=("path",))
def save_to(
    model_or_state_dict: Any,
    path: str | os.PathLike,
    *,
    config: Any = None,
    artifacts: dict[str, str | os.PathLike] | None = None,
    weights_format: str = "torch",
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a model (``nn.Module``) or state dict, its config and artifacts as one archive at ``path``.

    - ``config``: dict, OmegaConf config or dataclass; default for a module: its
      ``archive_config()`` (see :class:`ArchiveMixin`), else its ``config`` or ``cfg`` attribute.
      A module's class path is recorded as ``target`` unless the config has one.
    - ``artifacts``: dotted config key -> local file or folder; each is packed as
      ``<32 hex>_<name>`` and the config value becomes ``nemo:<32 hex>_<name>`` (as NeMo does).
    - ``weights_format``: ``torch`` (``model_weights.ckpt``, NeMo's default) or ``safetensors``.
    - ``dtype``: cast floating tensors (``bf16``, ``fp16``, ``fp32``) on the way out.

    Tensors are written one at a time; the archive is committed atomically. Call on one process
    (global rank 0 under torch.distributed). Returns ``path``.

    >>> shardwise.save_to(model, "model.nemo", artifacts={"tokenizer.model": "tok.model"})  # doctest: +SKIP
    """
    import torch

    path = Path(path)
    if isinstance(model_or_state_dict, torch.nn.Module):
        module = model_or_state_dict
        if config is None:
            config = _module_config(module)
        config = plain_config(config)
        config.setdefault("target", f"{type(module).__module__}.{type(module).__qualname__}")
        state_dict = module.state_dict()
    elif isinstance(model_or_state_dict, dict):
        config, state_dict = plain_config(config), model_or_state_dict
    else:
        raise OptionError(f"save_to takes an nn.Module or a state dict, not {type(model_or_state_dict).__name__}")
    planned_artifacts = plan_artifacts(config, artifacts or {})
    source = MemorySource(state_dict, label=str(path))
    cast = parse_cast_dtype(dtype) if dtype else None
    planned = plan_output(source.infos(), to="torch" if weights_format == "torch" else "safetensors", cast=cast).files[0]
    write_archive(
        path, config=config, shards=planned_shards([(0, 0, source, planned)]), weights_format=weights_format,
        artifacts=planned_artifacts, overwrite=overwrite,
    )
    return path


def _module_config(module: Any) -> Any:
    if hasattr(module, "archive_config"):
        return module.archive_config()
    return _attribute_config(module)


def _attribute_config(module: Any) -> Any:
    """A module's ``config`` or ``cfg`` attribute (NeMo models keep theirs as ``cfg``), if it has one."""
    for name in ("config", "cfg"):
        value = getattr(module, name, None)
        if value is not None and not callable(value):
            return value
    return None


class _ArtifactFolder:
    """A folder of extracted artifacts, removed when its owner is garbage-collected or on cleanup()."""

    def __init__(self, owner: Any, folder: Path, temporary: bool) -> None:
        self._finalizer = weakref.finalize(owner, shutil.rmtree, str(folder), True) if temporary else None

    def cleanup(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


class RestoredArchive:
    """What :func:`restore_from` returns without a model class.

    ``config``: the model config with every ``nemo:`` reference replaced by a real path;
    ``state_dict``: this rank's tensors (on ``map_location``; on CPU they are copy-on-write maps of
    the archive's pages, as ``safetensors.torch.load_file`` gives: nothing is read until used,
    writing to a tensor never changes the archive, and the archive must not be rewritten while
    they live); ``tp_rank``/``pp_rank``: which rank's
    weights these are; ``artifacts_dir``: where artifacts were extracted. Artifact paths stay valid
    until :meth:`close` (or the end of a ``with`` block), or until the object is garbage-collected.
    """

    def __init__(self, path: str, config: dict, raw_config: dict, state_dict: dict, layout: dict, tp_rank: int, pp_rank: int) -> None:
        self.path, self.config, self.raw_config, self.state_dict = path, config, raw_config, state_dict
        self.layout, self.tp_rank, self.pp_rank = layout, tp_rank, pp_rank
        self.artifacts_dir: Path | None = None
        self._artifacts: _ArtifactFolder | None = None

    def close(self) -> None:
        if self._artifacts is not None:
            self._artifacts.cleanup()

    def __enter__(self) -> "RestoredArchive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RestoredArchive({self.path!r}, tensors={len(self.state_dict)}, tp_rank={self.tp_rank}, pp_rank={self.pp_rank})"


@accepts_urls(inputs=("path",))
def restore_from(
    path: str | os.PathLike,
    model_cls: type | None = None,
    map_location: Any = "cpu",
    *,
    allow_target: bool | Iterable[str] = False,
    strict: bool = True,
    tp_rank: int | None = None,
    pp_rank: int | None = None,
    artifacts_dir: str | os.PathLike | None = None,
    verify: bool = False,
    trust_pickle: bool = False,
) -> Any:
    """Restore an archive (NeMo's ``.nemo`` or shardwise's) without unpacking it.

    The model class is ``model_cls``, or, only when ``allow_target`` is true (or an iterable of
    allowed module prefixes such as ``["mypackage.models."]``), the class named by the config's
    ``target``. The model is built with ``cls.from_archive_config(config)`` when the class has it
    (:class:`ArchiveMixin` does), else ``cls(config)``, where ``config`` has its ``nemo:``
    references resolved to real paths; weights are then read straight into its parameters
    (``strict``: keys and shapes must match exactly) and it is moved to ``map_location``.
    Without a class, returns a :class:`RestoredArchive` (config and state dict).

    Sharded archives restore one rank: ``tp_rank``/``pp_rank``, or under torch.distributed the
    calling process's ranks (Megatron order: TP fastest, then DP, then PP).

    Artifacts named by the config are copied into ``artifacts_dir`` (kept), or into a temporary
    folder that lives as long as the returned model or RestoredArchive: their paths stay valid
    until it is garbage-collected (or :meth:`RestoredArchive.close` is called).

    ``verify`` checks the CRC-32 of the weights and artifacts against the archive's manifest.
    Raises FormatError, IntegrityError, LayoutError or OptionError naming the file and the problem.

    >>> model = shardwise.restore_from("model.nemo", MyModel)  # doctest: +SKIP
    """
    with Archive(path) as archive:
        label = archive.path
        ranks = _choose_ranks(archive, tp_rank, pp_rank)
        raw_config = archive.model_config
        wanted_artifacts = sorted({member for _, member in references(raw_config)})
        if verify:
            _verify(archive, ranks, wanted_artifacts)
        cls = model_cls or _target_class(raw_config, allow_target, label)
        present = [m for m in wanted_artifacts if archive.index.get(m) is not None]
        folder, temporary = _artifact_folder(artifacts_dir, needed=bool(present))
        try:
            archive.extract(present, folder)
            config = resolve_references(raw_config, folder, label)
            with archive.weights(*ranks, trust_pickle=trust_pickle) as source:
                if cls is None:
                    # a distributed checkpoint's tensors cut in pieces are assembled; the rest map the archive's pages
                    state_dict = {name: source.map(name) if source.stored(name) is not None else source.read(name) for name in source.keys()}
                    if str(map_location) != "cpu":
                        state_dict = {k: v.to(map_location) for k, v in state_dict.items()}
                    result = RestoredArchive(label, config, raw_config, state_dict, archive.layout.as_dict(), *ranks)
                    result.artifacts_dir = folder
                else:
                    result = _build(cls, config, label)
                    load_weights_into(result, source, strict=strict, label=label)
                    if str(map_location) != "cpu":
                        result = result.to(map_location)
        except BaseException:
            if temporary:
                shutil.rmtree(folder, ignore_errors=True)
            raise
    holder = _ArtifactFolder(result, folder, temporary) if folder is not None else None
    if cls is None:
        result._artifacts = holder
    else:
        result.archive_artifacts = holder
    return result


def _choose_ranks(archive: Archive, tp_rank: int | None, pp_rank: int | None) -> tuple[int, int]:
    layout = archive.layout
    if tp_rank is None and pp_rank is None and layout.sharded:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise LayoutError(
                f"{archive.path}: the archive is sharded (TP={layout.tp}, PP={layout.pp}); pass tp_rank= and pp_rank=, "
                f"or call restore_from from every process under torch.distributed"
            )
        return ranks_of_process(dist.get_rank(), dist.get_world_size(), layout.tp, layout.pp)
    ranks = (tp_rank or 0, pp_rank or 0)
    if not (0 <= ranks[0] < layout.tp and 0 <= ranks[1] < layout.pp):
        raise LayoutError(f"{archive.path}: tp_rank={ranks[0]}, pp_rank={ranks[1]} is outside the archive's TP={layout.tp}, PP={layout.pp}")
    return ranks


def _verify(archive: Archive, ranks: tuple[int, int], artifacts: list[str]) -> None:
    if archive.manifest is None:
        warnings.warn(f"{archive.path}: has no shardwise manifest, so there are no checksums to verify", stacklevel=3)
        return
    names = [archive.layout.shards[ranks]] if archive.layout.shards else []
    for member in artifacts:
        names.append(member)
        names.extend(m.name for m in archive.index.under(member))
    verify_members(archive.index, archive.manifest, names)


def _target_class(config: dict, allow_target: bool | Iterable[str], label: str) -> type | None:
    target = config.get("target", config.get("_target_"))
    if not allow_target:
        return None
    if not isinstance(target, str) or "." not in target:
        raise OptionError(f"{label}: allow_target was given but the config has no usable target ({target!r})")
    if not isinstance(allow_target, bool):
        prefixes = [allow_target] if isinstance(allow_target, str) else list(allow_target)
        if not any(target.startswith(p) for p in prefixes):
            raise OptionError(f"{label}: the config's target {target!r} is not under the allowed prefixes {prefixes}; refusing to import it")
    module_name, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise OptionError(f"{label}: cannot import the config's target {target!r} ({e})") from None


def _artifact_folder(artifacts_dir: str | os.PathLike | None, *, needed: bool) -> tuple[Path | None, bool]:
    """Where artifacts go: the caller's folder (kept), a new temporary one, or None when there are none."""
    if artifacts_dir is not None:
        folder = Path(artifacts_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder, False
    if not needed:
        return None, False
    return Path(process_temporary_folder("shardwise-artifacts-")), True  # swept by a later restore if this process is killed


def _build(cls: type, config: dict, label: str) -> Any:
    import torch

    build = getattr(cls, "from_archive_config", None)
    model = build(config) if callable(build) else cls(config)
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"{label}: {cls.__qualname__} built a {type(model).__name__}, not an nn.Module")
    return model


def load_weights_into(module: Any, source: Any, *, strict: bool = True, label: str = "checkpoint") -> tuple[list[str], list[str]]:
    """Read ``source``'s tensors directly into ``module``'s parameters and buffers, one at a time.

    Contiguous CPU parameters of matching dtype receive the file's bytes in place (no temporary
    tensor); others are read, then copied (and cast). Returns ``(missing, unexpected)`` keys; with
    ``strict`` any of those, or a shape mismatch, raises FormatError before anything is loaded.
    """
    import torch

    own = module.state_dict()
    own = {k: v for k, v in own.items() if isinstance(v, torch.Tensor)}
    names = set(source.keys())
    missing = [k for k in own if k not in names]
    unexpected = [k for k in source.keys() if k not in own]
    shapes = [f"{k}: {tuple(own[k].shape)} in the model, {source.info(k).shape} in the file" for k in own if k in names and tuple(own[k].shape) != source.info(k).shape]
    if shapes:
        raise FormatError(f"{label}: weights do not fit {type(module).__name__}: " + "; ".join(shapes[:5]))
    if strict and (missing or unexpected):
        raise FormatError(
            f"{label}: weights do not fit {type(module).__name__}: missing {_some(missing)}, unexpected {_some(unexpected)} (strict=False loads the rest)"
        )
    with torch.no_grad():
        for name, target in own.items():
            if name not in names:
                continue
            entry = source.stored(name)
            info = source.info(name)
            direct = (
                entry is not None and entry.contiguous and target.device.type == "cpu" and target.is_contiguous()
                and name_of(target.dtype) == info.dtype and info.nbytes > 0
            )
            if direct:
                source.read_into(entry, entry.offset, tensor_bytes(target))
            else:
                target.copy_(source.read(name))
    return missing, unexpected


def _some(keys: list[str]) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


class ArchiveMixin:
    """Gives an ``nn.Module`` subclass ``model.save_to(path)`` and ``Cls.restore_from(path)``.

    Override :meth:`archive_config` to say what config to save (default: ``self.config`` or
    ``self.cfg``) and :meth:`from_archive_config` to say how to build the model from it
    (default: ``cls(config)``).

    >>> class Net(ArchiveMixin, torch.nn.Module):  # doctest: +SKIP
    ...     def __init__(self, config): super().__init__(); self.config = config; ...
    >>> Net({"hidden": 8}).save_to("net.nemo"); Net.restore_from("net.nemo")  # doctest: +SKIP
    """

    def archive_config(self) -> Any:
        return _attribute_config(self)

    @classmethod
    def from_archive_config(cls, config: dict) -> Any:
        return cls(config)

    def save_to(self, path: str | os.PathLike, *, artifacts: dict[str, str | os.PathLike] | None = None, **options: Any) -> Path:
        """Save this model as an archive (see :func:`shardwise.save_to` for ``options``)."""
        return save_to(self, path, config=self.archive_config(), artifacts=artifacts, **options)

    @classmethod
    def restore_from(cls, path: str | os.PathLike, map_location: Any = "cpu", **options: Any) -> Any:
        """Build this class from an archive (see :func:`shardwise.restore_from` for ``options``)."""
        return restore_from(path, cls, map_location, **options)
