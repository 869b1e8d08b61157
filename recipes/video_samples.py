"""The text-to-video pictures for docs/video.md: for each prompt, the image model frame by frame (the baseline)
and the video model, frames left to right (pixels doubled), as a PNG; and the video model's clips side by side as
one animated GIF.

    python recipes/video_samples.py ~/runs/shapes-video/video.safetensors docs/shapes-video.png docs/shapes-video.gif
"""

import sys

from PIL import Image

from ldmkit.bundled import resolve
from ldmkit.checkpoints.single_file import load_model
from ldmkit.images import image_grid
from ldmkit.pipelines.video import VideoPipeline
from ldmkit.training.video_ldm import ClipDataConfig, VideoLDMTrainConfig, video_model_from_image_model
from ldmkit.videos import write_video

# the last two pair a shape with a motion training never showed (data/shapes_clips.HELD_OUT)
PROMPTS = [
    "a red circle moving right",
    "a blue square moving down",
    "a green star shrinking",
    "a yellow triangle turning purple",
    "an orange circle moving up",
    "a purple triangle growing",
]
SCALE = 2


def main(video_path: str, png: str, gif: str, seed: int = 0) -> None:
    video = VideoPipeline.load(video_path)
    frames = video.model.config.unet.num_frames
    config = VideoLDMTrainConfig(data=ClipDataConfig(frames=frames))
    baseline = VideoPipeline(video_model_from_image_model(load_model(resolve("shapes")[0]), config), "baseline")
    rows, clips = [], []
    for prompt in PROMPTS:
        clip = video(prompt=prompt, seed=seed).videos[0]
        rows += [baseline(prompt=prompt, seed=seed).videos[0], clip]
        clips.append(clip)
    grid = image_grid([f for row in rows for f in row], rows=len(rows))
    grid.resize((grid.width * SCALE, grid.height * SCALE), Image.NEAREST).save(png)
    side = clips[0][0].width
    tiled = []
    for i in range(frames):
        canvas = Image.new("RGB", (side * len(clips), side))
        for k, clip in enumerate(clips):
            canvas.paste(clip[i], (side * k, 0))
        tiled.append(canvas.resize((canvas.width * SCALE, canvas.height * SCALE), Image.NEAREST))
    write_video(gif, tiled, 4, " | ".join(PROMPTS) + f"\nSeed: {seed}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
