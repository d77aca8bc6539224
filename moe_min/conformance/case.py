"""One conformance case = one safetensors file: inputs, parameters, the oracle's expected
outputs, and two JSON strings in the header (`spec`, `case`). Any safetensors reader can open
the files; moe_min reads them with NumPy alone (moe_min/tensorio.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_min.spec import from_dict, from_json
from moe_min.tensorio import load_safetensors, save_safetensors

CASES_DIR = Path(__file__).parent / "cases"


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
        save_safetensors(path, self.tensors, {"spec": self.spec.to_json(),
                                              "case": json.dumps(self.meta, sort_keys=True)})


def read_case(path: Path) -> Case:
    """A case file, checked whole before it runs; any defect is one ValueError naming it."""
    tensors, metadata = load_safetensors(path)
    if not isinstance(metadata.get("spec"), str) or not isinstance(metadata.get("case"), str):
        raise ValueError(f"{path}: not a conformance case (no 'spec'/'case' in its metadata)")
    try:
        case = Case(from_json(metadata["spec"]), json.loads(metadata["case"]), tensors)
        _check(case)
        _ = case.expert, case.block  # their specs, validated when they parse
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: bad case ({type(e).__name__}: {e})") from None
    return case


def _check(case: Case) -> None:
    meta, expects = case.meta, [k[len("expect/"):] for k in case.tensors if
                                k.startswith("expect/")]
    if not isinstance(meta, dict) or meta.get("mode") not in ("train", "eval", "causal"):
        raise ValueError("its 'case' metadata needs a mode of train, eval or causal")
    tolerance = meta.get("tolerance")
    for key in expects:
        tol = tolerance.get(key) if isinstance(tolerance, dict) else None
        if not (isinstance(tol, list) and len(tol) == 2 and all(
                isinstance(t, (int, float)) and 0 <= t < float("inf") for t in tol)):
            raise ValueError(f"tolerance of {key!r} is {tol!r}: expected [rtol, atol], finite, "
                             ">= 0")
    needed = ["input/x"] + (["input/cotangent"] if any(k.startswith("grad/") for k in expects)
                            else [])
    missing = [k for k in needed if k not in case.tensors]
    if missing or not isinstance(meta.get("name"), str):
        raise ValueError(f"missing {missing or 'name'}: a case has input/x (and input/cotangent "
                         "with gradients) and a name")


def case_paths(root: Path | None = None) -> list[Path]:
    root = Path(root) if root else CASES_DIR
    if not root.is_dir():
        raise ValueError(f"cases directory {root} does not exist")
    return sorted(root.rglob("*.safetensors"))
