"""One conformance case = one safetensors file: inputs, parameters, the oracle's expected
outputs, and three strings in the header (`spec`, `case`, `checksum`). Any safetensors reader
can open the files; moe_min reads them with NumPy alone (moe_min/tensorio.py), and refuses a
file whose checksum or tolerances say it was edited by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_min.inputs import check_layer_inputs
from moe_min.spec import from_dict, from_json
from moe_min.tensorio import load_safetensors, save_safetensors

CASES_DIR = Path(__file__).parent / "cases"
# The loosest [rtol, atol] a case may carry, per scheme and kind of quantity; a looser case is
# refused on load. Decisions (plans, targets, stats) are exact. Values and gradients: the
# float32 room of docs/new-backend.md ("What the tolerances mean"), the same for every scheme
# today. On MLX CPU the worst element uses 0.8 % of it (values, MoD y), 4.1 % (gradients,
# Soft MoE x).
_FLOAT32_ROOM = {"exact": (0.0, 0.0), "value": (2e-4, 2e-5), "grad": (2e-3, 2e-4)}
TOLERANCE_BOUNDS = {scheme: _FLOAT32_ROOM for scheme in
                    ("token_choice", "expert_choice", "soft_moe", "mixture_of_depths")}


def quantity_kind(key: str) -> str:
    """"exact", "grad" or "value": the row of TOLERANCE_BOUNDS an expected quantity falls in."""
    if key in ("plan/slot_token", "predictor/targets") or key.startswith("stats/"):
        return "exact"
    return "grad" if key.startswith("grad/") else "value"


def checksum(spec_json: str, case_json: str, tensors: dict) -> str:
    """sha256 over the header's two JSON strings and every tensor's name, dtype, shape and
    little-endian bytes: any edit of an expected value, a tolerance or an input changes it."""
    digest = hashlib.sha256(f"{spec_json}\0{case_json}\0".encode())
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode() + array.tobytes())
    return digest.hexdigest()


@dataclass
class Case:
    """A conformance case: the spec, its metadata (`name`, `scheme`, `mode`, `seed`, `why`,
    `expert`, `block`, `tolerance`, `version`) and the tensors by their namespaced key."""

    spec: object
    meta: dict
    tensors: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if
                k.startswith(prefix + "/")}

    @property
    def expert(self):
        return from_dict(self.meta["expert"]) if self.meta.get("expert") else None

    @property
    def block(self):
        if not self.meta.get("block"):
            return None
        return {**self.meta["block"], "mlp": from_dict(self.meta["block"]["mlp"])}

    def save(self, path: Path):
        """Write the case with a fresh checksum (after an edit made on purpose, say)."""
        spec_json, case_json = self.spec.to_json(), json.dumps(self.meta, sort_keys=True)
        save_safetensors(path, self.tensors, {"spec": spec_json, "case": case_json,
                                              "checksum": checksum(spec_json, case_json,
                                                                   self.tensors)})


def read_case(path: Path) -> Case:
    """Load a case, checked whole before it runs: a file edited after generation (checksum),
    a tolerance looser than TOLERANCE_BOUNDS or any other defect is one ValueError naming it."""
    path = Path(path)
    tensors, metadata = load_safetensors(path)
    if not isinstance(metadata.get("spec"), str) or not isinstance(metadata.get("case"), str):
        raise ValueError(f"{path}: not a conformance case (no 'spec'/'case' in its metadata)")
    if metadata.get("checksum") != checksum(metadata["spec"], metadata["case"], tensors):
        raise ValueError(f"case {path.stem}: checksum mismatch in {path}: its expected values, "
                         "tolerances or inputs were edited after generation (regenerate with "
                         "python -m moe_min.conformance.generate)")
    try:
        case = Case(from_json(metadata["spec"]), json.loads(metadata["case"]), tensors)
        _check(case)
        _ = case.expert, case.block  # their specs, validated when they parse
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: bad case ({type(e).__name__}: {e})") from None
    _check_tolerances(case, path.stem)
    return case


def _check(case: Case) -> None:
    meta, expects = case.meta, [k for k in case.tensors if k.startswith("expect/")]
    if not isinstance(meta, dict) or meta.get("mode") not in ("train", "eval", "causal"):
        raise ValueError("its 'case' metadata needs a mode of train, eval or causal")
    needed = ["input/x"] + (["input/cotangent"] if any(k.startswith("expect/grad/")
                                                       for k in expects) else [])
    missing = [k for k in needed if k not in case.tensors]
    if missing or not isinstance(meta.get("name"), str):
        raise ValueError(f"missing {missing or 'name'}: a case has input/x (and input/cotangent "
                         "with gradients) and a name")
    # the layer's own input checks, on the file's arrays: a defect of the file is its error,
    # not a failed row blamed on the backend
    check_layer_inputs(_HostArrays, case.spec, case.tensors["input/x"], case.group("param"),
                       case.expert, case.block, meta["mode"], case.tensors.get("input/noise"),
                       None)


class _HostArrays:
    """Enough of a backend for check_layer_inputs to check NumPy arrays."""

    zeros = staticmethod(np.zeros)


def _check_tolerances(case: Case, name: str):
    scheme = case.meta.get("scheme")
    if scheme not in TOLERANCE_BOUNDS:
        raise ValueError(f"case {name}: scheme {scheme!r}: expected one of "
                         f"{', '.join(TOLERANCE_BOUNDS)}")
    tolerances = case.meta.get("tolerance") or {}
    for key in case.group("expect"):
        tol, kind = tolerances.get(key), quantity_kind(key)
        bound = TOLERANCE_BOUNDS[scheme][kind]
        if not (isinstance(tol, list) and len(tol) == 2 and all(
                isinstance(t, (int, float)) and 0 <= t <= b for t, b in zip(tol, bound))):
            raise ValueError(f"case {name}: tolerance of {key} = {tol}: expected [rtol, atol] "
                             f"within [{bound[0]:g}, {bound[1]:g}], the bound for {kind} "
                             f"quantities of {scheme} (TOLERANCE_BOUNDS, "
                             "moe_min/conformance/case.py)")


def case_paths(root: Path | None = None) -> list[Path]:
    root = Path(root) if root else CASES_DIR
    if not root.is_dir():
        raise ValueError(f"cases directory {root} does not exist")
    return sorted(root.rglob("*.safetensors"))
