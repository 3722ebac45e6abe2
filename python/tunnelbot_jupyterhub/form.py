"""The spawn form of the deployment tunnelbot replaces: partition, wall time, cores, memory and
a container image, each chosen from what the admin allows and checked before it reaches a
batch script.

Every value is validated twice: when the form is posted (``options_from_form``) and when the
job is submitted (:meth:`SpawnFormMixin.form_subvars`), since the REST API
(``POST /hub/api/users/<name>/server`` with a JSON body) sets ``user_options`` without the form.
Only the fields below ever reach a template, never other ``user_options`` keys.
"""

from __future__ import annotations

import html
import re
from typing import Any, Dict, List, Optional

from traitlets.config import LoggingConfigurable
from traitlets import Dict as DictTrait, Integer, List as ListTrait, TraitError, Unicode, default, validate

__all__ = ["FormError", "SpawnFormMixin", "memory_megabytes"]

_MEMORY = re.compile(r"^([1-9][0-9]{0,7})([KMGT]?)$")
_UNITS = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}


class FormError(ValueError):
    """A spawn-form value outside what the admin allows (the message says which)."""


def memory_megabytes(value: str) -> Optional[int]:
    """Megabytes in a Slurm-style memory value (``512M``, ``8G``, ``4096``); None if malformed."""
    match = _MEMORY.match(value.strip().upper())
    if not match:
        return None
    return max(1, int(int(match.group(1)) * _UNITS[match.group(2)]))


class SpawnFormMixin(LoggingConfigurable):
    """Adds the spawn form to a batch spawner. No field is shown unless the admin enables it."""

    form_partitions = ListTrait(
        Unicode(),
        help="Partitions (queues) a user may choose from; the first is the default. Empty: no choice.",
    ).tag(config=True)

    form_runtime_max = Unicode(
        "",
        help="""Longest wall time a user may ask for, in the scheduler's format (Slurm "12:00:00",
        "1-00:00:00"). Empty: no wall-time field (req_runtime applies).""",
    ).tag(config=True)

    form_runtime_default = Unicode("", help="The wall time the form proposes (default: req_runtime).").tag(config=True)

    form_nprocs_max = Integer(0, help="Most cores a user may ask for. 0: no cores field.").tag(config=True)

    form_memory_max = Unicode("", help='Most memory a user may ask for, e.g. "64G". Empty: no memory field.').tag(
        config=True
    )

    form_images = DictTrait(
        value_trait=Unicode(),
        help="""Container images a user may choose from, {label: image path}; the first is the default.
        The chosen image's path fills {image} in image_cmd. Empty: no image field.""",
    ).tag(config=True)

    image_cmd = ListTrait(
        Unicode(),
        ["apptainer", "exec", "{image}"],
        help="""Put between the job wrapper and Spawner.cmd when an image is chosen: the wrapper
        runs on the node, outside the container, which shares the node's network.""",
    ).tag(config=True)

    @validate("form_images")
    def _validate_images(self, proposal: Dict[str, Any]) -> Dict[str, str]:
        images: Dict[str, str] = dict(proposal["value"])
        for label, path in images.items():
            if not re.match(r"^/[A-Za-z0-9_./+-]+$", path) or "/../" in path:
                raise TraitError(f"image {label!r}: {path!r} is not an absolute path of plain characters")
        return images

    # Base-class traits this mixin reads (annotations only, for mypy).
    req_runtime: str
    req_partition: str
    req_nprocs: str
    req_memory: str
    user_options: Dict[str, Any]

    def parse_walltime(self, value: str) -> Optional[int]:
        raise NotImplementedError

    @default("options_form")
    def _options_form_from_settings(self) -> Any:
        return self._default_options_form if self.form_enabled() else ""

    @default("apply_user_options")
    def _apply_user_options_default(self) -> Any:
        # JupyterHub 6 calls this before start() and turns an HTTPError into the user's answer:
        # a bad choice is a 400 naming the problem, not a 500 after a tunnel was issued.
        def check(spawner: "SpawnFormMixin", user_options: Dict[str, Any]) -> None:
            try:
                spawner.check_options(dict(user_options or {}))
            except FormError as e:
                from tornado import web

                raise web.HTTPError(400, str(e)) from None

        return check

    def form_enabled(self) -> bool:
        return bool(
            self.form_partitions or self.form_runtime_max or self.form_nprocs_max or self.form_memory_max or self.form_images
        )

    def _default_options_form(self, spawner: Any) -> str:
        if not self.form_enabled():
            return ""
        e = html.escape
        rows: List[str] = []
        if self.form_partitions:
            opts = "".join(f'<option value="{e(p)}">{e(p)}</option>' for p in self.form_partitions)
            rows.append(f'<label for="partition">Partition</label><select name="partition" class="form-control">{opts}</select>')
        if self.form_runtime_max:
            value = self.form_runtime_default or getattr(self, "req_runtime", "") or self.form_runtime_max
            rows.append(
                f'<label for="runtime">Wall time (at most {e(self.form_runtime_max)})</label>'
                f'<input name="runtime" class="form-control" value="{e(value)}">'
            )
        if self.form_nprocs_max:
            rows.append(
                f'<label for="nprocs">Cores (1 to {self.form_nprocs_max})</label>'
                f'<input name="nprocs" type="number" min="1" max="{self.form_nprocs_max}" class="form-control" value="1">'
            )
        if self.form_memory_max:
            rows.append(
                f'<label for="memory">Memory (at most {e(self.form_memory_max)})</label>'
                f'<input name="memory" class="form-control" value="{e(getattr(self, "req_memory", "") or "")}">'
            )
        if self.form_images:
            opts = "".join(f'<option value="{e(label)}">{e(label)}</option>' for label in self.form_images)
            rows.append(f'<label for="image">Image</label><select name="image" class="form-control">{opts}</select>')
        return "\n".join(f'<div class="form-group">{row}</div>' for row in rows)

    def options_from_form(self, formdata: Dict[str, List[str]]) -> Dict[str, str]:
        raw = {k: (v[0] if isinstance(v, list) and v else v) for k, v in formdata.items()}
        return self.check_options({k: str(v) for k, v in raw.items() if v not in (None, "")})

    def check_options(self, options: Dict[str, Any]) -> Dict[str, str]:
        """The user's choices, validated against the admin's limits; raises FormError."""
        checked: Dict[str, str] = {}
        unknown = set(options) - {"partition", "runtime", "nprocs", "memory", "image"}
        if unknown:
            raise FormError(f"unknown spawn options: {', '.join(sorted(map(str, unknown)))}")
        if "partition" in options:
            value = str(options["partition"])
            if value not in self.form_partitions:
                raise FormError(f"partition {value!r} is not one of {', '.join(self.form_partitions) or '(none offered)'}")
            checked["partition"] = value
        if "runtime" in options:
            value = str(options["runtime"]).strip()
            seconds = self.parse_walltime(value) if self.form_runtime_max and _plain(value) else None
            limit = self.parse_walltime(self.form_runtime_max) if self.form_runtime_max else None
            if seconds is None or seconds <= 0:
                raise FormError(f"wall time {value!r} is not a wall time this hub accepts")
            if limit is not None and seconds > limit:
                raise FormError(f"wall time {value} is longer than the limit {self.form_runtime_max}")
            checked["runtime"] = value
        if "nprocs" in options:
            value = str(options["nprocs"]).strip()
            if not value.isdigit() or not 1 <= int(value) <= max(self.form_nprocs_max, 0):
                raise FormError(f"cores must be a whole number from 1 to {self.form_nprocs_max}")
            checked["nprocs"] = str(int(value))
        if "memory" in options:
            value = str(options["memory"]).strip().upper()
            mb = memory_megabytes(value) if self.form_memory_max else None
            limit = memory_megabytes(self.form_memory_max) if self.form_memory_max else None
            if mb is None or limit is None or mb > limit:
                raise FormError(f"memory {value!r} is malformed or more than {self.form_memory_max or 'allowed'}")
            checked["memory"] = value
        if "image" in options:
            value = str(options["image"])
            if value not in self.form_images:
                raise FormError(f"image {value!r} is not one of {', '.join(self.form_images) or '(none offered)'}")
            checked["image"] = value
        return checked

    def form_subvars(self) -> Dict[str, str]:
        """Template variables from the user's (re-validated) choices; image as its path."""
        checked = self.check_options(dict(self.user_options or {}))
        if "image" in checked:
            checked["image"] = self.form_images[checked["image"]]
        return checked

    def image_argv(self) -> List[str]:
        image = self.form_subvars().get("image")
        if not image:
            return []
        return [part.replace("{image}", image) for part in self.image_cmd]


def _plain(value: str) -> bool:
    return bool(re.match(r"^[0-9:-]{1,16}$", value))
