"""The model catalog: the built-in `models.yaml`, with user catalogs merged over it.

Merge rules, in order: the built-in catalog, then each file of `VPOOL_CATALOG=FILE[:FILE...]`,
then each explicit path (the CLI's `--catalog FILE`, `controller.launch.catalog`). A later
file merges into an earlier model field by field, nested sections too: a user file holding
only `{name: Llama-2-7b-chat-hf, slurm: {partition: a100}}` changes that partition and
nothing else. `null` removes a field (back to its default). A name the catalog lacks adds a
model, which must then be complete.

A file holds `models:` as a list of entries or as a mapping of name to entry; a bare list, or
one bare entry, works too. An invalid entry is reported naming the file that made it so, the
model and the field.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vpool.catalog.entry import Architecture, CatalogEntry, SlurmDefaults
from vpool.catalog.errors import CatalogError, UnknownModel

__all__ = ["Architecture", "Catalog", "CatalogEntry", "CatalogError", "SlurmDefaults", "load_catalog"]

CATALOG_ENV = "VPOOL_CATALOG"
BUILTIN = "vpool/catalog/models.yaml"


class Catalog:
    """Models by name, in catalog order; look one up with `get`."""

    def __init__(self, entries: Sequence[CatalogEntry], sources: Sequence[str] = ()) -> None:
        self._entries = {entry.name: entry for entry in entries}
        self.sources = list(sources)  # the files merged, built-in first

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> CatalogEntry:
        """The entry named `name` (any case), or whose hub id is `name`; UnknownModel, which
        lists the close names, when there is none."""
        entry = self._find(name)
        if entry is None:
            close = self.close_names(name)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise UnknownModel(
                f'Unknown model "{name}": the catalog has no such name.{hint} '
                "`vpool list` shows every model.",
                param="model",
                choices=close,
            )
        return entry

    def close_names(self, name: str, limit: int = 5) -> list[str]:
        """Names holding `name` (any case) first, then the most alike."""
        lowered = {n.lower(): n for n in self._entries}
        key = name.lower()
        found = [n for low, n in lowered.items() if key in low]
        found += [lowered[n] for n in difflib.get_close_matches(key, lowered, n=limit, cutoff=0.5)]
        return list(dict.fromkeys(found))[:limit]

    def _find(self, name: str) -> CatalogEntry | None:
        if name in self._entries:
            return self._entries[name]
        key = name.lower()
        for entry in self._entries.values():
            if key in (entry.name.lower(), entry.model.lower()):
                return entry
        return None


def load_catalog(
    paths: Sequence[Path | str] = (), *, environ: Mapping[str, str] | None = None, builtin: bool = True
) -> Catalog:
    """The built-in catalog, then VPOOL_CATALOG's files, then `paths`, merged in that order."""
    env = os.environ if environ is None else environ
    files = [Path(p) for p in env.get(CATALOG_ENV, "").split(os.pathsep) if p.strip()]
    files += [Path(p) for p in paths]
    raw: dict[str, dict[str, Any]] = {}
    entries: dict[str, CatalogEntry] = {}
    sources: list[str] = []
    if builtin:
        text = resources.files("vpool.catalog").joinpath("models.yaml").read_text()
        _merge_file(raw, entries, _parse(text, BUILTIN), BUILTIN)
        sources.append(BUILTIN)
    for path in files:
        _merge_file(raw, entries, _parse(_read(path), str(path)), str(path))
        sources.append(str(path))
    return Catalog(list(entries.values()), sources)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise CatalogError(f"catalog {path}: file not found", param="catalog") from None
    except OSError as exc:
        raise CatalogError(f"catalog {path}: cannot be read ({exc.strerror})", param="catalog") from None


def _parse(text: str, source: str) -> list[dict[str, Any]]:
    """The entries of one file, each a mapping with a `name`."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {source}: not valid YAML: {exc}", param="catalog") from None
    if data is None:
        return []
    if isinstance(data, dict) and "models" in data:
        data = data["models"] or []
        if isinstance(data, dict):
            data = [_named(name, raw, source) for name, raw in data.items()]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise CatalogError(
            f"catalog {source}: expected `models:` with a list or mapping of models", param="catalog"
        )
    entries = []
    for index, raw in enumerate(data, start=1):
        if not isinstance(raw, dict):
            raise CatalogError(f"catalog {source}, model #{index}: expected a mapping", param="catalog")
        if not isinstance(raw.get("name"), str) or not raw["name"]:
            raise CatalogError(
                f"catalog {source}, model #{index}, field name: Field required", param="catalog"
            )
        entries.append(raw)
    return entries


def _named(name: object, raw: object, source: str) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise CatalogError(f'catalog {source}, model "{name}": expected a mapping', param="catalog")
    return {**raw, "name": str(raw.get("name", name))}


def _merge_file(
    raw: dict[str, dict[str, Any]],
    entries: dict[str, CatalogEntry],
    updates: list[dict[str, Any]],
    source: str,
) -> None:
    """Merge one file's entries, validating each model it touches: the file named in an
    error is the one that made the model invalid."""
    for update in updates:
        name = update["name"]
        combined = _deep_merge(raw.get(name, {}), update)
        try:
            entries[name] = CatalogEntry.model_validate(combined)
        except ValidationError as exc:
            raise CatalogError(_describe(exc, source, name), param="catalog") from None
        raw[name] = combined


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(exc: ValidationError, source: str, name: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        field = f", field {where}" if where else ""
        lines.append(f'catalog {source}, model "{name}"{field}: {err["msg"]}')
    return "\n".join(lines)
