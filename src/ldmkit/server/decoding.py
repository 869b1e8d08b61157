"""The web UI's two settings for what turns latents into pictures, under its names and values
(modules/shared_options.py): `show_progress_type`, the live preview method /sdapi/v1/progress draws
`current_image` with, and `sd_vae_decode_method`, what decodes the final images. Both take "TAESD":
the tiny decoder `ldmkit serve --tiny-decoder FILE_OR_DIR` gives the models it fits (server/registry.py).
They are set through POST /sdapi/v1/options or a request's `override_settings`."""

from typing import TYPE_CHECKING, Any

from ldmkit.errors import RequestError

if TYPE_CHECKING:
    from ldmkit.server.registry import Models

# The web UI's value -> Pipeline.preview's method. Its "Approx NN" is a small network approximating the
# decoder, whose weights we do not have; here it is the tiny decoder (also a small network approximating
# the decoder) when the model has one, else the cheap preview. So the web UI's default never fails and
# previews as well as this server can.
PREVIEW_METHODS = {"Approx NN": "auto", "Approx cheap": "cheap", "Full": "full", "TAESD": "tiny"}
DECODE_METHODS = {"Full": "full", "TAESD": "tiny"}
CHOICES = {"show_progress_type": PREVIEW_METHODS, "sd_vae_decode_method": DECODE_METHODS}
DEFAULTS = {"show_progress_type": "Approx NN", "sd_vae_decode_method": "Full"}  # the web UI's; need no tiny decoder


def check(key: str, value: Any, tiny_decoder: str | None, where: str = "") -> str:
    """A value of setting `key` (one of CHOICES), returned; "TAESD" only when the server has a tiny
    decoder. `where`: how the request names the setting's place ("override_settings.")."""
    allowed = CHOICES[key]
    if not isinstance(value, str) or value not in allowed:
        shown = repr(value)[:80]  # a client's value, however long, stays one short line
        raise RequestError(f"{where}{key}: {shown}; allowed: {', '.join(allowed)}")
    if value == "TAESD" and not tiny_decoder:
        raise RequestError(
            f"{where}{key}: 'TAESD' needs a tiny decoder, and this server has none: start it with "
            f"--tiny-decoder FILE_OR_DIR (a TAESD decoder, or the folder holding it), or give {DEFAULTS[key]!r}"
        )
    return value


def for_job(pipe, models: "Models", name: str, preview: str, decode: str) -> str:
    """On the worker, model `name` loaded as `pipe`: its images set to be decoded as `decode` asks, and
    the Pipeline.preview method `preview` stands for returned. TAESD asked of a model without a tiny
    decoder (--tiny-decoder's file did not fit it, or its folder has none for it) is refused, saying why."""
    if pipe.codec.tiny is None:
        why = models.tiny_notes.get(name, "none was given")
        for key, value in (("show_progress_type", preview), ("sd_vae_decode_method", decode)):
            if value == "TAESD":
                raise RequestError(
                    f"{key}: 'TAESD', but model {name!r} has no tiny decoder ({why}); "
                    f"give {DEFAULTS[key]!r}, or a fitting decoder with --tiny-decoder FILE_OR_DIR"
                )
    pipe.codec.decoder = DECODE_METHODS[decode]  # every job sets it: the pipeline is shared across jobs
    return PREVIEW_METHODS[preview]
