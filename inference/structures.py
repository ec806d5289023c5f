"""Structure names are free text: one lab's ``dapi`` is another's ``dna`` or ``hoechst``.

`canonical` maps the usual names of a structure (its stains, markers and plural forms)
to one canonical name, so a model trained on ``dapi`` is scored on data whose files are
``dna.ome.tif`` (`match`), ``livestain train --structures dna`` finds ``hoechst`` files,
and predictions record the canonical name beside the model's own. Names compare
case-, space- and hyphen-blind (``Plasma-Membrane`` is ``plasma_membrane``); a name
in no alias list is its own canonical name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: canonical name -> other names of the same structure.
ALIASES: dict[str, tuple[str, ...]] = {
    "dna": ("dapi", "hoechst", "nucleus", "nuclei", "h2b"),
    "membrane": ("cellmask", "plasma_membrane", "wga", "cell_membrane"),
    "mitochondria": ("mito", "mitotracker", "tomm20", "mitochondrion"),
    "actin": ("phalloidin", "lifeact", "f_actin"),
    "tubulin": ("microtubules", "microtubule", "alpha_tubulin"),
}

_CANONICAL = {alias: name for name, aliases in ALIASES.items() for alias in (name, *aliases)}


def _key(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def canonical(name: str) -> str:
    """The canonical name of a structure (``DAPI`` -> ``dna``), else its normalised name."""
    key = _key(name)
    return _CANONICAL.get(key, key)


def find(name: str, available: Iterable[str]) -> str | None:
    """The one of ``available`` that names the same structure as ``name``: the same name
    if present, else its single alias; None when none. Two aliases (``dapi`` and
    ``hoechst`` files both, for ``dna``) is a ValueError: which to use is the user's call."""
    available = list(available)
    if name in available:
        return name
    hits = [a for a in available if canonical(a) == canonical(name)]
    if len(hits) > 1:
        raise ValueError(
            f"{', '.join(hits)} all name the structure {canonical(name)!r} (wanted: {name}); "
            "keep one of them or rename the others"
        )
    return hits[0] if hits else None


def match(wanted: Sequence[str], available: Iterable[str]) -> dict[str, str]:
    """``{wanted name: available name}`` for each of ``wanted`` that ``available`` has
    under that name or an alias (in the order of ``wanted``)."""
    available = list(available)
    found = {w: find(w, available) for w in wanted}
    return {w: a for w, a in found.items() if a is not None}
