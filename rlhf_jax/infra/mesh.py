"""Device mesh construction: ICI x DCN shapes for TPU slices, GPU nodes and CPU.

`config.mesh.ici` is the mesh within one slice (TPU) or node (GPU); `config.mesh.dcn` is the mesh
across slices / nodes. One `-1` per shape fills the remaining devices. Only entry points build a
mesh (`launch.run` for the stages, the command-line tools in `rlhf_jax/tools/` for theirs); library
code receives it as an argument.
"""

from __future__ import annotations

import math

import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


def config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> mlc.ConfigDict:
    """`config.mesh`: ICI (within a slice / node) and DCN (across slices / nodes) shapes;
    -1 fills."""
    return mlc.ConfigDict(
        dict(ici=dict(data=data, fsdp=fsdp, tensor=tensor), dcn=dict(data=1, fsdp=1, tensor=1))
    )


def _fill(shape: dict, total: int, where: str) -> tuple[int, ...]:
    sizes = [int(shape[a]) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"{where}: at most one axis may be -1, got {dict(zip(AXES, sizes, strict=True))}"
        )
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{where}: axis sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ValueError(f"{where}: {total} devices do not divide into {sizes}")
        sizes[sizes.index(-1)] = total // known
    if math.prod(sizes) != total:
        raise ValueError(
            f"{where}: shape {dict(zip(AXES, sizes, strict=True))} needs "
            f"{math.prod(sizes)} devices, but there are {total}"
        )
    return tuple(sizes)


def num_granules(devices) -> int:
    """Slices on multi-slice TPU, processes (nodes) on GPU, 1 otherwise."""
    if devices[0].platform == "tpu":
        return len({getattr(d, "slice_index", 0) for d in devices})
    if devices[0].platform == "gpu":
        return len({d.process_index for d in devices})
    return 1


def build_mesh(mesh_cfg, devices=None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor) from `mesh_cfg.ici` and `mesh_cfg.dcn`."""
    devices = list(devices if devices is not None else jax.devices())
    granules = num_granules(devices)
    dcn_cfg = dict(mesh_cfg.dcn)
    if granules == 1 and all(int(v) in (1, -1) for v in dcn_cfg.values()):
        dcn = (1, 1, 1)
    else:
        dcn = _fill(dcn_cfg, granules, "config.mesh.dcn")
    per_granule = len(devices) // math.prod(dcn)
    ici = _fill(dict(mesh_cfg.ici), per_granule, "config.mesh.ici")
    if math.prod(dcn) == 1:
        if devices[0].platform == "cpu":
            grid = np.array(devices).reshape(ici)  # no topology to optimise on CPU
        else:
            grid = mesh_utils.create_device_mesh(ici, devices=devices)
    else:
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices=devices, process_is_granule=devices[0].platform != "tpu"
        )
    return Mesh(grid, AXES)
