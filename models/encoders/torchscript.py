"""``torchscript`` family: a user's own network, saved as TorchScript or a ``torch.export`` program.

For example a trained CTPA PE teacher without its final layer. ``spec.weights`` is the file
(``.pt2`` -> ``torch.export.load``; anything else -> ``torch.jit.load``); params::

    input_kind  "image" (takes (B,1,H,W) in [0,1], or (B,3,H,W) inside volume25d) or
                "volume" (takes (B,S,H,W) in HU); the program does its own normalisation
    embed_dim   what the program returns per item: output must be (B, embed_dim)
    input_size  [H, W] or [S, H, W] the program expects (what preprocessing should produce)

An exported program whose batch size was not marked dynamic at export time is run in chunks
of its fixed batch size (the last chunk padded by repeating the last item).
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from embedstore.models.encoders.openclip import check_image_batch
from embedstore.models.encoders.registry import EncoderSpec, FrozenEncoder, _thaw, register_family
from embedstore.models.errors import EncoderError
from torch import nn

__all__ = ["ScriptedEncoder", "load_program"]

_PARAMS = ("input_kind", "embed_dim", "input_size")


def _static_batch(ep: torch.export.ExportedProgram) -> int | None:
    """The exported batch size if dimension 0 of the first user input is a fixed int."""
    user = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape") or len(val.shape) == 0:
                return None
            n = val.shape[0]
            return int(n) if isinstance(n, int) else None
    return None


def load_program(path: str, *, what: str) -> tuple[nn.Module, int | None]:
    """Load a TorchScript file or a ``.pt2`` exported program on CPU -> (module, fixed batch)."""
    p = Path(path)
    if not p.is_file():
        raise EncoderError(
            f"{what}: program file {path!r} does not exist. Save one with torch.export.save "
            "(.pt2) or torch.jit.save (.pt).",
            reason="weights_not_found",
        )
    kind = "torch.export program" if p.suffix == ".pt2" else "TorchScript module"
    if not zipfile.is_zipfile(p):  # both formats are zip archives; spare the user torch's traceback
        raise EncoderError(
            f"{what}: {path!r} is not a {kind} (not a zip archive). Use a .pt2 from "
            "torch.export.save or a .pt from torch.jit.save.",
            reason="weights_unreadable",
        )
    try:
        if p.suffix == ".pt2":
            ep = torch.export.load(str(p))
            return ep.module(), _static_batch(ep)
        with warnings.catch_warnings():
            # torch >= 2.10 deprecates TorchScript; loading a user's existing file is still fine.
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
            return torch.jit.load(str(p), map_location="cpu"), None
    except Exception as e:  # jit/export raise RuntimeError, ValueError, zipfile errors ...
        raise EncoderError(
            f"{what}: cannot load {path!r} as a {kind} "
            f"({type(e).__name__}: {str(e)[:200]}). Use a .pt2 from torch.export.save or a "
            ".pt from torch.jit.save.",
            reason="weights_unreadable",
        ) from e


class ScriptedEncoder(FrozenEncoder):
    """A loaded TorchScript / exported program behind the image or volume contract."""

    def __init__(self, spec: EncoderSpec, module: nn.Module, fixed_batch: int | None):
        p = spec.params
        super().__init__(spec, embed_dim=int(p["embed_dim"]), input_kind=str(p["input_kind"]),
                         input_size=tuple(p["input_size"]))
        self.module = module
        self.fixed_batch = fixed_batch

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        n = self.fixed_batch
        if n is None or x.shape[0] == n:
            return self.module(x)
        outs = []
        for i in range(0, x.shape[0], n):
            part = x[i:i + n]  # (<=n, ...)
            k = part.shape[0]
            if k < n:  # pad with copies of the last item to the exported batch size
                part = torch.cat([part, part[-1:].expand(n - k, *part.shape[1:])])
            outs.append(self.module(part)[:k])
        return torch.cat(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_kind == "image":
            check_image_batch(x, self.spec.name)
        elif not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise EncoderError(
                f"Encoder {self.spec.name!r} takes CT volumes (B, S, H, W) in HU; got {shape}.",
                reason="bad_input",
            )
        try:
            y = self._run(x if x.is_floating_point() else x.float())
        except (RuntimeError, AssertionError, ValueError) as e:
            raise EncoderError(
                f"Encoder {self.spec.name!r}: the user program failed on input "
                f"{tuple(x.shape)} {x.dtype} ({type(e).__name__}: {str(e)[:200]}). Check "
                "params['input_size'] and, for torch.export, export with a dynamic batch dim.",
                reason="program_failed",
            ) from e
        if isinstance(y, (tuple, list)):
            y = y[0]
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (x.shape[0], self.embed_dim):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise EncoderError(
                f"Encoder {self.spec.name!r}: the program returned {got}, expected "
                f"({x.shape[0]}, {self.embed_dim}). Set params['embed_dim'] to its output width, "
                "or export the network without its final layer so it returns (B, D).",
                reason="bad_output",
            )
        return y.float()  # (B, D)


def _validate(params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - set(_PARAMS))
    missing = [k for k in _PARAMS if k not in params]
    if unknown or missing:
        raise EncoderError(
            f"torchscript encoder: unknown params {unknown}, missing {missing}. "
            f"Needs: {', '.join(_PARAMS)}.",
            reason="bad_spec",
        )
    kind = params["input_kind"]
    if kind not in ("image", "volume"):
        raise EncoderError(
            f"torchscript encoder: input_kind {kind!r} is invalid; use 'image' or 'volume'.",
            reason="bad_spec",
        )
    dim = params["embed_dim"]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise EncoderError(f"torchscript encoder: embed_dim must be an int >= 1, got {dim!r}.",
                           reason="bad_spec")
    size = params["input_size"]
    want = 2 if kind == "image" else 3
    if not (isinstance(size, Sequence) and len(size) == want
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise EncoderError(
            f"torchscript encoder: input_size {_thaw(size)!r} must be {want} positive ints "
            f"({'[H, W]' if want == 2 else '[S, H, W]'}) for input_kind {kind!r}.",
            reason="bad_spec",
        )


def _build(spec: EncoderSpec) -> ScriptedEncoder:
    if spec.weights is None:
        raise EncoderError(
            f"Encoder {spec.name!r} (torchscript) needs its program file: pass weights='model.pt2' "
            "(torch.export.save) or weights='model.pt' (torch.jit.save).",
            reason="weights_not_found",
        )
    module, fixed = load_program(spec.weights, what=f"Encoder {spec.name!r}")
    return ScriptedEncoder(spec, module, fixed)


register_family(
    "torchscript",
    _build,
    validate=_validate,
    description="a user network saved with torch.export (.pt2) or TorchScript (.pt)",
)
