"""LoRA adapters served by name (infer.loras): where each expert's adapter comes from, how it is read, checked
against the expert, and activated for each request.

    infer.loras.NAME ─► resolve (driver): per expert an AdapterFile ─ a safetensors file in any format
                        diffusers' Wan loader reads, or a wanray LoRA run's checkpoint
                     ─► check (driver, on the expert's shapes): every key names a module, every rank fits
                     ─► LoadedAdapters (each expert stage): loaded on first use into the resident expert
                        (peft), at most infer.max_loaded_loras (least recently used unloaded), and
                        activated per request with diffusers' set_adapters (names and scales, stacked)

Activation rather than peft's hot-swap: hot-swap replaces one adapter's weights in place (its use is a
compiled model that must not recompile), so it cannot stack adapters or keep several loaded; activating
is a flag and a scale on each adapted layer, microseconds per request, and the base weights never change.
A request's frames with an adapter equal diffusers' WanPipeline after `load_lora_weights` and `set_adapters`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from wanray import storage
from wanray.errors import ConfigError
from wanray.sections import InferConfig, LoraConfig, LoraSource
from wanray.wan import EXPERTS, ModelKind

logger = logging.getLogger(__name__)
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
"""The file diffusers' save_lora_weights writes (an export's <transformer>/lora/ holds one)."""
EXPORT_FOLDERS = {"high": "transformer", "low": "transformer_2"}


@dataclass(frozen=True)
class AdapterFile:
    """One expert's adapter: a safetensors file (diffusers, kohya/musubi or original Wan keys), or the
    checkpoint of a wanray LoRA run (its rank, alpha and target modules from the run's config)."""

    path: str
    lora: LoraConfig | None = None
    """A wanray run's LoRA settings when `path` is a DCP checkpoint; None for a file."""
    version: str | None = None
    """A file's version (storage.version) when the driver resolved it: every stage and replica reads that one,
    or refuses (a file overwritten while served would give the experts, or the replicas, different adapters
    under one name). None for a run's checkpoint, which is never written again."""

    def read(self, model_dir: str, expert: str) -> tuple[dict[str, torch.Tensor], dict | None]:
        """(the adapter as diffusers' Wan loader hands it to the transformer: "transformer."-prefixed
        lora_A / lora_B keys, its metadata or None)."""
        if self.lora is not None:
            from wanray.train.export import checkpoint_adapter

            tensors = checkpoint_adapter(model_dir, expert, self.path, self.lora)
            metadata = {"r": self.lora.rank, "lora_alpha": self.lora.alpha, "target_modules": self.lora.target_modules}
            return {f"transformer.{k}": v for k, v in tensors.items()}, {
                f"transformer.{k}": v for k, v in metadata.items()
            }
        from diffusers import WanPipeline

        try:
            with self._local() as local:
                state, metadata = WanPipeline.lora_state_dict(local, return_lora_metadata=True)
        except (OSError, ValueError, KeyError) as e:  # not safetensors, a broken file, keys no converter knows
            raise ConfigError(
                f"{self.path} is not a LoRA adapter diffusers can read: {str(e).splitlines()[0]}"
            ) from None
        return state, metadata

    def numel(self, model_dir: str, expert: str) -> int:
        """Elements of the adapter's tensors, read from the file's header or the run's shapes (no tensor data)."""
        if self.lora is not None:
            from wanray.train.parallel import build_on_meta

            model = build_on_meta(model_dir, expert, self.lora)
            return sum(t.numel() for n, t in model.state_dict().items() if ".lora_" in n)
        from safetensors import safe_open

        with self._local() as local, safe_open(local, "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "lora" in k)  # noqa: SIM118  (a handle, no dict)

    @contextlib.contextmanager
    def _local(self) -> Iterator[str]:
        """The file as a local path while the block reads it, which must be the version resolved at start: then,
        and still once the block has read it (an object overwritten while it downloaded, a file while read)."""
        try:
            with storage.local_copy(self.path, self.version) as local:
                yield local
            if self.version is not None and storage.version(self.path) != self.version:
                raise storage.Changed(self.path)
        except storage.Changed:
            raise ConfigError(
                f"{self.path} was overwritten after it was checked at start: reading it now would give some "
                "experts or replicas another adapter under the same name; give the new file a new name, or start "
                "again"
            ) from None

    @property
    def label(self) -> str:
        return f"{self.path} (wanray run checkpoint)" if self.lora is not None else self.path


Adapters = dict[str, dict[str, AdapterFile]]
"""Adapter name -> expert ("high", "low") -> its file; an expert an adapter has no file for runs without it."""


def _file(path: str, where: str) -> AdapterFile:
    """An adapter file, or a folder holding one (diffusers' pytorch_lora_weights.safetensors or a single
    .safetensors): never a pickle (.bin, .pt, .ckpt), which can run code when read. Local or in a store."""
    if storage.is_dir(path):
        found = storage.list_files(path, "*.safetensors")
        named = storage.join(path, ADAPTER_FILE)
        if storage.is_file(named):
            return AdapterFile(storage.absolute(named), version=storage.version(named))
        if len(found) != 1:
            raise ConfigError(f"{where}: {path} holds {len(found)} .safetensors files; name the adapter file itself")
        path = found[0]
    if not storage.is_file(path):
        raise ConfigError(f"{where}: {path} not found")
    if not path.endswith(".safetensors"):
        raise ConfigError(f"{where}: {path} is not a .safetensors file (adapters load from safetensors only)")
    return AdapterFile(storage.absolute(path), version=storage.version(path))


def _run(run: str, source: LoraSource, experts: tuple[str, ...], where: str) -> dict[str, AdapterFile]:
    """Each trained expert's adapter in a wanray run directory: its latest checkpoint, or source.step's."""
    from wanray.train.runs import RUN_FILE, checkpoints, trained_lora

    out = {}
    for expert in experts:
        if not storage.is_file(storage.join(run, expert, RUN_FILE)):
            continue
        lora = trained_lora(run, expert, LoraConfig())
        if not lora.enabled:
            raise ConfigError(
                f"{where}: {storage.join(run, expert)} fine-tuned the whole expert, not LoRA adapters: export it "
                "(export.py) and serve the export as model.path"
            )
        found = checkpoints(run, expert)
        step = source.step or max(found, default=0)
        if step not in found:
            raise ConfigError(
                f"{where}: {storage.join(run, expert)} has no checkpoint at step {step} "
                f"(steps: {', '.join(map(str, sorted(found))) or 'none'})"
            )
        out[expert] = AdapterFile(storage.absolute(found[step]), lora)
    return out


def resolve(infer: InferConfig, kind: ModelKind) -> Adapters:
    """infer.loras as files per expert; a source that is missing, unreadable as an adapter source, or gives a
    one-transformer model a low-noise file is a ConfigError naming its key."""
    from wanray.train.runs import RUN_FILE

    adapters: Adapters = {}
    for name, source in infer.loras.items():
        assert isinstance(source, LoraSource)  # InferConfig makes every entry one
        where = f"infer.loras.{name}"
        if not source.path:
            files = {e: _file(p, f"{where}.{e}") for e in EXPERTS if (p := getattr(source, e))}
        elif any(storage.is_file(storage.join(source.path, e, RUN_FILE)) for e in EXPERTS):
            files = _run(source.path, source, kind.experts, where)
        elif any(storage.is_dir(storage.join(source.path, EXPORT_FOLDERS[e], "lora")) for e in kind.experts):
            files = {
                e: _file(folder, f"{where}.{e}")
                for e in kind.experts
                if storage.is_dir(folder := storage.join(source.path, EXPORT_FOLDERS[e], "lora"))
            }
        else:
            one = _file(source.path, where)
            files = dict.fromkeys(kind.experts, one)
        if "low" in files and kind.one_transformer:
            raise ConfigError(f"{where}: {kind.title} has one transformer: give its adapter as path or high, not low")
        if not files:
            raise ConfigError(f"{where}: {source.path} holds no adapter of this model's experts")
        if source.step and not any(f.lora for f in files.values()):
            raise ConfigError(f"{where}: step applies to a wanray run directory, which {source.path} is not")
        adapters[name] = files
    return adapters


def check(state: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """Every key of the adapter (as diffusers' loader hands it over) names a linear module of `model` and fits
    its shape, A and B of one rank: a ConfigError naming the first key that does not (peft would skip a key that
    names no module with a warning, and fail on a wrong shape midway through loading)."""
    modules = dict(model.named_modules())
    for key, tensor in state.items():
        name = key.removeprefix("transformer.")
        module_name, sep, part = name.partition(".lora_")
        module = modules.get(module_name)
        base = getattr(module, "base_layer", module)  # a module already adapted (peft) wraps the linear
        if not sep or key == name or not isinstance(base, torch.nn.Linear):
            raise ConfigError(f"{where}: key {key!r} matches no linear module of the expert")
        if part == "A.weight":
            if tensor.ndim != 2 or tensor.shape[1] != base.in_features:
                raise ConfigError(
                    f"{where}: {key} has shape {tuple(tensor.shape)}; {module_name} takes {base.in_features} inputs"
                )
            other = state.get(f"{key[: -len('A.weight')]}B.weight")
            if other is None or other.ndim != 2 or other.shape[1] != tensor.shape[0]:
                raise ConfigError(
                    f"{where}: {module_name}'s lora_A has rank {tensor.shape[0]} but its lora_B is "
                    f"{None if other is None else tuple(other.shape)}"
                )
        elif part == "B.weight":
            if f"{key[: -len('B.weight')]}A.weight" not in state:  # peft would keep its random init for A
                raise ConfigError(f"{where}: {module_name} has a lora_B but no lora_A")
            if tensor.ndim != 2 or tensor.shape[0] != base.out_features:
                raise ConfigError(
                    f"{where}: {key} has shape {tuple(tensor.shape)}; {module_name} gives {base.out_features} outputs"
                )
        elif part != "B.bias":
            raise ConfigError(f"{where}: key {key!r} is no LoRA tensor (lora_A.weight, lora_B.weight, lora_B.bias)")


def prepared(file: AdapterFile, model: torch.nn.Module, model_dir: str, expert: str, where: str):
    """(state dict, metadata) of `file` for `model`, checked: as load_lora_weights prepares it (a text-to-video
    adapter gets zero image projections on an image-to-video expert, as diffusers does)."""
    from diffusers import WanPipeline

    state, metadata = file.read(model_dir, expert)
    state = WanPipeline._maybe_expand_t2v_lora_for_i2v(model, state)
    check(state, model, where)
    return state, metadata


def check_all(adapters: Adapters, model_dir: str, kind: ModelKind, devices: dict[str, int] | None = None) -> None:
    """Read and check every adapter against its expert's shapes (built on the meta device), in the driver,
    before any replica starts. An expert over several devices (`devices`) takes no adapter of a layer where
    context parallelism splits or gathers the tokens (diffusers' `_cp_plan`: proj_out gathers them; peft would
    add the adapter's per-shard output to the gathered one)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from wanray import models

    for expert in kind.experts:
        named = {n: files[expert] for n, files in adapters.items() if expert in files}
        if not named:
            continue
        with init_empty_weights(include_buffers=False):
            model = WanTransformer3DModel.from_config(models.expert_config(model_dir, expert))
        count = (devices or {}).get(expert, 1)
        split_at = set(model._cp_plan or {}) if count > 1 else set()
        for name, file in named.items():
            where = f"infer.loras.{name} ({expert}-noise expert, {file.label})"
            state, _ = prepared(file, model, model_dir, expert, where)
            at = sorted({k.removeprefix("transformer.").partition(".lora_")[0] for k in state} & split_at)
            if at:
                raise ConfigError(
                    f"{where}: adapts {', '.join(at)}, where the expert's {count} devices gather "
                    "their tokens: serve it on one device per expert"
                )


def loaded_bytes(adapters: Adapters, model_dir: str, expert: str, most: int, element_size: int) -> int:
    """What an expert's adapters can hold at once: the `most` largest, in the expert's dtype (peft casts them)."""
    sizes = sorted(
        (files[expert].numel(model_dir, expert) for files in adapters.values() if expert in files), reverse=True
    )
    return sum(sizes[:most]) * element_size


class LoadedAdapters:
    """One expert's adapters: loaded into it on first use (peft layers beside the frozen base weights, in
    the expert's own memory), at most `most` at once, and activated per request."""

    def __init__(self, model, expert: str, adapters: Adapters, model_dir: str, most: int):
        self.model, self.expert, self.model_dir, self.most = model, expert, model_dir, most
        self.files = {n: files[expert] for n, files in adapters.items() if expert in files}
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recently used first
        self.names: tuple[str, ...] = ()
        """The adapters loaded now, least recently used first: a snapshot other threads may read (health)."""
        self.loads = 0
        """Adapters read into the expert so far (a test counts them)."""

    def _load(self, name: str) -> None:
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        file = self.files[name]  # read and checked before another is unloaded for it: one that fails (a file
        # overwritten since start, a store's error) costs the loaded ones nothing
        state, metadata = prepared(file, self.model, self.model_dir, self.expert, f"adapter {name}")
        if len(self.loaded) >= self.most:
            evicted, _ = self.loaded.popitem(last=False)
            self.model.delete_adapters(evicted)
            self.names = tuple(self.loaded)
            logger.info(
                "%s-noise expert: unloaded adapter %s (infer.max_loaded_loras %d)", self.expert, evicted, self.most
            )
        with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the point
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            self.model.load_lora_adapter(state, adapter_name=name, metadata=metadata, prefix="transformer")
        self.loaded[name] = None
        self.loads += 1
        self.names = tuple(self.loaded)

    def activate(self, loras: tuple[tuple[str, float], ...]) -> None:
        """The request's adapters that this expert has, at their scales, and no other; none: the base expert."""
        uses = [(n, s) for n, s in loras if n in self.files]
        for name, _ in uses:  # the request's own adapters are the most recently used: never unloaded here
            self._load(name)
        self.names = tuple(self.loaded)
        if not self.loaded:
            return
        if not uses:
            self.model.disable_lora()
            return
        self.model.enable_lora()
        self.model.set_adapters([n for n, _ in uses], [s for _, s in uses])
