"""The base of every recipe section: an unknown key is refused (config.loading names the closest valid one)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
