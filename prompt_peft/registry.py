"""The single place where prompt_peft extends peft's method registry.

peft 0.21 keeps its methods in a closed ``PeftType`` enum and four mapping dicts that only
``register_peft_method`` fills. transformers' PEFT integration reads ``peft_type.value``, so a plain string
key is not enough: we add a real enum member first, then register the config and tuner classes. Both steps
are idempotent, so importing prompt_peft twice (or reloading it) is harmless.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding the member to the enum first if it does not exist yet.

    ``Enum`` has no public way to grow; this sets the same internal tables ``EnumType`` fills at class
    creation, so identity, lookup by name and by value, iteration, hashing and JSON/pickle all behave as for
    built-in members (see tests/test_registry.py, which checks each of these).
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses to rebind members
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register one prompt_peft method with peft under ``PeftType[name.upper()]`` (idempotent).

    ``model_cls.prefix`` must be ``f"{name}_"``: peft checks it, and transformers' ``load_adapter`` recognises
    adapter keys by the lower-cased type name.
    """
    peft_type = add_peft_type(name.upper())
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    elif registered is not config_cls:
        if _qualified_name(registered) != _qualified_name(config_cls):
            raise ValueError(
                f"PEFT type {peft_type.value} is already registered by {_qualified_name(registered)}; "
                f"refusing to register {_qualified_name(config_cls)} over it."
            )
        # The same classes re-created by importlib.reload: point peft at the fresh ones.
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = model_cls.prefix
    return peft_type


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
