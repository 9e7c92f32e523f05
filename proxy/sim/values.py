"""What flows along the simulator's links: light stand-ins for tensors and models.

An image is a recipe (what made it) plus its size; pixels are rendered only when a file or a preview is
written, from the recipe and the backend's name (see `images.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SimModel:
    ckpt_name: str
    recipe: str


@dataclass(frozen=True)
class SimClip:
    recipe: str


@dataclass(frozen=True)
class SimVae:
    recipe: str


@dataclass(frozen=True)
class SimConditioning:
    recipe: str


@dataclass(frozen=True)
class SimLatent:
    width: int
    height: int
    batch: int
    recipe: str

    def __str__(self) -> str:
        return f"{{'samples': tensor(<latent {self.batch}x4x{self.height // 8}x{self.width // 8}>)}}"


@dataclass(frozen=True)
class SimImage:
    width: int
    height: int
    batch: int
    recipe: str
    inverted: bool = False

    def derive(self, step: str, **changes: object) -> SimImage:
        return replace(self, recipe=f"{self.recipe}|{step}", **changes)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"tensor(<image {self.batch}x{self.height}x{self.width}x3>)"


@dataclass(frozen=True)
class SimMask:
    width: int
    height: int
    recipe: str

    def __str__(self) -> str:
        return f"tensor(<mask 1x{self.height}x{self.width}>)"
