"""Where `ldmkit serve` saves what it makes: every image with its parameters, and a grid of each request of
more than one image, in the web UI's folder layout."""

import threading
from datetime import date
from pathlib import Path


class Outputs:
    """Every image saved with its parameters, atomically, in the web UI's folder layout."""

    def __init__(self, root: str):
        self.root = Path(root).expanduser()
        self._lock = threading.Lock()
        self._count = len(list(self.root.glob("*-images/*/*.png"))) if self.root.exists() else 0
        self._grids = len(list(self.root.glob("*-grids/*/grid-*.png"))) if self.root.exists() else 0

    def save(self, kind: str, image, seed: int, parameters: str) -> Path:
        """KIND-images/DATE/NNNNN-SEED.png."""
        with self._lock:
            self._count += 1
            n = self._count
        return self._write(f"{kind}-images", f"{n:05d}-{seed}.png", image, parameters)

    def save_grid(self, kind: str, images: list, parameters: str) -> Path:
        """KIND-grids/DATE/grid-NNNNN.png: the images in the web UI's grid layout, with the first image's
        parameters (as the web UI writes its grids)."""
        from ldmkit.images import image_grid

        with self._lock:
            self._grids += 1
            n = self._grids
        return self._write(f"{kind}-grids", f"grid-{n:05d}.png", image_grid(images), parameters)

    def _write(self, subfolder: str, name: str, image, parameters: str) -> Path:
        from ldmkit.images import write_png

        path = self.root / subfolder / date.today().isoformat() / name
        write_png(path, image, parameters)  # makes the folder, writes atomically
        return path
