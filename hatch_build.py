"""Hatch build hook: ship the top-level `backends/` and `models/` as `moe_min/backends` and
`moe_min/models`, in the standard wheel only. An editable install maps `moe_min` alone and its
`__init__` finds the two folders in the checkout; copies there would shadow the editable package.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == "standard":
            for name in ("backends", "models"):
                build_data["force_include"][f"{self.root}/{name}"] = f"moe_min/{name}"
