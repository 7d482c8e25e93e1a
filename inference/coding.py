"""Coded terms as plain values (scheme, value, meaning), shared by readers, task specs and writers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CodedTerm:
    """A coded concept: ``CodeValue``, ``CodingSchemeDesignator``, ``CodeMeaning``."""

    value: str
    scheme_designator: str
    meaning: str

    def __post_init__(self) -> None:
        if not self.value or not self.scheme_designator or not self.meaning:
            raise ValueError(f"a coded term needs value, scheme and meaning, got {self!r}")

    @classmethod
    def from_item(cls, item: Any) -> CodedTerm | None:
        """From a DICOM code sequence item (or None)."""
        if item is None:
            return None
        value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or ""
        scheme = str(item.get("CodingSchemeDesignator", ""))
        meaning = str(item.get("CodeMeaning", ""))
        if not value or not scheme or not meaning:
            return None
        return cls(str(value), scheme, meaning)

    @classmethod
    def parse(cls, text: str) -> CodedTerm:
        """``"SCT:41216001:Prostate"`` -> CodedTerm (the meaning may contain colons)."""
        parts = text.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"expected SCHEME:VALUE:MEANING, got {text!r}")
        scheme, value, meaning = (p.strip() for p in parts)
        return cls(value, scheme, meaning)

    def __str__(self) -> str:
        return f"({self.value}, {self.scheme_designator}, {self.meaning!r})"
