"""The method registry, the `layers` selection language, and what a method returns."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from torch import nn

from ..configbase import ConfigBase
from ..errors import ConfigError, close_matches, did_you_mean
from ..towers.base import Tower


@dataclass
class NoOptions(ConfigBase):
    """This method takes no options."""


@dataclass
class MethodResult:
    """What applying one rule to one tower did."""

    trainable: list[nn.Parameter] = field(default_factory=list)
    frozen: list[nn.Parameter] = field(default_factory=list)


ApplyFn = Callable[[Tower, "Selection", ConfigBase, str], MethodResult]


@dataclass(frozen=True)
class MethodSpec:
    """A registered tuning method: its name, options dataclass, apply function and summary."""

    name: str
    apply: ApplyFn
    options: type[ConfigBase]
    summary: str


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, options: type[ConfigBase] = NoOptions) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator: register `apply(tower, selection, options, tag)` under `name`."""

    def wrap(fn: ApplyFn) -> ApplyFn:
        if name in METHODS:
            raise ValueError(f"tuning method {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        METHODS[name] = MethodSpec(name, fn, options, summary)
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    """The registered method called `name`, or an error listing the known ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown tuning method {name!r}.{did_you_mean(name, METHODS)} "
                          f"Known methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


_BLOCKS = re.compile(r"^blocks\.(\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*)$")
_TOP = re.compile(r"^(top|bottom):(\d+)$")


def short_name(name: str) -> str:
    """A tower parameter name without the leading 'backbone.' (how rules spell names)."""
    return name[len("backbone."):] if name.startswith("backbone.") else name


@dataclass
class Selection:
    """The part of a tower a rule's `layers` covers: whole tower, some blocks, or a name glob."""

    spec: str
    blocks: list[int]
    prefixes: tuple[str, ...] | None = None  # module names of selected blocks; None: whole tower
    pattern: str | None = None                # glob on parameter names

    def contains(self, name: str) -> bool:
        """Whether tower parameter `name` is inside the selection."""
        if self.pattern is not None:
            return fnmatch.fnmatchcase(short_name(name), self.pattern) or fnmatch.fnmatchcase(name, self.pattern)
        if self.prefixes is None:
            return True
        return any(name.startswith(p + ".") for p in self.prefixes)

    def named_parameters(self, tower: Tower) -> Iterator[tuple[str, nn.Parameter]]:
        """Tower parameters inside the selection."""
        return ((n, p) for n, p in tower.named_parameters() if self.contains(n))


def _parse_indices(text: str, count: int, spec: str, tower: Tower) -> list[int]:
    indices: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        start, stop = int(lo), int(hi or lo)
        if start > stop or stop >= count:
            raise ConfigError(f"layers={spec!r}: the {tower.kind} tower has blocks 0-{count - 1}; "
                              f"{part!r} is outside that.")
        indices.extend(range(start, stop + 1))
    return sorted(set(indices))


_LAYERS_HELP = ("Use 'all', 'top:K', 'bottom:K', 'blocks.I', 'blocks.I-J' (comma-separated ranges allowed) or a "
                "parameter-name glob such as 'blocks.*.attn.*'.")


def check_layers(spec: str) -> None:
    """Refuse a `layers` spec that no tower could understand (before any tower is built)."""
    if spec == "all" or _TOP.match(spec) or _BLOCKS.match(spec) or any(c in spec for c in "*?[") or "." in spec:
        if (m := _TOP.match(spec)) and int(m.group(2)) < 1:
            raise ConfigError(f"layers={spec!r}: K must be >= 1.")
        return
    raise ConfigError(f"layers={spec!r} is not understood. {_LAYERS_HELP}")


def select(tower: Tower, spec: str) -> Selection:
    """Parse a `layers` spec ('all', 'top:K', 'bottom:K', 'blocks.8-11', or a glob) for one tower."""
    count = tower.num_blocks
    names = tower.block_names()
    if spec == "all":
        return Selection(spec, list(range(count)))
    if _TOP.match(spec) or _BLOCKS.match(spec):  # block indices mean something only in a known family
        tower.require_layout(f"layers={spec!r}")
    if m := _TOP.match(spec):
        k = int(m.group(2))
        if not 1 <= k <= count:
            raise ConfigError(f"layers={spec!r}: the {tower.kind} tower has {count} blocks; use 1 <= K <= {count}.")
        idx = list(range(count - k, count)) if m.group(1) == "top" else list(range(k))
    elif m := _BLOCKS.match(spec):
        if count == 0:
            raise ConfigError(f"layers={spec!r}: the {tower.kind} tower exposes no blocks; use 'all' or a glob.")
        idx = _parse_indices(m.group(1), count, spec, tower)
    elif any(c in spec for c in "*?[") or "." in spec:
        params = [n for n, _ in tower.named_parameters()]
        sel = Selection(spec, [], pattern=spec)
        hits = [n for n in params if sel.contains(n)]
        if not hits:
            shorts = sorted({short_name(n) for n in params})
            hint = close_matches(spec, shorts, n=5)
            raise ConfigError(f"layers={spec!r} matches no parameter of the {tower.kind} tower. "
                              + (f"Close names: {', '.join(hint)}. " if hint else "")
                              + f"Names look like: {', '.join(shorts[:3])}, ...")
        sel.blocks = [i for i, b in enumerate(names) if any(h.startswith(b + ".") for h in hits)]
        return sel
    else:
        raise ConfigError(f"layers={spec!r} is not understood. {_LAYERS_HELP}")
    return Selection(spec, idx, prefixes=tuple(names[i] for i in idx))


def block_targets(tower: Tower, selection: Selection, patterns: list[str],
                  types: tuple[type, ...]) -> list[str]:
    """Tower module names inside selected blocks whose block-relative name matches a pattern."""
    names = tower.block_names()
    found: list[str] = []
    for i in selection.blocks:
        block = tower.blocks()[i]
        for rel, module in block.named_modules():
            if rel and isinstance(module, types) and any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                full = f"{names[i]}.{rel}"
                if selection.pattern is None or any(selection.contains(f"{full}.{n}")
                                                    for n, _ in module.named_parameters()):
                    found.append(full)
    return found


def block_module_names(tower: Tower, index: int, types: tuple[type, ...]) -> list[str]:
    """Block-relative names of modules of `types` in block `index` (for error hints)."""
    return [rel for rel, m in tower.blocks()[index].named_modules() if rel and isinstance(m, types)]
