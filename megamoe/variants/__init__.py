"""The MoE variants: one folder each, listed here (L0: importing the registry imports no torch).

Each folder's `__init__.py` declares its `Variant` (megamoe/variants/base.py): config class and checks, layer,
megatron layer-spec hook, counts for the planner and the comparison, Hugging Face mapping, upcycling and study.
Everything else in megamoe loops over VARIANTS. A variant defined elsewhere (a user's, or a test's) joins with
`register(variant)` before its config is loaded.
"""

from __future__ import annotations

from megamoe.config.loader import ConfigError
from megamoe.config.tree import MoEConfig
from megamoe.variants import cartesian, dynamic, mpo, peer, topk
from megamoe.variants.base import Study, Variant, resolve

VARIANTS: dict[str, Variant] = {
    "topk": topk.VARIANT,  # Switch / GShard / Mixtral, fine-grained + shared experts
    "dynamic": dynamic.VARIANT,  # DA-MoE: experts per token from attention importance
    "peer": peer.VARIANT,  # product-key retrieval over ~1M single-neuron experts
    "cartesian": cartesian.VARIANT,  # two sequential sub-expert layers: Cartesian-product experts
    "mpo": mpo.VARIANT,  # MPOE: experts as matrix product operators sharing one central tensor
}


def register(variant: Variant) -> None:
    """Add a variant defined outside megamoe (it must be registered in every process that loads its config)."""
    if variant.name in VARIANTS and VARIANTS[variant.name] is not variant:
        raise ValueError(f"moe.variant {variant.name!r} is already registered")
    if variant.config.variant != variant.name:
        raise ValueError(f"{variant.config.__name__}.variant defaults to {variant.config.variant!r}; it must default "
                         f"to the variant's name {variant.name!r} (configs are read back by that key)")
    VARIANTS[variant.name] = variant


def get(name: str) -> Variant:
    """The variant registered as `name` (ConfigError naming the choices if none is)."""
    if name not in VARIANTS:
        raise ConfigError(f"moe.variant={name!r} is unknown; choose one of {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name]


def of(moe: MoEConfig) -> Variant:
    """The variant of a moe: section."""
    return get(moe.variant)


__all__ = ["VARIANTS", "Study", "Variant", "get", "of", "register", "resolve"]
