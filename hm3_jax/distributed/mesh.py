"""The device mesh of every HM3 binary: axes ("paths", "data", "model"), always all three (size 1 when not asked
for), built from a ``--mesh`` spec string."""

from __future__ import annotations

import math
import re

import jax
from jax.sharding import AxisType, Mesh

AXES = ("paths", "data", "model")


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """Parses "paths:4,data:2[,model:2]" into {"paths": 4, "data": 2, "model": 2} (every axis present).

    ``None`` or "" puts every device on "paths". One size may be -1 ("the rest"). Missing axes get size 1.
    Raises ValueError naming the spec and the device count when the sizes do not multiply to ``num_devices``.
    """
    if not spec:
        return {"paths": num_devices, "data": 1, "model": 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*:\s*(-?\d+)\s*", part)
        if m is None:
            raise ValueError(
                f"mesh spec {spec!r}: cannot parse {part!r}; expected 'axis:size', e.g. 'paths:4,data:2'"
            )
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        if size == 0 or size < -1:
            raise ValueError(
                f"mesh spec {spec!r}: axis {name!r} has size {size}; sizes are >= 1 (or -1 for the rest)"
            )
        sizes[name] = size
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by {known}")
        sizes[rest[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh spec {spec!r} has {math.prod(sizes.values())} devices "
            f"({' x '.join(str(v) for v in sizes.values())}) but there are {num_devices} devices "
            f"(jax.device_count() across {jax.process_count()} process(es))"
        )
    return {axis: sizes.get(axis, 1) for axis in AXES}


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """A ``Mesh`` with axes ("paths", "data", "model") from a spec string (``--mesh``).

    Args:
      spec: "paths:4,data:2[,model:2]" (any order, missing axes size 1, one -1 allowed); None: all on "paths".
      devices: defaults to ``jax.devices()`` (all processes' devices).
    Returns: Mesh of shape (paths, data, model), ``AxisType.Auto`` axes. ``jax.make_mesh`` orders the devices
      for the physical topology (contiguous rings on TPU), "model" innermost so tensor-parallel collectives
      stay on the fastest links.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
