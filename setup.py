"""Ships ``hf_mmsel_peft_hook.pth`` next to the package in site-packages (wheel and editable installs).

The .pth makes every interpreter call ``hf_mmsel._peft_hook._startup()``: a finder that registers the MoLA tuner
with peft right after peft is imported, so ``PeftModel.from_pretrained(base, "<a MoLA adapter>")`` works in a
process that never imports hf_mmsel. Everything else is configured in pyproject.toml.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "hf_mmsel_peft_hook.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    """Regular wheels: the .pth lands at the root of the wheel, i.e. in site-packages."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class editable_wheel_with_pth(editable_wheel):
    """Editable installs (PEP 660): add the same .pth to the editable wheel next to setuptools' own finder .pth
    (``__editable__.*.pth`` sorts first, so the package is importable when ours runs)."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(os.path.join(HERE, PTH), os.path.join(unpacked_wheel, PTH), preserve_mode=0)
        return result


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
