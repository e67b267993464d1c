"""``NamedTuple``, ``Choice`` (a ``str`` enum) and ``IntChoice`` (an ``int`` one) for the per-boot and per-unit
commands and luod's start, without their imports.

The generator runs at every boot and daemon-reload, and its records (a unit's files, its policy) are
immutable NamedTuples rather than frozen dataclasses, whose import costs more than the generator's work.
typing.NamedTuple itself imports typing, which imports re: together more than the interpreter's own
start-up; collections (for namedtuple) and enum (with functools) together cost about half of it.
Type checkers see typing.NamedTuple and a ``str`` Enum; at run time the same class syntax builds:

- for a NamedTuple, what collections.namedtuple builds (a tuple with a field getter for each annotated
  field, trailing defaults, ``_replace``, ``_asdict``, ``_fields``; methods allowed);
- for a Choice, a ``str`` class whose ``str`` class attributes become its members, instances equal to
  their value with ``.name`` and ``.value``, found by ``Cls(value)`` (ValueError if none) and listed by
  ``iter(Cls)``, as enum.StrEnum's; an IntChoice the same with ``int``, as enum.IntEnum's (``str()`` is
  the number).
"""

from __future__ import annotations

__all__ = ["Choice", "IntChoice", "NamedTuple"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from enum import Enum
    from typing import NamedTuple

    class Choice(str, Enum):
        pass

    class IntChoice(int, Enum):
        pass

else:
    from _collections import _tuplegetter  # collections.namedtuple's C field getter, without collections

    class _Record(tuple):
        """What collections.namedtuple gives its classes, but __new__: _NamedTupleMeta makes one for each."""

        __slots__ = ()

        @classmethod
        def _make(cls, iterable):
            return cls(*iterable)

        def _replace(self, **changes):
            return type(self)(**{**self._asdict(), **changes})

        def _asdict(self):
            return dict(zip(self._fields, self))

        def __getnewargs__(self):  # copy and pickle: the fields, not the whole tuple as the first one
            return tuple(self)

        def __repr__(self):
            return f"{type(self).__name__}({', '.join(f'{f}={v!r}' for f, v in zip(self._fields, self))})"

    class _NamedTupleMeta(type):
        def __new__(mcs, name, bases, namespace):
            if not bases:  # NamedTuple itself
                return super().__new__(mcs, name, bases, namespace)
            fields = tuple(namespace.get("__annotations__", {}))
            defaults = {f: namespace[f] for f in fields if f in namespace}
            if any(f not in defaults for f in fields[len(fields) - len(defaults) :]):
                raise TypeError(f"{name}: a field without a default follows one with a default")
            # As collections.namedtuple: a __new__ with the fields for parameters, so that the call binds them.
            params = "".join(f"{f}, " for f in fields)
            new = eval(f"lambda _cls, {params}: _tuple_new(_cls, ({params}))", {"_tuple_new": tuple.__new__})
            new.__defaults__ = tuple(defaults.values()) or None
            body = {k: v for k, v in namespace.items() if k not in fields and k != "__annotations__"}
            body.update({f: _tuplegetter(i, None) for i, f in enumerate(fields)})
            body.update(__new__=new, __slots__=(), _fields=fields, _field_defaults=defaults)
            return type(name, (_Record,), body)

    class NamedTuple(metaclass=_NamedTupleMeta):
        pass

    class _ChoiceMeta(type):
        def __new__(mcs, name, bases, namespace):
            cls = super().__new__(mcs, name, bases, namespace)
            kind = int if issubclass(cls, int) else str
            cls._members = {}
            for key, value in namespace.items():
                if not key.startswith("_") and isinstance(value, kind):
                    member = kind.__new__(cls, value)
                    member.name, member.value = key, value
                    cls._members[value] = member
                    setattr(cls, key, member)
            return cls

        def __call__(cls, value):
            try:
                return cls._members[value]
            except KeyError:
                raise ValueError(f"{value!r} is not a valid {cls.__name__}") from None

        def __iter__(cls):
            return iter(cls._members.values())

    class _Member:
        __slots__ = ()

        def __reduce_ex__(self, protocol):  # a copy or an unpickled member is the member itself
            return type(self), (self.value,)

        def __repr__(self):
            return f"<{type(self).__name__}.{self.name}: {self.value!r}>"

    class Choice(_Member, str, metaclass=_ChoiceMeta):
        pass

    class IntChoice(_Member, int, metaclass=_ChoiceMeta):
        __str__ = int.__repr__  # the number (int has no __str__ of its own: object's would show the repr)
