"""What the routes share: the configuration, the one worker, the models, the outputs folder and the
options the web UI reads and sets."""

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ldmkit.server.outputs import Outputs
from ldmkit.server.registry import Models
from ldmkit.server.video import VideoModels
from ldmkit.server.worker import Worker

if TYPE_CHECKING:
    from ldmkit.server.app import ServeConfig


@dataclass
class ServerState:
    config: "ServeConfig"
    worker: Worker
    models: Models
    outputs: Outputs
    options: dict[str, Any]  # GET/POST /sdapi/v1/options
    model_lock: threading.Lock = field(default_factory=threading.Lock)
    videos: VideoModels = field(default_factory=lambda: VideoModels([]))

    def load(self, name: str):
        """The pipeline of model `name`, loaded if it is not the loaded one. On the worker thread only."""
        with self.model_lock:
            return self.models.load(name)
