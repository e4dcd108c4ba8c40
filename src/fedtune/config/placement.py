"""``model.device_map``'s type and its check: accelerate's placement of the model over devices."""

from __future__ import annotations

import re
from typing import Literal

DeviceMapName = Literal["auto", "balanced", "balanced_low_0", "sequential"]
DeviceMap = DeviceMapName | dict[str, int | str]
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device_map(device: str, device_map: DeviceMap | None) -> None:
    """Raise ValueError unless ``device_map`` is unset, or set alone with sane devices.

    A map replaces ``model.device`` (so that must stay ``auto``); each module of a map goes to
    ``cpu``, ``cuda:N`` or a GPU index ``N``: no ``disk`` offloading, since the model trains.
    """
    if device_map is None:
        return
    if device != "auto":
        raise ValueError(f"set model.device_map or model.device={device!r}, not both")
    if isinstance(device_map, dict):
        bad = [
            f"{k!r} = {v!r}"
            for k, v in device_map.items()
            if not ((isinstance(v, int) and v >= 0) or (isinstance(v, str) and _DEVICE.match(v)))
        ]
        if bad or not device_map:
            raise ValueError(
                f"device_map: {', '.join(bad) or 'empty'}: each module needs a device, "
                "'cpu', 'cuda:N' or a GPU index N (no 'disk': fedtune trains the model)"
            )
