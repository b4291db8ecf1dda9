"""The layer table kept with the features: name, channels and native size of each captured map.

Its own module so that stages two and three (which read arrays only) need nothing of stage one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerInfo:
    name: str
    channels: int
    height: int
    width: int

    def as_dict(self) -> dict:
        return {"name": self.name, "channels": self.channels, "height": self.height, "width": self.width}
