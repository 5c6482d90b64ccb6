"""How targets are installed and removed.

A patch is a wrapt ``FunctionWrapper`` placed with ``wrapt.wrap_object`` and
taken off with ``wrapt.unwrap_object``, so removal restores the very object that
was there before and splices us out from under wrapt wrappers other libraries
put on top. (The exceptions: ``PlainFunctionPoint``, and a point whose original
is another library's Python function (``_replacement``), put a plain function in
its place, because dynamo traces the *original* code behind a wrapt proxy of a
Python function that is not torch's.)
A wrapper that another library left covering ours cannot be removed; it then
passes every call through.

A target is installed while anyone holds it: the process-wide switch
(``apply``/``remove``) or any open ``patched()`` scope. One re-entrant lock
guards all of it, so no thread ever sees a target half-installed.

Targets are declared here by name only; a target's own module (which imports
torch or transformers) is imported when the library it patches is imported, via
wrapt's post-import hooks. So ``import attnpatch`` and ``attnpatch.apply()``
import nothing heavy, and modules that load later (transformers imports model
code lazily) are patched when they load. A target may also patch every module
whose name matches a pattern (``PointFamily``): those are found as they are
imported, by a finder on ``sys.meta_path`` (``_ImportWatcher``), so hundreds of
model files need not be imported, or even listed, up front.

Most targets are on by default (``apply()``, ``ATTNPATCH=1``); the ones in
``OPT_IN`` change functions far outside attention and run only when named.
"""

from __future__ import annotations

import contextvars
import fnmatch
import functools
import importlib
import logging
import re
import sys
import threading
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import wrapt

logger = logging.getLogger("attnpatch")


class AttnPatchWarning(UserWarning):
    """A target could not be installed (e.g. the installed library version lacks it)."""


# target name -> (module whose import triggers it, module that implements it)
TARGETS: dict[str, tuple[str, str]] = {
    "sdpa": ("torch", "attnpatch.targets.torch_sdpa"),
    "mha": ("torch", "attnpatch.targets.torch_mha"),
    "transformer": ("torch", "attnpatch.targets.torch_transformer"),
    "hf_attention": ("transformers", "attnpatch.targets.hf_attention"),
    "hf_generate": ("transformers", "attnpatch.targets.hf_generate"),
    "hf_tokenizer": ("transformers", "attnpatch.targets.hf_tokenizer"),
    "softmax": ("torch", "attnpatch.targets.torch_softmax"),
}

# Targets that ``apply()`` / ``ATTNPATCH=1`` leave off: on only when named
# (``apply(softmax=True)``, ``ATTNPATCH=1,softmax``).
OPT_IN: set[str] = {"softmax"}


def register_target(name: str, trigger: str, implementation: str, default: bool = True) -> None:
    """Declare a target; used by the built-in table above and by extensions.
    ``default=False`` makes it opt-in: on only when asked for by name."""
    TARGETS[name] = (trigger, implementation)
    (OPT_IN.discard if default else OPT_IN.add)(name)


def default_targets() -> frozenset[str]:
    """What ``apply()`` and ``ATTNPATCH=1`` turn on."""
    return frozenset(TARGETS) - OPT_IN


@dataclass(eq=False)
class PatchPoint:
    """One attribute that a target wraps: ``module.path`` (path may be dotted, e.g.
    ``"LlamaAttention.forward"``), wrapped with the wrapt-style ``wrapper``.

    ``prepare(original)`` may build the wrapper from the original object at install
    time instead (used to clone a function); it returns a wrapper or raises
    ``Skip`` to leave the point alone.

    ``aliases`` are other ``(module, path)`` names of the same object. Each one
    that still holds the original gets the *same* wrapper object, so identity
    checks between the names (``func is F.scaled_dot_product_attention`` in a
    ``__torch_function__`` handler that received ``torch._C._nn``'s) keep holding.
    """

    module: str
    path: str
    wrapper: Callable[..., Any] | None = None
    prepare: Callable[[Any], Callable[..., Any]] | None = None
    optional: bool = False  # absent in some library versions: skip quietly
    aliases: tuple[tuple[str, str], ...] = ()
    handle: Any = field(default=None, repr=False)
    state: str = "off"  # off | installed | deferred | skipped | displaced
    note: str = ""
    target: str = ""  # the name of the target this point belongs to, set when it is loaded
    _token: Any = field(default=None, repr=False)  # the installation now in place, if any
    _spare: Any = field(default=None, repr=False)  # (wrapper, its token), kept for reuse
    _aliased: list = field(default_factory=list, repr=False)  # (module, path) of aliases now wrapped

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.path}"

    def install(self, module: Any) -> None:
        if self.handle is not None:
            return
        try:
            _, _, original = wrapt.resolve_path(module, self.path)
        except Exception:  # noqa: BLE001 - any lookup failure means "not in this version"
            self._skip(f"{self.qualname} not found in this version")
            return
        if self._spare is None or self._spare[0].__wrapped__ is not original:
            wrapper = self._wrapper_for(original)
            if wrapper is None:
                return
            self._forget_spare()
            token = object()
            spare = _replacement(original, _current_only(self, token, wrapper), on_module="." not in self.path)
            _alias_for_torchscript(original, spare)
            self._spare = (spare, token)
        # The same wrapper object is reused for every installation over the same
        # original, so apply/remove cycles allocate nothing and TorchScript's
        # alias for it stays valid.
        spare, self._token = self._spare
        self.handle = wrapt.wrap_object(module, self.path, _returning(spare))
        for alias in self.aliases + _home_name(original, spare):
            alias_module = sys.modules.get(alias[0])
            try:
                holds_original = wrapt.resolve_path(alias_module, alias[1])[2] is original
            except Exception:  # noqa: BLE001 - absent in this version
                holds_original = False
            if holds_original:
                wrapt.wrap_object(alias_module, alias[1], _returning(spare))
                self._aliased.append(alias)
        self.state, self.note = "installed", ""
        logger.debug("attnpatch: installed %s", self.qualname)

    def remove(self) -> None:
        if self.handle is None:
            self.state = "off"
            return
        removed: bool | None = True
        for module_name, path in [(self.module, self.path), *self._aliased]:
            module = sys.modules.get(module_name)
            try:
                removed = (
                    module is not None and wrapt.unwrap_object(module, path, self.handle, missing_ok=True)
                ) and removed
            except (wrapt.WrapperNotOutermostError, wrapt.WrapperChainTooDeepError) as exc:
                removed = None
                self.note = f"left in place as a pass-through: {exc}"
        self._aliased.clear()
        self._token = None  # from now on the wrapper passes every call through
        self.handle = None
        if removed:
            self.state, self.note = "off", ""
        else:
            # Someone replaced or covered us with a non-wrapt wrapper. We cannot
            # restore without breaking theirs, so our wrapper stays in their
            # chain as a pass-through for good, and is never reused.
            self._forget_spare()
            self.state = "displaced"
            self.note = self.note or "replaced by another library; left alone"
        logger.debug("attnpatch: removed %s (%s)", self.qualname, self.state)

    def _wrapper_for(self, original: Any) -> Callable[..., Any] | None:
        """The wrapt-style wrapper for ``original``, or None (and the point
        marked skipped) when ``prepare`` declines it."""
        try:
            return self.prepare(original) if self.prepare else self.wrapper
        except Skip as why:
            self._skip(str(why))
            return None

    def _forget_spare(self) -> None:
        if self._spare is not None:
            _alias_for_torchscript(self._spare[0].__wrapped__, self._spare[0], add=False)
            self._spare = None

    def _skip(self, why: str) -> None:
        self.state, self.note = "skipped", why
        if not self.optional and why not in _warned:
            _warned.add(why)
            warnings.warn(f"attnpatch: {why}", AttnPatchWarning, stacklevel=4)


@dataclass(eq=False)
class PlainFunctionPoint(PatchPoint):
    """A function replaced by a *plain Python function* that calls ``wrapper``: the
    module attribute ``path``, or, with ``key``, the entry ``key`` of the dict at
    ``path``. Not a wrapt proxy, on purpose: a ``FunctionWrapper`` passes
    ``isinstance(x, FunctionType)`` through its proxied ``__class__``, so dynamo
    traces the *original* code behind it and a compiled model runs unpatched
    (measured with transformers 5.24, torch 2.13). Removal puts the exact original
    back if our function is still there."""

    key: str | None = None
    # (original, its replacement or None if skipped, skip note, the token the
    # replacement acts under): prepared once per original, so apply/remove cycles
    # neither redo ``prepare``'s inspection nor build a new function (as
    # PatchPoint reuses its wrapper).
    _prepared: Any = field(default=None, repr=False)
    _home: Any = field(default=None, repr=False)  # (module, name) of the original's own name, if we took it too

    @property
    def qualname(self) -> str:
        return super().qualname + (f"[{self.key!r}]" if self.key is not None else "")

    def _slot(self, module: Any) -> tuple[Any, str, Callable[[Any], None]]:
        """(current object, where, setter) of the replaced function."""
        if self.key is None:
            parent, name, current = wrapt.resolve_path(module, self.path)
            return current, name, lambda value: setattr(parent, name, value)
        _, _, mapping = wrapt.resolve_path(module, self.path)
        key = self.key
        return mapping[key], key, lambda value: mapping.__setitem__(key, value)  # type: ignore[index]

    def install(self, module: Any) -> None:
        if self.handle is not None:
            return
        try:
            original, _, put = self._slot(module)
        except Exception:  # noqa: BLE001 - any lookup failure means "not in this version"
            self._skip(f"{self.qualname} not found in this version")
            return
        if self._prepared is None or self._prepared[0] is not original:
            self._prepared = self._prepare(original)
        _, patched, note, token = self._prepared
        if patched is None:
            self.state, self.note = "skipped", note
            return
        self._token = token
        put(patched)
        self._home = _take_home_name(original, patched)
        self.handle = (patched, original)
        self.state, self.note = "installed", ""
        logger.debug("attnpatch: installed %s", self.qualname)

    def _prepare(self, original: Any) -> tuple[Any, Any, str, object]:
        wrapper = self._wrapper_for(original)
        if wrapper is None:
            return original, None, self.note, None
        # Once removed, or displaced by another library, it only passes through,
        # even if it is still reachable from somewhere.
        token = object()
        return original, _plain_function(original, _current_only(self, token, wrapper)), "", token

    def remove(self) -> None:
        if self.handle is None:
            self.state = "off"
            return
        patched, original = self.handle
        self.handle = self._token = None
        try:
            current, _, put = self._slot(sys.modules[self.module])
        except Exception:  # noqa: BLE001
            current = put = None
        if self._home is not None:
            module, name = self._home
            if getattr(module, name, None) is patched:
                setattr(module, name, original)
            self._home = None
        if put is not None and current is patched:
            put(original)
            self.state, self.note = "off", ""
        else:
            # Someone put their own function over ours: keep theirs; ours
            # (wherever it still is) is a pass-through for good, never reused.
            self._prepared = None
            self.state, self.note = "displaced", "replaced by another library; left alone"


@dataclass(eq=False)
class ObjectPoint(PlainFunctionPoint):
    """An attribute replaced by the object ``prepare(original)`` returns (a class,
    where a call's own attribute lookups must be intercepted), put in place and
    taken back as ``PlainFunctionPoint`` does."""

    def _prepare(self, original: Any) -> tuple[Any, Any, str, object]:
        return original, self._wrapper_for(original), self.note, object()


@dataclass(eq=False)
class PointFamily:
    """The same patch in every module whose name matches ``pattern`` (shell-style,
    ``*`` also matching dots: ``"transformers.models.*.modeling_*"``), for modules
    that have ``path``. ``make(module_name)`` builds the point for one module; its
    ``prepare`` decides whether that module's object has the expected shape, and
    raises ``Skip`` (quietly: make such points optional) when it has not.

    Modules are found as they are imported (``_ImportWatcher``) and among those
    already imported when the target is installed; nothing is imported for it.
    A module that already has a point of its own in the target is left to it."""

    pattern: str
    path: str
    make: Callable[[str], PatchPoint]
    points: dict[str, PatchPoint] = field(default_factory=dict)  # module name -> its point

    def __post_init__(self) -> None:
        self._examined: set[str] = set()
        self.prefix = self.pattern.split("*", 1)[0]
        self.regex = re.compile(fnmatch.translate(self.pattern))

    def matches(self, module_name: str) -> bool:
        return module_name.startswith(self.prefix) and self.regex.match(module_name) is not None

    def describe(self) -> str:
        return f"{self.path} of {self.pattern}"

    def imported_matches(self) -> list[str]:
        """Matching modules imported since the last look (the import watcher
        reports the ones imported while the target is on; this finds the rest
        without rescanning thousands of module names on every ``apply()``)."""
        if len(sys.modules) == len(self._examined):
            return []  # nothing imported since (modules are almost never dropped)
        fresh = sys.modules.keys() - self._examined
        self._examined = set(sys.modules)
        return [name for name in fresh if self.matches(name)]


class _ImportWatcher:
    """A ``sys.meta_path`` finder that lets the import of a module matching a
    watched pattern run as usual, then hands the fresh module to ``_on_import``
    (wrapt's post-import hooks do this for exact names only). It finds nothing
    itself: it asks the finders behind it and wraps the loader they return."""

    def __init__(self) -> None:
        self.families: list[PointFamily] = []
        self._asking = threading.local()  # .names: what this thread asks the finders behind us for

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if not any(family.matches(fullname) for family in self.families):
            return None
        asking = self._asking.__dict__.setdefault("names", set())
        if fullname in asking:
            return None  # asked back by a finder like us (a second copy of attnpatch): the others answer
        asking.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _NotifyingLoader(spec.loader)  # type: ignore[assignment]
                    return spec
        finally:
            asking.discard(fullname)
        return None


class _NotifyingLoader:
    """A module's own loader, followed by ``_on_import``. The module itself is
    handed its real loader back before it runs (``__loader__``, ``__spec__.loader``:
    what ``inspect``, ``linecache`` and ``importlib.reload`` read)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        self.loader.exec_module(module)
        _on_import(sys.modules.get(module.__name__, module))


_watcher = _ImportWatcher()


def _watch(family: PointFamily) -> None:
    """Start watching imports for ``family`` (for the rest of the process: a
    finder costs one prefix test per import, and removing it under another
    thread's import would be a race)."""
    if family not in _watcher.families:
        _watcher.families.append(family)
    if _watcher not in sys.meta_path:
        sys.meta_path.insert(0, _watcher)


def _replacement(original: Any, wrapper: Callable[..., Any], on_module: bool) -> Any:
    """What takes ``original``'s place: a wrapt ``FunctionWrapper``, except over a
    module's Python function from another library than torch (one put in
    ``F.scaled_dot_product_attention``'s place before attnpatch, as users of
    SageAttention do). dynamo traces a wrapt proxy of such a function as the
    function itself: under torch.compile the wrapper would not run, or, with
    defaults in the signature, dynamo's own guards fail (AssertionError). A plain
    function calling the wrapper is traced, and its ``__wrapped__`` leads wrapt's
    ``unwrap_object`` back to the original. torch's functions keep the proxy:
    dynamo runs it, and it compares equal to them in handlers' tables."""
    if on_module and type(original) is types.FunctionType and not _from_torch(original):
        return _plain_function(original, wrapper)
    return PatchWrapper(original, wrapper)


class _PicklesAsWrapped:
    """What a wrapt proxy lacks to pass for the object it wraps under ``pickle``
    and ``copy`` (a bare proxy raises NotImplementedError there): it pickles as
    the wrapped object does, so the bytes are the same as without attnpatch
    and loading them needs no attnpatch, and copies are the object itself, as
    ``copy`` treats functions. A module-level function or builtin pickles by its
    name (found again where it is loaded: the patched one if attnpatch is on
    there, torch's own if not); anything else (a bound or static method) by its
    own ``__reduce_ex__``."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        wrapped = self.__wrapped__  # type: ignore[attr-defined]
        if type(wrapped) is types.FunctionType:
            return wrapped.__qualname__  # pickle saves a Python function by name, never by __reduce_ex__
        return wrapped.__reduce_ex__(protocol)

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: Any) -> Any:
        return self


class BoundPatchWrapper(_PicklesAsWrapped, wrapt.BoundFunctionWrapper):
    """A patched method, bound (``tokenizer_class.from_pretrained``), or read off
    its class (``LlamaForCausalLM.generate``). Each read makes a new one, so the
    latter cannot pickle by name (pickle checks that the name gives back the very
    object): it pickles as reading the attribute off the class again."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        owner = getattr(self, "_self_owner", None)
        if type(self.__wrapped__) is types.FunctionType and self._self_instance is None and owner is not None:
            return getattr, (owner, self.__wrapped__.__name__)
        return super().__reduce_ex__(protocol)


class PatchWrapper(_PicklesAsWrapped, wrapt.FunctionWrapper):
    """The wrapt ``FunctionWrapper`` every ``PatchPoint`` puts in place."""

    __bound_function_wrapper__ = BoundPatchWrapper


def _returning(replacement: Any) -> Any:
    """The factory ``wrapt.wrap_object`` takes, putting ``replacement`` in place."""
    return lambda _original: replacement


def _plain_function(original: Any, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """A plain Python function, looking like ``original``, that calls the
    wrapt-style ``wrapper`` with it: what dynamo traces where it would see through
    a wrapt proxy."""

    @functools.wraps(original)
    def replacement(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, None, args, kwargs)

    return replacement


def _home_name(original: Any, replacement: Any) -> tuple[tuple[str, str], ...]:
    """``original``'s own module-level name, as an alias to patch too, when its
    replacement is a plain function (which pickle finds by that name and must find
    there; see ``_take_home_name``)."""
    if isinstance(replacement, PatchWrapper) or "." in getattr(original, "__qualname__", "."):
        return ()
    return ((original.__module__, original.__qualname__),)


def _take_home_name(original: Any, replacement: Any) -> tuple[Any, str] | None:
    """Put ``replacement`` under ``original``'s own module-level name too, where
    that still holds ``original`` and is not where it was patched (a function
    replaced in a dict, like transformers' attention table): pickle finds a
    function by that name and requires it to be the very object, so only then
    does the replacement pickle as the original does. Returns where it went."""
    module = sys.modules.get(getattr(original, "__module__", None) or "")
    name = getattr(original, "__qualname__", "")
    if module is None or "." in name or getattr(module, name, None) is not original:
        return None
    setattr(module, name, replacement)
    return module, name


def _from_torch(function: Any) -> bool:
    return (function.__module__ or "").partition(".")[0] == "torch"


def _current_only(point: PatchPoint, token: object, wrapper: Callable[..., Any]) -> Callable[..., Any]:
    """``wrapper``, acting only while this installation is the point's current one.
    A displaced wrapper still sits in another library's chain; when the point is
    installed again on top, the old one must not come back to life (its target
    would then run twice, or recurse through the other library's function)."""

    def guarded(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if point._token is not token or (_replays and point.target not in (_replayed.get() or (point.target,))):
            return wrapped(*args, **kwargs)
        return wrapper(wrapped, instance, args, kwargs)

    return guarded


_warned: set[str] = set()  # one warning per reason per process, never one per call


def _alias_for_torchscript(original: Any, handle: Any, add: bool = True) -> None:
    """Let TorchScript see a wrapped aten builtin as the builtin itself.

    TorchScript finds builtins by ``id()``, so without an alias, scripting any
    code that calls a wrapped ``torch._native_multi_head_attention`` (or reaches
    ``F.scaled_dot_product_attention``) fails to compile while attnpatch is on.
    With it, scripted code calls the aten op directly: it runs, unpatched, as
    the README says.
    """
    builtins = sys.modules.get("torch.jit._builtins")
    if builtins is None:
        return
    table = builtins._get_builtin_table()
    op = table.get(id(original))
    if op is None:
        return
    if add:
        table[id(handle)] = op
    else:
        table.pop(id(handle), None)


class Skip(Exception):
    """Raised by ``PatchPoint.prepare`` to leave a point unpatched, with the reason."""


# Installed while any target is, and not targets themselves (``targets()`` and
# ``status()`` do not list them): they carry attnpatch's state into work torch
# defers (activation checkpointing's recomputation, ``replaying``).
COMPANIONS: dict[str, tuple[str, str]] = {
    "checkpoint": ("torch", "attnpatch.targets.torch_checkpoint"),
}

_lock = threading.RLock()
_holders: Counter[str] = Counter()  # target name -> how many holders want it
_switch: frozenset[str] = frozenset()  # targets held by apply()
_installed: set[str] = set()
_points: dict[str, list[PatchPoint]] = {}  # target name -> its points, once loaded
_hooked: set[str] = set()  # module names with our post-import hook registered
_families: dict[str, list[PointFamily]] = {}  # target name -> its families, once loaded
_loading: set[str] = set()  # targets whose module is being imported right now
_replays = 0  # replays (``replaying``) now running, in any thread, under fewer targets than are installed
_replayed: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("attnpatch_replayed", default=None)


_DEFAULT_WORDS = ("1", "all", "true", "True", "yes", "on")


def resolve_targets(targets: str | Iterable[str] | None = None, **options: bool) -> frozenset[str]:
    """Turn ``targets`` (None = the default set, a name, a comma list or an
    iterable; ``"1"`` or ``"all"`` in it stands for the default set) and
    ``name=True/False`` options into a set of target names."""
    if targets is None:
        targets = ["1"]
    elif isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    chosen: set[str] = set()
    for name in targets:
        if name in _DEFAULT_WORDS:
            chosen |= default_targets()
        else:
            chosen.add(name)
    for name, on in options.items():
        if name not in TARGETS:
            raise TypeError(f"unknown attnpatch option {name!r}; targets are {sorted(TARGETS)}")
        (chosen.add if on else chosen.discard)(name)
    unknown = chosen - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown attnpatch target(s) {sorted(unknown)}; known: {sorted(TARGETS)}")
    return frozenset(chosen)


def set_switch(targets: frozenset[str]) -> None:
    global _switch
    with _lock:
        _holders.subtract(_switch)
        _holders.update(targets)
        _switch = targets
        _sync()


def acquire(targets: frozenset[str]) -> None:
    with _lock:
        _holders.update(targets)
        _sync()


def release(targets: frozenset[str]) -> None:
    with _lock:
        _holders.subtract(targets)
        _sync()


def replaying(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, which runs under the targets installed now whenever it is
    called: for work that torch records now and runs again later (activation
    checkpointing recomputes a forward in backward), which must get the state of
    the forward it replays even if a ``patched()`` scope closed, or another
    opened, in between. A target off now stays off for it (its wrappers pass
    through in that context), one on now is on (installed again if need be)."""
    held = frozenset(_installed & TARGETS.keys())

    def replay(*args: Any, **kwargs: Any) -> Any:
        global _replays
        with _lock:
            _holders.update(held)
            _sync()
            restricted = bool(_installed - held)
            _replays += restricted
        context = _replayed.set(held) if restricted else None
        try:
            return function(*args, **kwargs)
        finally:
            if context is not None:
                _replayed.reset(context)
            with _lock:
                _replays -= restricted
                _holders.subtract(held)
                _sync()

    return replay


def _sync() -> None:
    """Install every held target and remove every target no one holds; the
    companions while any target is installed."""
    for name in [*TARGETS, *COMPANIONS]:
        wanted = _holders[name] > 0 if name in TARGETS else bool(_installed & TARGETS.keys())
        if wanted and name not in _installed:
            _installed.add(name)
            _install_target(name)
        elif not wanted and name in _installed:
            _installed.discard(name)
            for point in _points.get(name, ()):
                point.remove()


def _install_target(name: str, only_module: str | None = None) -> None:
    trigger, implementation = TARGETS[name] if name in TARGETS else COMPANIONS[name]
    if name not in _points:
        if trigger not in sys.modules:
            _hook(trigger)
            return
        if name in _loading:
            # Its module is being imported below us: it imports a library
            # (torch, for transformers' targets) whose own import hook led
            # here. The outer call installs everything once the module is done.
            return
        _loading.add(name)
        try:
            target = importlib.import_module(implementation)
        finally:
            _loading.discard(name)
        _points[name] = list(target.POINTS)
        _families[name] = list(getattr(target, "FAMILIES", ()))
        for point in _points[name]:
            point.target = name
        only_module = None
    for family in _families[name]:
        _watch(family)
        for module_name in [only_module] if only_module else family.imported_matches():
            if family.matches(module_name):
                _discover(name, family, module_name)
    for point in _points[name]:
        if only_module is not None and point.module != only_module:
            continue
        module = sys.modules.get(point.module)
        if module is None:
            point.state = "deferred"
            _hook(point.module)
        else:
            point.install(module)


def _discover(name: str, family: PointFamily, module_name: str) -> None:
    """Give ``module_name`` its point of ``family`` (installed by the caller),
    if the module has ``family.path`` and the target no point there yet."""
    if module_name in family.points:
        return
    if any(p.module == module_name and p.path == family.path for p in _points[name]):
        return
    try:
        wrapt.resolve_path(sys.modules[module_name], family.path)
    except Exception:  # noqa: BLE001 - the module has no such object: nothing to patch
        return
    point = family.points[module_name] = family.make(module_name)
    point.target = name
    _points[name].append(point)


def _hook(module_name: str) -> None:
    if module_name not in _hooked:
        _hooked.add(module_name)
        wrapt.register_post_import_hook(_on_import, module_name)


def _on_import(module: Any) -> None:
    # Runs inside the user's `import`: it must never make that import fail.
    try:
        with _lock:
            for name in [*TARGETS, *COMPANIONS]:
                if name in _installed:
                    _install_target(name, only_module=module.__name__)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"attnpatch: could not patch {module.__name__}: {exc!r}", AttnPatchWarning, stacklevel=2)


def status() -> dict[str, dict[str, Any]]:
    """Per target: whether it is held, and the state of each of its patch points."""
    with _lock:
        report = {}
        for name, (trigger, _) in TARGETS.items():
            points = _points.get(name)
            if name not in _installed:
                state = "off"
            elif points is None:
                state = f"deferred until {trigger} is imported"
            else:
                states = {p.state for p in points}
                state = "installed" if "installed" in states else "deferred" if "deferred" in states else "skipped"
            found = {id(p): family for family in _families.get(name, ()) for p in family.points.values()}
            report[name] = {
                "state": state,
                "holders": _holders[name],
                "default": name not in OPT_IN,
                "points": [
                    {"target": p.qualname, "state": p.state, "note": p.note}
                    | ({"found_by": found[id(p)].describe()} if id(p) in found else {})
                    for p in points or ()
                ],
            }
            if _families.get(name):
                report[name]["families"] = [_family_counts(family) for family in _families[name]]
        return report


def _family_counts(family: PointFamily) -> dict[str, Any]:
    states = Counter(point.state for point in family.points.values())
    return {"family": family.describe(), "found": len(family.points), **dict(sorted(states.items()))}
