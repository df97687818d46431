"""Frontal projection of a HU volume: what the phantom's DRRs and ``embedstore.drr`` (DRRs of real
CT) share. Pure numpy/scipy: attenuation line integrals, resampling onto a square detector in display
orientation, and the 12-bit display mapping. Noise, blur and pose draws stay with their callers.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from embedstore.errors import ConfigError

__all__ = ["MU_WATER_PER_MM", "frontal_image", "frontal_pixel_mm", "line_integrals", "to_12bit"]

MU_WATER_PER_MM = 0.0193  # linear attenuation of water at ~70 keV effective energy


def line_integrals(hu: np.ndarray, axis: int, step_mm: float, *, slab: int = 16) -> np.ndarray:
    """Attenuation line integrals of a HU volume along ``axis``: sum of mu * step (unitless).

    mu = MU_WATER_PER_MM * (1 + HU / 1000), clipped at 0 (air and the padding outside a CT's
    field of view attenuate nothing). Computed slab by slab along axis 0, so the float32 mu of
    at most ``slab`` slices is held at once: a 600-slice series needs no second full volume.
    Returns the volume's shape without ``axis``, float32.
    """
    if axis not in (0, 1, 2):
        raise ConfigError(f"line_integrals: axis must be 0, 1 or 2, got {axis!r}.")
    out_shape = tuple(n for k, n in enumerate(hu.shape) if k != axis)
    out = np.zeros(out_shape, np.float32)
    for a in range(0, hu.shape[0], slab):
        mu = np.clip(MU_WATER_PER_MM * (1.0 + hu[a : a + slab].astype(np.float32) / 1000.0),
                     0.0, None)  # (s, Y, X)
        if axis == 0:
            out += mu.sum(axis=0)
        else:
            out[a : a + slab] = mu.sum(axis=axis)  # slab rows of the (Z, X) or (Z, Y) result
    out *= np.float32(step_mm)
    return out


def frontal_pixel_mm(nz: int, nx: int, sz: float, sx: float, size: int) -> float:
    """Pixel size (mm) of a square ``size``-pixel frontal image covering the larger extent."""
    return max(nz * sz, nx * sx) / size


def frontal_image(line: np.ndarray, sz: float, sx: float, size: int, *, angle: float = 0.0,
                  shift_mm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Resample (Z, X) line integrals (z inferior -> superior, x to the patient's left) onto a
    square ``size`` x ``size`` image of square pixels covering the larger extent, centred, in
    display orientation (top = superior, image left = patient right). ``angle`` (radians) and
    ``shift_mm`` (z, x) move the patient on the detector. Outside the volume: no attenuation."""
    nz, nx = line.shape
    n = int(size)
    px = frontal_pixel_mm(nz, nx, sz, sx, n)
    r = (np.arange(n) + 0.5 - n / 2.0) * px  # (n,) mm from centre
    zz = -r[:, None] * np.ones((1, n))  # (n, n) world z, top row superior
    xx = r[None, :] * np.ones((n, 1))  # (n, n) world x, left column = patient right
    c, s = math.cos(angle), math.sin(angle)
    zr = c * zz - s * xx + shift_mm[0]
    xr = s * zz + c * xx + shift_mm[1]
    ki = zr / sz + (nz - 1) / 2.0
    ii = xr / sx + (nx - 1) / 2.0
    return ndimage.map_coordinates(line, [ki, ii], order=1, mode="constant", cval=0.0)  # (n, n)


def to_12bit(atten: np.ndarray, *, gain: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Detected attenuation -> 12-bit display values (MONOCHROME2 sense, bright = dense)."""
    return np.clip(np.rint(gain * atten * 420.0 + 200.0 + offset), 0, 4095).astype(np.uint16)
