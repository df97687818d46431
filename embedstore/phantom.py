"""Synthetic chest phantom: a CTPA volume in Hounsfield units and a DRR of its non-contrast twin.

Pure numpy/scipy (no pydicom, no torch). Geometry lives in millimetres in the DICOM patient
frame (LPS: +x to the patient's left, +y posterior, +z superior) with the origin at the centre of
the grid, so every size is independent of the voxel grid. One patient is drawn from one
``numpy.random.Generator``; the draws happen in a fixed order, so a seed fixes the case exactly.

What makes a case PE-positive (see docs/PHANTOM.md for the reasoning):

* on CTPA: 1-3 low-attenuation clots in central/lobar/segmental arteries; occlusive ones leave the
  downstream arteries unopacified and their lung territory unenhanced (perfusion defect);
* on the radiograph (a DRR of the non-contrast twin, where clots are invisible): only indirect
  signs, i.e. regional oligemia (Westermark), a peripheral wedge opacity (Hampton hump) and an
  enlarged central pulmonary artery, each present in some positives only.

Label-independent confounders (effusion, consolidation, emphysema, cardiomegaly) appear in both.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage

from embedstore.errors import ConfigError
from embedstore.projection import (
    frontal_image,
    frontal_pixel_mm,
    line_integrals,
    to_12bit,
)

__all__ = [
    "PHANTOM_VERSION",
    "PhantomSpec",
    "PhantomCase",
    "generate_case",
    "patient_rng",
    "render_drr",
    "line_integrals",
    "frontal_image",
    "frontal_pixel_mm",
    "to_12bit",
    "window",
]

#: Bumped whenever the same (spec, seed) would produce different pixels.
PHANTOM_VERSION = 1

HU_MIN, HU_MAX = -1024, 3071  # the range a 12-bit CT with intercept -1024 can store
_MIN_FOV_MM = (240.0, 280.0, 280.0)  # z, y, x: what the chest needs to fit the grid


def _pair(v: Any, name: str, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"PhantomSpec.{name} must be a (low, high) pair, got {v!r}.") from e
    if not (lo <= a <= b <= hi):
        raise ConfigError(
            f"PhantomSpec.{name} must satisfy {lo} <= low <= high <= {hi}, got {(a, b)}."
        )
    return (a, b)


@dataclass(frozen=True)
class PhantomSpec:
    """Every knob of the synthetic cohort. Frozen, validated when built, JSON round-trippable.

    Sizes are millimetres, attenuations Hounsfield units, ``p_*`` are probabilities.
    ``perfusion_enhancement_hu`` is exaggerated (clinically ~20-30 HU) on purpose: it is the
    CT-side signal random frozen encoders pick up in lung windows (docs/PHANTOM.md).
    """

    # grid
    shape: tuple[int, int, int] = (64, 128, 128)  # (z, y, x) voxels
    spacing_mm: tuple[float, float, float] = (5.0, 2.5, 2.5)  # (z, y, x)
    # cohort
    prevalence: float = 0.4
    # attenuation (HU)
    lung_hu: float = -850.0
    lung_hu_jitter: float = 12.0  # per-patient inspiration level, uniform in +-
    artery_hu: float = 300.0  # opacified pulmonary arteries / right heart on CTPA
    vein_hu: float = 140.0  # pulmonary veins / left heart are less dense in the arterial phase
    aorta_hu: float = 180.0
    blood_hu: float = 40.0  # unopacified blood (non-contrast twin, downstream of an occlusion)
    clot_hu: float = 40.0
    perfusion_enhancement_hu: float = 80.0
    noise_hu: tuple[float, float] = (10.0, 25.0)
    # PE findings
    max_clots: int = 3
    p_occlusive: float = 0.7  # per clot
    clot_level_weights: tuple[float, float, float] = (0.2, 0.35, 0.45)  # main/lobar/segmental
    p_westermark: float = 0.85  # given an occlusive clot
    westermark_hu: float = 180.0  # lung density drop in the oligemic territory (both phases)
    p_elevated_diaphragm: float = 0.6  # given an occlusive clot: on its side (volume loss)
    elevated_diaphragm_mm: float = 25.0
    p_hampton: float = 0.5  # per positive
    p_enlarged_pa: float = 0.6  # per positive
    p_enlarged_pa_negative: float = 0.05  # pulmonary hypertension without PE
    enlarged_pa_factor: float = 1.45
    # label-independent confounders
    p_effusion: float = 0.15
    p_consolidation: float = 0.15
    p_emphysema: float = 0.15
    p_cardiomegaly: float = 0.15
    # per-patient anatomy variation
    size_jitter: float = 0.08  # relative
    rotation_deg: float = 4.0  # axial rotation, uniform in +-
    shift_mm: float = 8.0  # in-plane shift, uniform in +-
    # radiograph (DRR)
    drr_size: int = 256  # square, pixels
    drr_photons: float = 4.0e4  # mean detector photons per pixel for an unattenuated ray
    drr_exposure: tuple[float, float] = (0.6, 1.6)  # relative exposure range
    drr_blur_px: float = 1.0  # gaussian sigma
    drr_rotation_deg: float = 3.0
    drr_shift_px: float = 8.0
    frac_monochrome1: float = 0.3

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(s) for s in self.shape)
            spacing = tuple(float(s) for s in self.spacing_mm)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"PhantomSpec.shape / spacing_mm must be three numbers, got {self.shape!r} / "
                f"{self.spacing_mm!r}."
            ) from e
        if len(shape) != 3 or any(s < 8 for s in shape):
            raise ConfigError(
                f"PhantomSpec.shape must be three sizes (z, y, x) of at least 8, got {self.shape!r}."
            )
        if len(spacing) != 3 or any(not (s > 0) for s in spacing):
            raise ConfigError(
                f"PhantomSpec.spacing_mm must be three positive sizes, got {self.spacing_mm!r}."
            )
        fov = tuple(n * s for n, s in zip(shape, spacing, strict=True))
        if any(f < m for f, m in zip(fov, _MIN_FOV_MM, strict=True)):
            sug = tuple(round(320.0 / n, 3) for n in shape)
            raise ConfigError(
                f"PhantomSpec field of view shape*spacing_mm = {tuple(round(f) for f in fov)} mm "
                f"does not hold the chest (needs at least {_MIN_FOV_MM} mm). Raise spacing_mm, "
                f"e.g. spacing_mm={sug}, or use PhantomSpec.with_shape({shape})."
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing_mm", spacing)
        for name in (
            "prevalence", "p_occlusive", "p_westermark", "p_hampton", "p_enlarged_pa",
            "p_enlarged_pa_negative", "p_elevated_diaphragm", "p_effusion", "p_consolidation", "p_emphysema",
            "p_cardiomegaly", "frac_monochrome1",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"PhantomSpec.{name} is a probability in [0, 1], got {v!r}.")
            object.__setattr__(self, name, float(v))
        for name in ("lung_hu", "artery_hu", "vein_hu", "aorta_hu", "blood_hu", "clot_hu"):
            v = float(getattr(self, name))
            if not HU_MIN <= v <= HU_MAX:
                raise ConfigError(
                    f"PhantomSpec.{name} must be a CT number in [{HU_MIN}, {HU_MAX}] HU, got {v}."
                )
            object.__setattr__(self, name, v)
        if not 0.0 <= float(self.perfusion_enhancement_hu) <= 500.0:
            raise ConfigError(
                "PhantomSpec.perfusion_enhancement_hu must be in [0, 500] HU (clinically ~20-30, "
                f"default 80), got {self.perfusion_enhancement_hu!r}."
            )
        if not 0.0 <= float(self.westermark_hu) <= 300.0:
            raise ConfigError(
                f"PhantomSpec.westermark_hu must be in [0, 300] HU, got {self.westermark_hu!r}."
            )
        object.__setattr__(self, "noise_hu", _pair(self.noise_hu, "noise_hu", 0.0, 200.0))
        object.__setattr__(
            self, "drr_exposure", _pair(self.drr_exposure, "drr_exposure", 0.05, 20.0)
        )
        if not isinstance(self.max_clots, int) or not 1 <= self.max_clots <= 6:
            raise ConfigError(f"PhantomSpec.max_clots must be an integer in [1, 6], got {self.max_clots!r}.")
        w = tuple(float(x) for x in self.clot_level_weights)
        if len(w) != 3 or any(x < 0 for x in w) or sum(w) <= 0:
            raise ConfigError(
                "PhantomSpec.clot_level_weights must be three non-negative weights (main, lobar, "
                f"segmental) with a positive sum, got {self.clot_level_weights!r}."
            )
        object.__setattr__(self, "clot_level_weights", w)
        if not 1.0 <= float(self.enlarged_pa_factor) <= 2.5:
            raise ConfigError(
                f"PhantomSpec.enlarged_pa_factor must be in [1, 2.5], got {self.enlarged_pa_factor!r}."
            )
        for name, hi in (("size_jitter", 0.3), ("lung_hu_jitter", 200.0), ("elevated_diaphragm_mm", 80.0), ("rotation_deg", 20.0), ("shift_mm", 40.0),
                         ("drr_blur_px", 10.0), ("drr_rotation_deg", 20.0), ("drr_shift_px", 64.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= float(v) <= hi:
                raise ConfigError(f"PhantomSpec.{name} must be in [0, {hi}], got {v!r}.")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.drr_size, int) or not 32 <= self.drr_size <= 4096:
            raise ConfigError(f"PhantomSpec.drr_size must be an integer in [32, 4096], got {self.drr_size!r}.")
        if not 10.0 <= float(self.drr_photons) <= 1e9:
            raise ConfigError(f"PhantomSpec.drr_photons must be in [10, 1e9], got {self.drr_photons!r}.")
        object.__setattr__(self, "drr_photons", float(self.drr_photons))

    # -- construction helpers ------------------------------------------------------------------
    @classmethod
    def with_shape(cls, shape: tuple[int, int, int], **kwargs: Any) -> PhantomSpec:
        """A spec whose spacing keeps the default 320 mm field of view at another grid shape."""
        spacing = tuple(320.0 / int(n) for n in shape)
        return cls(shape=tuple(int(n) for n in shape), spacing_mm=spacing, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhantomSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"Unknown PhantomSpec field(s) {unknown}. Valid fields: {sorted(known)}."
            )
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> PhantomSpec:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"PhantomSpec JSON is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ConfigError(f"PhantomSpec JSON must be an object, got {type(d).__name__}.")
        return cls.from_dict(d)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON plus PHANTOM_VERSION (what identifies a cohort's pixels)."""
        return hashlib.sha256(f"{PHANTOM_VERSION}:{self.to_json()}".encode()).hexdigest()


@dataclass
class PhantomCase:
    """One generated patient. ``ctpa_hu`` is integer HU, slices ordered inferior -> superior."""

    ctpa_hu: np.ndarray  # (Z, Y, X) int16 HU
    drr: np.ndarray  # (H, W) uint16 in [0, 4095], MONOCHROME2 sense (bright = dense)
    label_pe: int
    findings: dict[str, Any]  # n_clots, occlusive, westermark, ..., effusion, ...
    truth: dict[str, Any] = field(default_factory=dict)  # slice indices, clot centres (mm)


def patient_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of patient ``index`` in cohort ``seed`` (independent of cohort size)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """Map HU to [0, 1] with a display window (e.g. W400/L40 mediastinum, W1500/L-600 lung)."""
    lo = level - width / 2.0
    return np.clip((np.asarray(hu, np.float32) - lo) / float(width), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------


class _Grid:
    """World coordinates (mm, LPS) of the voxel centres, kept separable to save memory."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = spacing
        nz, ny, nx = shape
        sz, sy, sx = spacing
        self.z = ((np.arange(nz) - (nz - 1) / 2.0) * sz).astype(np.float32)  # (Z,)
        self.y = ((np.arange(ny) - (ny - 1) / 2.0) * sy).astype(np.float32)  # (Y,)
        self.x = ((np.arange(nx) - (nx - 1) / 2.0) * sx).astype(np.float32)  # (X,)

    def index_of(self, p: np.ndarray) -> np.ndarray:
        """Fractional voxel index (z, y, x) of world point(s) given as (..., 3) in (x, y, z)."""
        p = np.asarray(p, np.float64)
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        return np.stack(
            [p[..., 2] / sz + (nz - 1) / 2.0, p[..., 1] / sy + (ny - 1) / 2.0,
             p[..., 0] / sx + (nx - 1) / 2.0], axis=-1,
        )


@dataclass
class _Pose:
    """Per-patient rigid-ish transform: phantom (mm) -> world (mm)."""

    scale_xy: float
    scale_z: float
    angle: float  # radians, rotation about z
    shift: np.ndarray  # (2,) x, y in mm

    def to_world(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.float64)  # (..., 3) x, y, z in phantom mm
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = p[..., 0] * self.scale_xy, p[..., 1] * self.scale_xy
        return np.stack(
            [c * x - s * y + self.shift[0], s * x + c * y + self.shift[1], p[..., 2] * self.scale_z],
            axis=-1,
        )

    def phantom_xy(self, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
        """Phantom-frame x, y of every in-plane voxel: two (Y, X) arrays."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        wx = grid.x[None, :] - np.float32(self.shift[0])  # (1, X)
        wy = grid.y[:, None] - np.float32(self.shift[1])  # (Y, 1)
        px = (c * wx + s * wy) / self.scale_xy  # (Y, X) inverse rotation
        py = (-s * wx + c * wy) / self.scale_xy
        return px.astype(np.float32), py.astype(np.float32)

    def phantom_z(self, grid: _Grid) -> np.ndarray:
        return (grid.z / self.scale_z).astype(np.float32)  # (Z,)


@dataclass
class _Segment:
    p0: np.ndarray  # (3,) world x, y, z mm
    p1: np.ndarray
    r0: float
    r1: float
    kind: str  # "artery" | "vein" | "aorta"
    level: int  # 0 main PA, 1 left/right PA, 2 lobar, 3 segmental, 4+ subsegmental
    node: int  # index into the tree's node list (arteries) or -1
    parent: int = -1
    leaves: tuple[int, ...] = ()  # territory leaf ids supplied by this branch


def _segment_mask(
    grid: _Grid, seg: _Segment, radius_scale: float = 1.0, t_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray] | None:
    """Voxels within a tapered tube around a segment: (bbox slices, mask, t along the segment).

    The z distance is halved so thin vessels stay continuous across 5 mm slices (a thick slice
    averages along z; halving approximates that without a supersampled raster).
    """
    r = max(seg.r0, seg.r1) * radius_scale
    lo = np.minimum(seg.p0, seg.p1) - r
    hi = np.maximum(seg.p0, seg.p1) + r
    ilo = np.floor(grid.index_of(lo[None])[0]).astype(int)
    ihi = np.ceil(grid.index_of(hi[None])[0]).astype(int) + 1
    ilo[0] -= 1  # z distance is halved below, so the box reaches one slice further
    ihi[0] += 1
    ilo = np.maximum(ilo, 0)
    ihi = np.minimum(ihi, np.array(grid.shape))
    if np.any(ihi <= ilo):
        return None
    sl = (slice(ilo[0], ihi[0]), slice(ilo[1], ihi[1]), slice(ilo[2], ihi[2]))
    z = grid.z[sl[0]][:, None, None] - np.float32(seg.p0[2])  # (z, 1, 1)
    y = grid.y[sl[1]][None, :, None] - np.float32(seg.p0[1])  # (1, y, 1)
    x = grid.x[sl[2]][None, None, :] - np.float32(seg.p0[0])  # (1, 1, x)
    d = (seg.p1 - seg.p0).astype(np.float32)
    dd = float(d @ d) or 1e-6
    t = np.clip((x * d[0] + y * d[1] + z * d[2]) / dd, 0.0, 1.0)  # (z, y, x)
    ex, ey, ez = x - t * d[0], y - t * d[1], (z - t * d[2]) * 0.5
    dist2 = ex * ex + ey * ey + ez * ez
    rad = (seg.r0 + t * (seg.r1 - seg.r0)) * radius_scale
    mask = (dist2 <= rad * rad) & (t >= t_range[0]) & (t <= t_range[1])
    return sl, mask, t


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / (np.linalg.norm(v) + 1e-9)


def _grow_tree(
    rng: np.random.Generator,
    root: np.ndarray,
    points: np.ndarray,
    *,
    kind: str,
    radii: tuple[float, ...],
    splits: tuple[int, ...],
    first_level: int,
    parent: int,
    segments: list[_Segment],
    leaf_centres: list[np.ndarray],
    reach: float,
) -> list[int]:
    """Grow a branching tree from ``root`` by recursive median splits of lung sample points.

    Each branch heads for the centroid of the lung points it supplies, so the partition of the
    points doubles as the perfusion territory of each branch. Returns the leaf ids supplied.
    """
    centroid = points.mean(axis=0)
    depth = len(radii) - 1
    end = root + reach * (centroid - root)
    seg = _Segment(p0=root, p1=end, r0=radii[0], r1=radii[0] * 0.85, kind=kind,
                   level=first_level, node=len(segments), parent=parent)
    segments.append(seg)
    me = seg.node
    if depth == 0 or len(points) < 8:
        leaf_centres.append(centroid)
        seg.leaves = (len(leaf_centres) - 1,)
        return list(seg.leaves)
    k = splits[0]
    # split direction: the points' main axis, tilted randomly so trees differ between patients
    cov = np.cov((points - centroid).T)
    _, vecs = np.linalg.eigh(cov)
    axis = vecs[:, -1] + 0.5 * _random_unit(rng)
    proj = (points - centroid) @ axis
    order = np.argsort(proj)
    parts = np.array_split(order, k)
    leaves: list[int] = []
    for part in parts:
        leaves += _grow_tree(
            rng, end, points[part], kind=kind, radii=radii[1:], splits=splits[1:],
            first_level=first_level + 1, parent=me, segments=segments,
            leaf_centres=leaf_centres, reach=min(0.85, reach + 0.15),
        )
    seg.leaves = tuple(leaves)
    return leaves


def _subtree(segments: list[_Segment], node: int) -> list[int]:
    out = [node]
    i = 0
    while i < len(out):
        out += [s.node for s in segments if s.parent == out[i] and s.kind == segments[node].kind]
        i += 1
    return out


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------


def generate_case(spec: PhantomSpec, rng: np.random.Generator) -> PhantomCase:
    """Draw one patient: CTPA HU volume, DRR of its non-contrast twin, label and findings."""
    grid = _Grid(spec.shape, spec.spacing_mm)
    nz, ny, nx = spec.shape

    # -- patient-level draws (fixed order: keep it that way for reproducibility) ---------------
    label = int(rng.random() < spec.prevalence)
    j = spec.size_jitter
    pose = _Pose(
        scale_xy=float(1.0 + rng.uniform(-j, j)),
        scale_z=float(1.0 + rng.uniform(-j, j) * 0.6),
        angle=math.radians(float(rng.uniform(-spec.rotation_deg, spec.rotation_deg))),
        shift=rng.uniform(-spec.shift_mm, spec.shift_mm, size=2),
    )
    body_a = 155.0 * (1.0 + rng.uniform(-0.06, 0.06))
    body_b = 112.0 * (1.0 + rng.uniform(-0.08, 0.08))
    fat_mm = float(rng.uniform(8.0, 22.0))
    lung_base = spec.lung_hu + float(rng.uniform(-spec.lung_hu_jitter, spec.lung_hu_jitter))
    enhance = spec.perfusion_enhancement_hu * float(rng.uniform(0.85, 1.15))
    noise_sd = float(rng.uniform(*spec.noise_hu))
    flags = {
        "effusion": bool(rng.random() < spec.p_effusion),
        "consolidation": bool(rng.random() < spec.p_consolidation),
        "emphysema": bool(rng.random() < spec.p_emphysema),
        "cardiomegaly": bool(rng.random() < spec.p_cardiomegaly),
    }
    effusion_side = int(rng.integers(0, 3))  # 0 right, 1 left, 2 both
    heart_scale = float(rng.uniform(1.25, 1.4)) if flags["cardiomegaly"] else float(
        rng.uniform(0.92, 1.05)
    )

    # -- phantom-frame coordinates --------------------------------------------------------------
    px, py = pose.phantom_xy(grid)  # (Y, X) each
    pz = pose.phantom_z(grid)  # (Z,)
    Z = pz[:, None, None]  # (Z, 1, 1)
    PX, PY = px[None], py[None]  # (1, Y, X)

    taper = 1.0 - 0.18 * np.clip((Z - 40.0) / 120.0, 0.0, 1.0)  # narrower towards the apex
    er = ((PX / (body_a * taper)) ** 2 + ((PY - 5.0) / (body_b * taper)) ** 2)  # (Z, Y, X)
    body = er <= 1.0
    inner = ((PX / (body_a * taper - fat_mm)) ** 2
             + ((PY - 5.0) / (body_b * taper - fat_mm)) ** 2) <= 1.0

    # lungs: ellipsoids carved by the diaphragm domes, the mediastinum and the heart
    lungs = np.zeros(spec.shape, bool)
    side_of = np.zeros(spec.shape, np.int8)  # 1 right lung, 2 left lung
    for side, cx in ((1, -72.0), (2, 76.0)):
        ax, ay, az = 58.0, 78.0, 140.0
        cz = 12.0
        rxy = ((PX - cx) / ax) ** 2 + ((PY - 8.0) / ay) ** 2  # (1, Y, X)
        ell = rxy + ((Z - cz) / az) ** 2 <= 1.0
        dome = -92.0 + 45.0 * np.clip(1.0 - rxy, 0.0, 1.0) + (12.0 if side == 1 else 0.0)
        m = ell & (Z > dome) & inner
        lungs |= m
        side_of[m] = side
    hc = np.array([18.0, -28.0, -52.0])
    ha = np.array([58.0, 48.0, 55.0]) * heart_scale
    heart_r = ((PX - hc[0]) / ha[0]) ** 2 + ((PY - hc[1]) / ha[1]) ** 2 + ((Z - hc[2]) / ha[2]) ** 2
    heart = heart_r <= 1.0
    mediastinum = (np.abs(PX - 5.0) < 28.0) & (PY < 70.0) & (Z > -20.0)
    lungs &= ~heart & ~mediastinum
    side_of[~lungs] = 0

    # -- vessel trees -----------------------------------------------------------------------------
    segments: list[_Segment] = []
    leaf_centres: list[np.ndarray] = []
    w = pose.to_world
    enlarged = bool(rng.random() < (spec.p_enlarged_pa if label else spec.p_enlarged_pa_negative))
    pa_r = 13.0 * (spec.enlarged_pa_factor if enlarged else 1.0)
    main = _Segment(w([2.0, -48.0, -15.0]), w([10.0, -18.0, 38.0]), pa_r, pa_r * 0.95,
                    "artery", 0, 0)
    segments.append(main)
    lung_idx = np.flatnonzero(lungs.ravel())
    coords_all = None
    for side, hilum in ((1, [-52.0, 2.0, 28.0]), (2, [54.0, 6.0, 34.0])):
        # left/right PA from the bifurcation to the hilum, then the lung tree
        pa = _Segment(main.p1, w(hilum), 10.0 * (1.2 if enlarged else 1.0), 9.0, "artery", 1,
                      len(segments), parent=0)
        segments.append(pa)
        idx = lung_idx[side_of.ravel()[lung_idx] == side]
        pick = rng.choice(idx, size=min(1500, idx.size), replace=False) if idx.size else idx
        kz, ky, kx = np.unravel_index(pick, spec.shape)
        pts = np.stack([grid.x[kx], grid.y[ky], grid.z[kz]], axis=1).astype(np.float64)
        first_leaf = len(leaf_centres)
        sub = _grow_tree(rng, pa.p1, pts, kind="artery", radii=(6.5, 4.2, 2.8, 1.9),
                         splits=(2, 3, 2), first_level=2, parent=pa.node, segments=segments,
                         leaf_centres=leaf_centres, reach=0.45)
        pa.leaves = tuple(range(first_leaf, first_leaf + len(sub)))
        main.leaves = main.leaves + pa.leaves
        coords_all = pts if coords_all is None else np.concatenate([coords_all, pts])
    n_art = len(segments)
    vein_leaves: list[np.ndarray] = []
    for la in ([22.0, 22.0, -42.0],):
        for side, hil in ((1, [-45.0, 25.0, -18.0]), (2, [48.0, 28.0, -15.0])):
            sel = coords_all[(coords_all[:, 0] < 0) if side == 1 else (coords_all[:, 0] >= 0)]
            v = _Segment(w(la), w(hil), 8.0, 7.0, "vein", 1, len(segments), parent=-1)
            segments.append(v)
            _grow_tree(rng, v.p1, sel, kind="vein", radii=(5.5, 3.6, 2.4), splits=(3, 2),
                       first_level=2, parent=v.node, segments=segments,
                       leaf_centres=vein_leaves, reach=0.5)
    aorta_pts = [w(p) for p in ([18.0, -20.0, -30.0], [8.0, -28.0, 45.0], [10.0, 10.0, 78.0],
                                [24.0, 52.0, 62.0], [26.0, 58.0, -170.0])]
    for a, b, r0, r1 in zip(aorta_pts[:-1], aorta_pts[1:], (15, 14, 13, 12), (14, 13, 12, 11),
                            strict=True):
        segments.append(_Segment(a, b, float(r0), float(r1), "aorta", -1, len(segments)))

    # territories: each lung voxel belongs to the nearest artery leaf centroid
    leaf_xyz = np.asarray(leaf_centres, np.float32)  # (L, 3)
    kz, ky, kx = np.unravel_index(lung_idx, spec.shape)
    lx, ly, lz = grid.x[kx], grid.y[ky], grid.z[kz]  # (N,) each
    d2 = ((lx[:, None] - leaf_xyz[None, :, 0]) ** 2 + (ly[:, None] - leaf_xyz[None, :, 1]) ** 2
          + (lz[:, None] - leaf_xyz[None, :, 2]) ** 2)  # (N, L)
    territory = np.full(spec.shape, -1, np.int16)
    territory.ravel()[lung_idx] = np.argmin(d2, axis=1).astype(np.int16)

    # -- PE findings -------------------------------------------------------------------------------
    n_clots = int(rng.integers(1, spec.max_clots + 1)) if label else 0
    level_w = np.asarray(spec.clot_level_weights) / sum(spec.clot_level_weights)
    clots: list[dict[str, Any]] = []
    for _ in range(n_clots):
        level = int(rng.choice([1, 2, 3], p=level_w))
        cands = [s.node for s in segments[:n_art] if s.level == level]
        node = int(rng.choice(cands))
        occl = bool(rng.random() < spec.p_occlusive)
        t0 = float(rng.uniform(0.25, 0.55))
        t1 = min(1.0, t0 + float(rng.uniform(0.25, 0.45)))
        clots.append({"node": node, "level": level, "occlusive": occl, "t": (t0, t1)})
    occluded_nodes: set[int] = set()
    defect_leaves: set[int] = set()
    for c in clots:
        if c["occlusive"]:
            occluded_nodes.update(_subtree(segments, c["node"]))
            defect_leaves.update(segments[c["node"]].leaves)
    westermark = bool(occluded_nodes) and bool(rng.random() < spec.p_westermark)
    hampton = bool(label) and bool(rng.random() < spec.p_hampton)
    elevated = bool(occluded_nodes) and bool(rng.random() < spec.p_elevated_diaphragm)
    hampton_leaf = -1
    if hampton:
        pool = sorted(defect_leaves) or sorted({lf for c in clots for lf in segments[c["node"]].leaves})
        hampton_leaf = int(rng.choice(pool))

    # -- assemble the non-contrast twin and the CTPA ------------------------------------------
    nc = np.full(spec.shape, -1000.0, np.float32)  # air
    nc[body] = -100.0  # subcutaneous fat
    nc[inner] = 40.0  # muscle / mediastinal soft tissue
    abdomen = inner & ~lungs & (Z < -70.0) & ~heart
    liver = abdomen & (PX < 30.0)
    nc[liver] = 60.0
    lung_nc = np.float32(lung_base)
    nc[lungs] = lung_nc
    enh = np.where(lungs, np.float32(enhance), np.float32(0.0))  # (Z, Y, X) CTPA parenchyma
    if flags["emphysema"]:
        emph = lungs & (Z > 20.0)
        nc[emph] -= 60.0
        enh[emph] *= 0.5  # destroyed capillary bed enhances less
    if defect_leaves:
        defect = np.isin(territory, np.fromiter(defect_leaves, np.int16))  # (Z, Y, X)
        enh[defect] = 0.0  # perfusion defect: parenchyma stays unenhanced
        if westermark:
            nc[defect] -= np.float32(spec.westermark_hu)  # oligemia: less blood in the lung
    nc[lungs] = np.maximum(nc[lungs], -980.0)  # stacked lucencies stay lung, never air
    ct = nc + enh

    # heart: myocardium shell, right heart opacified, left heart less so on CTPA
    hin = heart_r <= 0.72
    nc[heart] = 40.0
    ct[heart] = 40.0
    right = hin & (PX < hc[0] - 5.0)
    ct[right] = spec.artery_hu
    ct[hin & ~right] = spec.vein_hu
    nc[hin] = spec.blood_hu

    # vessels: paint in order aorta -> veins -> arteries so arteries win where they cross
    order = [s for s in segments if s.kind == "aorta"] + [s for s in segments if s.kind == "vein"] \
        + segments[:n_art]
    for s in order:
        rs = 0.55 if (westermark and s.node in occluded_nodes and s.kind == "artery") else 1.0
        got = _segment_mask(grid, s, radius_scale=rs)
        if got is None:
            continue
        sl, m, _ = got
        blood_ct = {"aorta": spec.aorta_hu, "vein": spec.vein_hu, "artery": spec.artery_hu}[s.kind]
        if s.kind == "artery" and s.node in occluded_nodes:
            blood_ct = spec.blood_hu  # no contrast beyond an occlusion
        nc[sl][m] = spec.blood_hu
        ct[sl][m] = blood_ct
    # the part of an occluded branch proximal to its clot is still opacified
    for c in clots:
        if c["occlusive"]:
            got = _segment_mask(grid, segments[c["node"]], t_range=(0.0, c["t"][0]))
            if got is not None:
                sl, m, _ = got
                ct[sl][m] = spec.artery_hu
    # clots: filling defects (occlusive fill the lumen; others leave a contrast rim)
    clot_info = []
    for c in clots:
        s = segments[c["node"]]
        got = _segment_mask(grid, s, radius_scale=1.0 if c["occlusive"] else 0.6, t_range=c["t"])
        tm = 0.5 * (c["t"][0] + c["t"][1])
        centre = s.p0 + tm * (s.p1 - s.p0)
        if got is not None:
            sl, m, _ = got
            ct[sl][m] = spec.clot_hu
            nc[sl][m] = spec.clot_hu
        clot_info.append({"level": c["level"], "occlusive": c["occlusive"],
                          "centre_mm": [round(float(v), 2) for v in centre],
                          "slice": int(np.clip(round(grid.index_of(centre[None])[0, 0]), 0, nz - 1))})

    # infarct wedge (Hampton hump): the peripheral part of one affected territory
    if hampton_leaf >= 0:
        terr = territory == hampton_leaf
        hil = segments[1].p1 if leaf_xyz[hampton_leaf, 0] < 0 else segments[2].p1
        dist = np.sqrt((grid.x[None, None, :] - hil[0]) ** 2 + (grid.y[None, :, None] - hil[1]) ** 2
                       + (grid.z[:, None, None] - hil[2]) ** 2)  # (Z, Y, X)
        dmax = float(dist[terr].max()) if terr.any() else 0.0
        wedge = terr & (dist > 0.55 * dmax)
        nc[wedge] = -20.0
        ct[wedge] = -20.0

    # elevated hemidiaphragm on the side of the first occlusive clot (volume loss)
    if elevated:
        first = next(c for c in clots if c["occlusive"])
        side = 1 if segments[first["node"]].p1[0] < 0 else 2
        cx = -72.0 if side == 1 else 76.0
        rxy = ((PX - cx) / 58.0) ** 2 + ((PY - 8.0) / 78.0) ** 2
        dome = -92.0 + 45.0 * np.clip(1.0 - rxy, 0.0, 1.0) + (12.0 if side == 1 else 0.0)
        up = (side_of == side) & (Z < dome + spec.elevated_diaphragm_mm)
        nc[up] = 50.0
        ct[up] = 50.0
        side_of[up] = 0

    # confounders (label independent)
    conf_slice = None
    if flags["consolidation"]:
        c0 = lung_idx[int(rng.integers(0, lung_idx.size))]
        cz_, cy_, cx_ = np.unravel_index(c0, spec.shape)
        rad = float(rng.uniform(18.0, 32.0))
        blob = lungs & (((grid.z[:, None, None] - grid.z[cz_]) / 1.0) ** 2
                        + (grid.y[None, :, None] - grid.y[cy_]) ** 2
                        + (grid.x[None, None, :] - grid.x[cx_]) ** 2 <= rad * rad)
        nc[blob] = 30.0
        ct[blob] = 70.0  # consolidated lung enhances
        conf_slice = int(cz_)
    if flags["effusion"]:
        depth = float(rng.uniform(25.0, 55.0))
        sides = (1, 2) if effusion_side == 2 else (effusion_side + 1,)
        post = PY > (95.0 * taper - depth)  # dependent (posterior) part of the chest
        low = Z < float(rng.uniform(-20.0, 30.0))
        eff = np.isin(side_of, sides) & post & low
        nc[eff] = 15.0
        ct[eff] = 15.0

    # bones last: spine, ribs, sternum
    spine_r = PX ** 2 + (PY - 82.0) ** 2  # (1, Y, X)
    disc = (np.mod(Z + 7.0, 28.0) < 6.0)
    vb = (spine_r <= 17.0 ** 2) & np.ones_like(Z, bool)
    nc[vb & ~disc] = 320.0
    nc[vb & disc] = 80.0
    post_el = ((PX ** 2 + (PY - 108.0) ** 2) <= 18.0 ** 2) & ((PX ** 2 + (PY - 108.0) ** 2) > 8.0 ** 2)
    nc[np.broadcast_to(post_el, spec.shape) & inner] = 600.0
    rib_phase = np.mod(Z + 28.0 * (PY / body_b) + 11.0, 26.0)  # ribs slope down anteriorly
    a_in = body_a * taper - fat_mm
    b_in = body_b * taper - fat_mm
    ri = (PX / a_in) ** 2 + ((PY - 5.0) / b_in) ** 2
    ribs = (ri <= 1.0) & (ri >= 0.80) & (rib_phase < 9.0) & (Z > -110.0) & (np.abs(PX) > 18.0)
    nc[ribs] = 650.0
    sternum = (np.abs(PX) < 14.0) & (PY > -body_b * taper + fat_mm - 2.0) \
        & (PY < -body_b * taper + fat_mm + 12.0) & (Z > -60.0) & (Z < 120.0)
    nc[sternum] = 420.0
    bones = (vb | np.broadcast_to(post_el, spec.shape) & inner) | ribs | sternum
    ct[bones] = nc[bones]
    ct[~body] = -1000.0
    nc[~body] = -1000.0

    # CT noise (quantum noise of the CTPA only; the twin is only projected)
    noise = rng.normal(0.0, noise_sd, size=spec.shape).astype(np.float32)
    ct_hu = np.clip(np.rint(ct + noise), HU_MIN, HU_MAX).astype(np.int16)  # (Z, Y, X)

    drr = render_drr(nc, spec, rng)

    defect_frac = float(np.isin(territory[lungs], list(defect_leaves)).mean()) if defect_leaves else 0.0
    # the slice that best shows the finding: the largest defect, else the first clot, else a mid slice
    if defect_leaves:
        dz = np.isin(territory, list(defect_leaves)).sum(axis=(1, 2))
        focus = int(np.argmax(dz))
    elif clot_info:
        focus = clot_info[0]["slice"]
    elif conf_slice is not None:
        focus = conf_slice
    else:
        focus = int(round(nz * 0.6))
    findings = {
        "n_clots": n_clots,
        "occlusive": bool(defect_leaves),
        "westermark": westermark,
        "hampton_hump": hampton,
        "enlarged_pa": enlarged,
        "elevated_diaphragm": elevated,
        **flags,
    }
    truth = {
        "clots": clot_info,
        "focus_slice": focus,
        "defect_fraction": round(defect_frac, 4),
        "noise_hu": round(noise_sd, 2),
        "lung_hu": round(lung_base, 1),
        "perfusion_enhancement_hu": round(enhance, 1),
    }
    return PhantomCase(ctpa_hu=ct_hu, drr=drr, label_pe=label, findings=findings, truth=truth)


def render_drr(hu: np.ndarray, spec: PhantomSpec, rng: np.random.Generator) -> np.ndarray:
    """PA radiograph of a HU volume: line integrals along y, Poisson detector, blur, 12 bits.

    Returns (drr_size, drr_size) uint16 in display orientation (top = superior, image left =
    patient right), MONOCHROME2 sense (bright = attenuating). The noise-free projection is
    shared with ``embedstore.drr`` (DRRs of real CT): ``line_integrals`` + ``frontal_image``.
    """
    sz, sy, sx = spec.spacing_mm
    nz, ny, nx = hu.shape
    line = line_integrals(hu, 1, sy)  # (Z, X) line integral along anterior-posterior
    n = spec.drr_size
    px = frontal_pixel_mm(nz, nx, sz, sx, n)
    ang = math.radians(float(rng.uniform(-spec.drr_rotation_deg, spec.drr_rotation_deg)))
    shift = rng.uniform(-spec.drr_shift_px, spec.drr_shift_px, size=2) * px  # (2,) mm
    exposure = float(rng.uniform(*spec.drr_exposure))
    gain = float(rng.uniform(0.9, 1.1))
    offset = float(rng.uniform(-60.0, 60.0))
    proj = frontal_image(line, sz, sx, n, angle=ang, shift_mm=(shift[0], shift[1]))  # (n, n)
    expected = spec.drr_photons * exposure * np.exp(-proj)
    counts = rng.poisson(expected).astype(np.float64)
    atten = -np.log(np.maximum(counts, 0.5) / (spec.drr_photons * exposure))
    if spec.drr_blur_px > 0:
        atten = ndimage.gaussian_filter(atten, spec.drr_blur_px)
    return to_12bit(atten, gain=gain, offset=offset)
