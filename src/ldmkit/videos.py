"""Clips out: the format is the output's extension — animated PNG (.png, .apng: lossless), WebP, GIF (Pillow)
or MP4 (H.264 through PyAV, the `video` extra) — and the generation parameters travel inside the file as for
PNGs: APNG's `parameters` text chunk, GIF's comment, WebP's EXIF UserComment (where the popular web UI puts
them in JPEG and WebP), MP4's `comment` tag. Writes are atomic: a crash never leaves half a file."""

from pathlib import Path

from PIL import Image, PngImagePlugin

from ldmkit.checkpoints.files import atomic_write
from ldmkit.errors import ConfigError

FORMATS = {".png": "apng", ".apng": "apng", ".webp": "webp", ".gif": "gif", ".mp4": "mp4"}
USER_COMMENT = 0x9286  # EXIF's UserComment tag
ASCII = b"ASCII\x00\x00\x00"  # EXIF's character code prefix of a UserComment


def video_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        allowed = ", ".join(FORMATS)
        raise ConfigError(f"{path}: the extension {suffix or '(none)'} names no video format; allowed: {allowed}")
    return FORMATS[suffix]


def _frame_ms(fps: int) -> float:
    return 1000.0 / fps


def _apng(tmp: Path, frames: list[Image.Image], fps: int, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    first, rest = frames[0], frames[1:]
    first.save(tmp, format="PNG", save_all=True, append_images=rest, duration=_frame_ms(fps), loop=0, pnginfo=info)


def _webp(tmp: Path, frames: list[Image.Image], fps: int, parameters: str) -> None:
    exif = Image.Exif()
    exif[USER_COMMENT] = ASCII + parameters.encode("ascii", "backslashreplace")
    frames[0].save(
        tmp,
        format="WEBP",
        save_all=True,
        append_images=frames[1:],
        duration=round(_frame_ms(fps)),
        loop=0,
        quality=90,
        exif=exif.tobytes(),
    )


def _gif(tmp: Path, frames: list[Image.Image], fps: int, parameters: str) -> None:
    # GIF counts in hundredths of a second
    duration = max(10, round(_frame_ms(fps) / 10) * 10)
    frames[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=duration,
        loop=0,
        comment=parameters.encode("utf-8"),
    )


def _mp4(tmp: Path, frames: list[Image.Image], fps: int, parameters: str) -> None:
    try:
        import av
    except ImportError:
        raise ConfigError("MP4 needs PyAV: pip install 'ldmkit[video]' (or write .png, .webp or .gif)") from None
    w, h = frames[0].size
    if w % 2 or h % 2:
        raise ConfigError(f"MP4 (H.264, 4:2:0) needs even sides; these frames are {w}x{h}: write .png, .webp or .gif")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        container.metadata["comment"] = parameters
        stream = container.add_stream("libx264", rate=fps, options={"crf": "18"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for im in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(im.convert("RGB"))))
        container.mux(stream.encode(None))


WRITERS = {"apng": _apng, "webp": _webp, "gif": _gif, "mp4": _mp4}


def write_video(path: str | Path, frames: list[Image.Image], fps: int, parameters: str = "") -> None:
    """Frames (one size) -> one animated file at `fps`, looping where the format loops."""
    fmt = video_format(path)
    if not frames:
        raise ConfigError(f"{path}: no frames to write")
    if len({im.size for im in frames}) != 1:
        raise ConfigError(f"{path}: frames of different sizes")
    if not isinstance(fps, int) or isinstance(fps, bool) or fps < 1:
        raise ConfigError(f"fps: {fps!r}; allowed: 1 or more")
    atomic_write(path, lambda tmp: WRITERS[fmt](tmp, frames, fps, parameters))


def read_video_parameters(path: str | Path) -> str:
    """The parameters text a clip written by write_video carries ("" when it has none)."""
    if video_format(path) == "mp4":
        import av

        with av.open(str(path)) as container:
            return container.metadata.get("comment", "")
    with Image.open(path) as im:
        if "parameters" in im.info:
            return im.info["parameters"]
        if "comment" in im.info:
            return im.info["comment"].decode("utf-8", "replace")
        comment = im.getexif().get(USER_COMMENT, b"")
        comment = comment.encode("latin-1") if isinstance(comment, str) else comment
        return comment[len(ASCII) :].decode("ascii", "replace") if comment.startswith(ASCII) else ""


def frame_count(path: str | Path) -> int:
    if video_format(path) == "mp4":
        import av

        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(video=0))
    with Image.open(path) as im:
        return getattr(im, "n_frames", 1)
