"""Where `ldmkit serve` saves what it makes: every image with its parameters, in the web UI's folder layout."""

import threading
from datetime import date
from pathlib import Path


class Outputs:
    """Every image saved with its parameters, atomically, in the web UI's folder layout."""

    def __init__(self, root: str):
        self.root = Path(root).expanduser()
        self._lock = threading.Lock()
        self._count = len(list(self.root.glob("*-images/*/*.png"))) if self.root.exists() else 0

    def save(self, kind: str, image, seed: int, parameters: str) -> Path:
        from ldmkit.images import write_png

        with self._lock:
            self._count += 1
            n = self._count
        folder = self.root / f"{kind}-images" / date.today().isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{n:05d}-{seed}.png"
        write_png(path, image, parameters)
        return path
