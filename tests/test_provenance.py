"""dissect.provenance: the CPU is recorded beside the software versions."""
from __future__ import annotations

import torch

from dissect.provenance import cpu_description, software_versions


def test_cpu_description_names_the_model_and_the_kernels_instruction_set(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 2.0GHz\n"
                    "processor\t: 1\nmodel name\t: Example CPU @ 2.0GHz\n")
    capability = torch.backends.cpu.get_cpu_capability()
    assert cpu_description(info) == f"Example CPU @ 2.0GHz ({capability})"
    missing = cpu_description(tmp_path / "absent")  # not Linux: still a name, never an error
    assert missing.endswith(f" ({capability})") and len(missing) > len(capability) + 3


def test_versions_carry_the_cpu() -> None:
    assert software_versions()["cpu"] == cpu_description()
