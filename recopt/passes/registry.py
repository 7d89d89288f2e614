"""The pass registry: name → Pass class, and default pipelines per target."""
from __future__ import annotations

import importlib
from typing import Any, Iterable, Optional

from .base import Pass, PassConfig, Semantics

_REGISTRY: dict[str, type] = {}

# Built-in passes live in these modules; each registers itself on import.
# Listed here (not imported at package import) so a broken optional pass
# never breaks `import recopt`.
_BUILTIN_MODULES = (
    "recopt.passes.canonicalize",
    "recopt.passes.dead_code",
    "recopt.passes.gdpa",
    "recopt.passes.gdpa_fusion",
    "recopt.passes.fp8",
    "recopt.passes.kunlun",
    "recopt.passes.sparse2d",
    "recopt.passes.exfm",
)
_builtins_loaded = False


def register_pass(cls: type = None, *, replace: bool = False):
    """Register a :class:`Pass` subclass under ``cls.name``.

    Usable as ``@register_pass`` or ``register_pass(MyPass)``. A name that is
    taken is an error unless ``replace=True``.
    """

    def _register(c: type) -> type:
        if not (isinstance(c, type) and issubclass(c, Pass)):
            raise TypeError(f"register_pass expects a subclass of recopt.Pass, got {c!r}")
        if not c.name or not isinstance(c.name, str):
            raise ValueError(f"{c.__name__} must set a class attribute `name` (a non-empty str)")
        if not isinstance(c.semantics, Semantics):
            raise ValueError(
                f"{c.__name__}.semantics must be recopt.Semantics.EXACT or .ARCHITECTURE"
            )
        if c.name in _REGISTRY and _REGISTRY[c.name] is not c and not replace:
            raise ValueError(
                f"a pass named {c.name!r} is already registered ({_REGISTRY[c.name].__module__}."
                f"{_REGISTRY[c.name].__name__}); pick another name or pass replace=True"
            )
        _REGISTRY[c.name] = c
        return c

    return _register(cls) if cls is not None else _register


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)  # every built-in pass module exists; a failing import is a bug


def available_passes() -> dict[str, type]:
    """All registered passes, name → class (built-ins included)."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type:
    """The pass class registered under ``name``; a clear error lists the valid names."""
    passes = available_passes()
    if name not in passes:
        raise ValueError(f"unknown pass {name!r}; registered passes: {', '.join(passes) or '(none)'}")
    return passes[name]


def default_pipeline(target_name: str) -> list[str]:
    """Names of the exact passes whose ``default_targets`` include this target."""
    out = []
    for name, cls in available_passes().items():
        if cls.semantics is not Semantics.EXACT:
            continue
        if "*" in cls.default_targets or target_name in cls.default_targets:
            out.append(name)
    return order_passes(out)


def order_passes(names: Iterable[str]) -> list[str]:
    """Order pass names so every ``after``/``before`` constraint holds.

    Keeps the given order where constraints allow (a stable topological
    sort); a cycle is an error that names the passes involved.
    """
    names = list(dict.fromkeys(names))
    classes = {n: get_pass(n) for n in names}
    preds: dict[str, set] = {n: set() for n in names}
    for n, c in classes.items():
        for a in c.after:
            if a in preds:
                preds[n].add(a)
        for b in c.before:
            if b in preds:
                preds[b].add(n)
    ordered: list[str] = []
    remaining = list(names)
    while remaining:
        for n in remaining:
            if preds[n] <= set(ordered):
                ordered.append(n)
                remaining.remove(n)
                break
        else:
            raise ValueError(f"pass ordering constraints form a cycle among {remaining}")
    return ordered


def _pass_for_config(config: PassConfig) -> type:
    """The registered pass whose ``config_cls`` is exactly ``type(config)``."""
    from ..errors import InputError

    owners = [c for c in available_passes().values() if c.config_cls is type(config)]
    if len(owners) != 1:
        which = "no registered pass takes" if not owners else \
            f"several passes ({', '.join(c.name for c in owners)}) take"
        raise InputError(f"{which} a {type(config).__name__}; name the pass instead, "
                         f"e.g. passes=[\"name\"], configs={{\"name\": config}}")
    return owners[0]


def resolve_pipeline(spec: Any, target_name: str = "cpu", configs: Optional[dict] = None) -> list:
    """The one pipeline resolver (``optimize``, ``PassManager`` and the
    ``torch.compile(backend="recopt")`` backend all use it).

    ``spec`` is ``None`` or ``"default"`` (the target's default pipeline of
    exact passes) or a list of: pass names, ``"default"`` (stands for that
    pipeline in place), :class:`Pass` subclasses, Pass instances, and
    :class:`PassConfig` instances (the pass that takes that config class,
    configured with it, as torchao's ``quantize_(model, config)``).
    ``configs`` maps pass name → config (dict or PassConfig) for passes given
    by name or class. Returns Pass instances in an order that satisfies
    every ``after``/``before`` constraint; a pass twice is an error.
    """
    from ..errors import InputError

    if spec is None or spec == "default":
        spec = ["default"]
    if isinstance(spec, (str, bytes)):
        raise InputError(f"passes must be a list of pass names, got the string {spec!r}; use passes=[{spec!r}]")
    if isinstance(spec, (Pass, PassConfig)) or (isinstance(spec, type) and issubclass(spec, Pass)):
        spec = [spec]
    configs = dict(configs or {})
    instances: list = []
    for item in spec:
        if isinstance(item, str) and item == "default":
            names = [p.name for p in instances]
            for name in default_pipeline(target_name):
                if name not in names:
                    instances.append(get_pass(name)(configs.pop(name, None)))
            continue
        if isinstance(item, Pass):
            inst = item
        elif isinstance(item, type) and issubclass(item, Pass):
            inst = item(configs.pop(item.name, None))
        elif isinstance(item, PassConfig):
            cls = _pass_for_config(item)
            if cls.name in configs:
                raise InputError(f"pass {cls.name!r} is configured twice: by a {type(item).__name__} "
                                 f"in passes= and in configs=")
            inst = cls(item)
        elif isinstance(item, str):
            try:
                cls = get_pass(item)
            except ValueError as e:
                raise InputError(str(e)) from None
            inst = cls(configs.pop(item, None))
        else:
            raise InputError(
                f"passes must be names, \"default\", recopt.Pass subclasses or instances, or pass config "
                f"instances; got {item!r}"
            )
        instances.append(inst)
    if configs:
        raise InputError(
            f"configs given for pass(es) not in the pipeline: {sorted(configs)}; "
            f"pipeline: {[p.name for p in instances]}"
        )
    by_name: dict = {}
    for p in instances:
        if p.name in by_name:
            raise InputError(f"pass {p.name!r} appears twice in the pipeline")
        by_name[p.name] = p
    registered = available_passes()
    is_reg = [registered.get(p.name) is type(p) for p in instances]
    # order_passes consults the registry; unregistered instances keep their place.
    ordered = iter(order_passes([p.name for p, r in zip(instances, is_reg) if r]))
    return [by_name[next(ordered)] if r else p for p, r in zip(instances, is_reg)]
