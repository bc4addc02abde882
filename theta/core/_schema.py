"""Schema hash of an application's component manifest (spec section 4.3)."""

from __future__ import annotations

from collections.abc import Mapping

import siphashc

__all__ = ["SCHEMA_HASH_KEY", "canonical_manifest", "schema_hash"]

SCHEMA_HASH_KEY = b"theta-schema-v1!"
"""The 16-byte SipHash-2-4 key of the schema hash."""


def canonical_manifest(manifest: Mapping[str, str]) -> bytes:
    """The canonical bytes of ``manifest`` (component name → descriptor).

    Entries sorted by the UTF-8 bytes of the name, each ``u16 len(name) || name ||
    u32 len(descriptor) || descriptor``. Raises ``TypeError`` for a non-string entry and
    ``ValueError`` for a name over 65535 or a descriptor over 2**32-1 UTF-8 bytes.
    """
    entries: list[tuple[bytes, bytes]] = []
    for name, descriptor in manifest.items():
        if not isinstance(name, str) or not isinstance(descriptor, str):
            raise TypeError(f"manifest entries must be str → str, not {name!r}: {descriptor!r}")
        encoded_name, encoded_descriptor = name.encode("utf-8"), descriptor.encode("utf-8")
        if len(encoded_name) > 0xFFFF:
            raise ValueError(f"component name of {len(encoded_name)} bytes is too long")
        if len(encoded_descriptor) > 0xFFFF_FFFF:
            raise ValueError(f"descriptor of component {name!r} is too long")
        entries.append((encoded_name, encoded_descriptor))
    entries.sort(key=lambda entry: entry[0])
    return b"".join(
        len(name).to_bytes(2, "big") + name + len(descriptor).to_bytes(4, "big") + descriptor
        for name, descriptor in entries
    )


def schema_hash(manifest: Mapping[str, str]) -> int:
    """SipHash-2-4 (key ``theta-schema-v1!``) of :func:`canonical_manifest`, as the
    standard little-endian 64-bit output."""
    return int(siphashc.siphash(SCHEMA_HASH_KEY, canonical_manifest(manifest)))
