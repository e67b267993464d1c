"""``NamedTuple`` for the per-boot and per-unit commands, without importing typing.

The generator runs at every boot and daemon-reload, and its records (a unit's files, its policy) are
immutable NamedTuples rather than frozen dataclasses, whose import costs more than the generator's work.
typing.NamedTuple itself imports typing, which imports re: together more than the interpreter's own
start-up.  Type checkers see typing.NamedTuple; at run time the same class syntax (annotated fields,
trailing defaults, methods) builds a collections.namedtuple subclass.
"""

from __future__ import annotations

__all__ = ["NamedTuple"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple
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
