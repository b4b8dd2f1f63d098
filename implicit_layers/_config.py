"""Defaults that depend on the dtype and device of the problem."""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar, Literal, TypedDict, overload

import torch
from typing_extensions import Self

from ._info import OnFailure, check_on_failure


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance used when a solver is given ``rtol=None``."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.bfloat16:
        # Unit roundoff 2**-8 ≈ 3.9e-3: a map evaluated in bfloat16 cannot hold a residual
        # much below 1e-2 of its scale.
        return 1e-2
    if dtype == torch.float16:
        return 1e-3
    return 1e-5


def default_check_every(device: torch.device) -> int:
    """How often a solver loop may synchronise with the device to test for convergence.

    On the CPU a check costs nothing, so solvers stop at the first converged step; on
    accelerators each check is a host synchronisation, so it is done every few steps (converged
    samples are frozen on the device meanwhile, so the answer is the same).
    """
    return 1 if device.type == "cpu" else 8


def check_float_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype}; "
            f"convert it with {name}.double() or {name}.float()."
        )
    return value


def check_positive_int(value: object, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return value


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")
    return value


@overload
def check_nonnegative(value: object, name: str, *, allow_none: Literal[False]) -> float: ...
@overload
def check_nonnegative(value: object, name: str, *, allow_none: bool = True) -> float | None: ...
def check_nonnegative(value: object, name: str, *, allow_none: bool = True) -> float | None:
    """``value`` as a float ``>= 0`` (a tolerance, a damping, a step size), or ``None`` if
    allowed; a TypeError or ValueError naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}.")
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    return float(value)


#: The former name of :func:`check_nonnegative`, kept for the tolerances it also checks.
check_tolerance = check_nonnegative


class Settings:
    """Base of the library's settings objects: small immutable values.

    A subclass validates its arguments in ``__init__`` and stores each under the name of the
    argument; once the outermost ``__init__`` returns, the object is frozen (setting or
    deleting an attribute raises :class:`AttributeError`). The constructor's parameters are
    the object's settings: :meth:`replace` returns a validated copy with some of them changed,
    ``repr`` shows those that differ from the defaults and evaluates back to an equal object,
    and ``==`` / ``hash`` compare the settings by value (a tensor setting, such as a learnable
    step size, by identity).

    A constructor that ends in ``**settings`` passes them on to its base class's constructor:
    its signature (``inspect.signature``, hence :meth:`replace`, ``repr`` and the docs) lists
    the base's keyword-only parameters in their place, and a keyword outside that signature is
    a TypeError, as for an explicit signature. The keywords every solver shares are written
    once this way (:class:`SolverSettings`, typed by :class:`SolverKeywords`).

    Attributes:
        _aliases: constructor parameters that are not settings of their own (another name for
            one that is), left out of :meth:`replace`, ``repr`` and ``==``.
    """

    _aliases: ClassVar[tuple[str, ...]] = ()
    # Per-class caches, filled on first use.
    _field_names: ClassVar[tuple[str, ...]]
    _default_values: ClassVar[dict[str, object]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        own = inspect.signature(init)
        public = own.replace(parameters=cls._public_parameters(list(own.parameters.values())))
        # Python checks the keywords of an explicit signature; those standing for **settings
        # are checked here, against the signature that lists them.
        expanded = public != own
        accepted = frozenset(public.parameters)

        @functools.wraps(init)
        def __init__(self: Settings, *args: Any, **kw: Any) -> None:
            outermost = type(self).__init__ is __init__
            if outermost:
                if args:
                    self._check_positional(len(args))
                if expanded and not accepted.issuperset(kw):
                    unknown = next(name for name in kw if name not in accepted)
                    raise TypeError(
                        f"{type(self).__qualname__}.__init__() got an unexpected keyword argument "
                        f"{unknown!r}"
                    )
            init(self, *args, **kw)
            # Only the constructor of the object's own class freezes it: a subclass's
            # __init__ still sets its attributes after calling super().__init__().
            if outermost:
                object.__setattr__(self, "_frozen", True)

        __init__.__signature__ = public  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign,assignment]

    @classmethod
    def _public_parameters(cls, params: list[inspect.Parameter]) -> list[inspect.Parameter]:
        """The parameters (``self`` first) of a constructor as its signature shows them: a
        trailing ``**settings`` replaced by the base constructor's keyword-only parameters
        that the constructor does not name itself."""
        if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD or (
            params[-1].name != "settings"
        ):
            return params
        own = params[:-1]
        named = {p.name for p in own}
        base = inspect.signature(super(cls, cls).__init__).parameters.values()
        return own + [
            p for p in base if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in named
        ]

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(
                f"{type(self).__name__} is immutable: cannot set {name!r}. Use "
                f".replace({name}=...) to get a validated copy with a changed setting."
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}.")

    @classmethod
    def _check_positional(cls, given: int) -> None:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if given > len(positional):
            takes = f"only {', '.join(positional)}" if positional else "no argument"
            raise TypeError(
                f"{cls.__name__}() takes {takes} positionally, got {given} positional "
                f"argument(s); pass the settings by keyword, e.g. {cls.__name__}(rtol=1e-6)."
            )

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        cached = cls.__dict__.get("_field_names")
        if cached is None:
            params = list(inspect.signature(cls.__init__).parameters.values())[1:]
            kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            cached = tuple(p.name for p in params if p.kind in kinds and p.name not in cls._aliases)
            cls._field_names = cached
        return cached

    @classmethod
    def _defaults(cls) -> dict[str, object]:
        cached = cls.__dict__.get("_default_values")
        if cached is None:
            try:
                # The settings of a default-constructed object (``max_steps=None`` resolves to
                # the class default): the repr leaves these out.
                cached = cls().settings()
            except (TypeError, ValueError):  # required arguments: the signature's defaults
                params = inspect.signature(cls.__init__).parameters
                cached = {
                    name: params[name].default for name in cls._fields()
                    if params[name].default is not inspect.Parameter.empty
                }
            cls._default_values = cached
        return cached

    def settings(self) -> dict[str, Any]:
        """The settings as a dict ``{name: value}``, in constructor order."""
        return {name: getattr(self, name) for name in self._fields()}

    def replace(self, **changes: Any) -> Self:
        """Return a copy with the given settings changed, validated like the constructor's.

        Raises:
            TypeError: for a name that is not a setting of this class.
        """
        fields = self._fields()
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            known = f"its settings are: {', '.join(fields)}" if fields else "it has no settings"
            raise TypeError(
                f"{type(self).__name__}.replace() got unknown setting(s) {', '.join(unknown)}; "
                f"{known}."
            )
        return type(self)(**{**self.settings(), **changes})

    def __repr__(self) -> str:
        defaults = self._defaults()
        shown = [
            f"{name}={value!r}" for name, value in self.settings().items()
            if name not in defaults or not _same(value, defaults[name])
        ]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        if type(self) is not type(other):
            return False
        return all(_same(getattr(self, f), getattr(other, f)) for f in self._fields())

    def __hash__(self) -> int:
        return hash((type(self), tuple(_hashable(v) for v in self.settings().values())))


def _same(a: object, b: object) -> bool:
    if isinstance(a, (torch.Tensor, bool)) or isinstance(b, (torch.Tensor, bool)):
        return a is b
    return bool(a == b)


def _hashable(value: object) -> object:
    return id(value) if isinstance(value, torch.Tensor) else value


class StoppingKeywords(TypedDict, total=False):
    """:class:`SolverKeywords` but ``max_steps``, for a solver that takes it positionally."""

    rtol: float | None
    atol: float
    check_every: int | None
    on_failure: OnFailure


class SolverKeywords(StoppingKeywords, total=False):
    """The keyword arguments every solver takes (see :class:`SolverSettings`): a solver's
    constructor ends in ``**settings: Unpack[SolverKeywords]`` and passes them on."""

    max_steps: int | None


class GraphedSolverKeywords(SolverKeywords, total=False):
    """:class:`SolverKeywords` and ``cuda_graph``, for the solvers that can replay their loop
    as CUDA graphs (``supports_cuda_graph = True``)."""

    cuda_graph: bool


class SolverSettings(Settings):
    """The settings every iterative solver shares, validated once for forward and linear solvers.

    Every setting is keyword-only; a solver class may take one *algorithm parameter*
    positionally, where it is the obvious one (the textbook name of the method). They are:
    ``Adaptive(switch_ratio)``, ``Picard(damping)``, ``Anderson(memory)``, ``Broyden(memory)``,
    ``LBFGS(memory)``, ``GradientDescent(step_size)`` (forward solvers); ``GMRES(restart)``,
    ``Broyden(memory)``, ``Neumann(max_steps)`` (the number of terms ``k``; linear solvers). All
    other solvers take keyword arguments only.

    Args:
        rtol: relative tolerance, or ``None`` for the dtype's default.
        atol: absolute tolerance.
        max_steps: iteration limit, or ``None`` for the class's ``default_max_steps``.
        check_every: steps between convergence checks, or ``None`` for the device's default.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
        cuda_graph: record the loop as CUDA graphs and replay them; taken only by the classes
            with ``supports_cuda_graph = True`` (it follows the other settings in their
            signature).
    """

    default_max_steps: ClassVar[int] = 1000
    name: ClassVar[str] = "Solver"
    #: Whether the class takes the ``cuda_graph`` setting (its constructor must then end in
    #: ``**settings: Unpack[GraphedSolverKeywords]``).
    supports_cuda_graph: ClassVar[bool] = False

    rtol: float | None
    atol: float
    max_steps: int
    check_every: int | None
    on_failure: OnFailure

    def __init__(
        self,
        *,
        rtol: float | None = None,
        atol: float = 0.0,
        max_steps: int | None = None,
        check_every: int | None = None,
        on_failure: OnFailure = "warn",
        cuda_graph: bool = False,
    ) -> None:
        self.rtol = check_tolerance(rtol, "rtol")
        self.atol = check_tolerance(atol, "atol", allow_none=False)
        self.max_steps = (
            self.default_max_steps if max_steps is None else check_positive_int(max_steps, "max_steps")
        )
        self.check_every = None if check_every is None else check_positive_int(
            check_every, "check_every"
        )
        self.on_failure = check_on_failure(on_failure)
        if self.supports_cuda_graph:
            self.cuda_graph = check_bool(cuda_graph, "cuda_graph")

    @classmethod
    def _public_parameters(cls, params: list[inspect.Parameter]) -> list[inspect.Parameter]:
        # cuda_graph is a setting of the classes that support it only; it comes last.
        public = [p for p in super()._public_parameters(params) if p.name != "cuda_graph"]
        var = inspect.Parameter.VAR_KEYWORD
        passes_on = params[-1].kind is var and public[-1].kind is not var
        if cls.supports_cuda_graph and (passes_on or len(public) < len(params)):
            public.append(_CUDA_GRAPH)
        return public

    def resolved_rtol(self, dtype: torch.dtype) -> float:
        """``rtol``, or the default of ``dtype`` when it is ``None``."""
        return default_rtol(dtype) if self.rtol is None else self.rtol


_CUDA_GRAPH = inspect.Parameter(
    "cuda_graph", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool"
)

