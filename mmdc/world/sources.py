"""Where a run's inputs are: the files ``data.*`` names, or the synthetic world generated into the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmdc.config import DataConfig
from mmdc.world.scenes import generate_world


@dataclass(frozen=True)
class Sources:
    """The instruction file, the folder its images resolve under, and stage 1's caption pairs and their folder.

    A run keeps them in ``state.json`` (``data``), so a resumed run reads what its first attempt prepared.
    """

    instructions: str = ""
    image_root: str | None = None
    captions: str | None = None
    caption_image_root: str | None = None

    @property
    def caption_root(self) -> str | None:
        """Where caption images resolve (the instruction images' folder unless stage 1 has its own)."""
        return self.caption_image_root or self.image_root


def resolve_data(data: DataConfig, world_dir: Path) -> Sources:
    """``data.source: world`` generates the world into ``world_dir`` (deterministic under ``data.world.seed``);
    ``llava`` uses the configured files as they are."""
    if data.source == "world":
        world = data.world
        files = generate_world(
            world_dir,
            num_images=world.num_images,
            questions_per_image=world.questions_per_image,
            seed=world.seed,
            image_size=world.image_size,
            test_images=world.test_images,
        )
        return Sources(str(files.instructions), str(files.images), str(files.captions), str(files.images))
    return Sources(
        data.instructions or "", data.image_folder, data.captions, data.caption_image_folder or data.image_folder
    )
