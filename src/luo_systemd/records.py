"""``NamedTuple`` and ``Choice`` (a ``str`` enum) for the per-boot and per-unit commands, without typing or enum.

The generator runs at every boot and daemon-reload, and its records (a unit's files, its policy) are
immutable NamedTuples rather than frozen dataclasses, whose import costs more than the generator's work.
typing.NamedTuple itself imports typing, which imports re: together more than the interpreter's own
start-up; enum (with functools) and its classes cost the generator a third of it.  Type checkers see
typing.NamedTuple and a ``str`` Enum; at run time the same class syntax builds a collections.namedtuple
subclass (annotated fields, trailing defaults, methods), or a Choice: each ``str`` class attribute becomes
a member, an instance equal to its value with ``.name`` and ``.value``, found by ``Cls(value)``
(ValueError if none) and listed by ``iter(Cls)``, as enum.StrEnum's.
"""

from __future__ import annotations

__all__ = ["Choice", "NamedTuple"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from enum import Enum
    from typing import NamedTuple

    class Choice(str, Enum):
        pass

else:
    import collections

    class _NamedTupleMeta(type):
        def __new__(mcs, name, bases, namespace):
            if not bases:  # NamedTuple itself
                return super().__new__(mcs, name, bases, namespace)
            fields = list(namespace.get("__annotations__", {}))
            defaults = [namespace[f] for f in fields if f in namespace]
            if any(f not in namespace for f in fields[len(fields) - len(defaults) :]):
                raise TypeError(f"{name}: a field without a default follows one with a default")
            record = collections.namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            body = {k: v for k, v in namespace.items() if k not in fields and k != "__annotations__"}
            return type(name, (record,), {**body, "__slots__": ()})

    class NamedTuple(metaclass=_NamedTupleMeta):
        pass

    class _ChoiceMeta(type):
        def __new__(mcs, name, bases, namespace):
            cls = super().__new__(mcs, name, bases, namespace)
            cls._members = {}
            for key, value in namespace.items():
                if not key.startswith("_") and isinstance(value, str):
                    member = str.__new__(cls, value)
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

    class Choice(str, metaclass=_ChoiceMeta):
        def __repr__(self):
            return f"<{type(self).__name__}.{self.name}: {self.value!r}>"
