"""The machine a runtime was measured on: CPU model and widest vector extension read from /proc/cpuinfo."""

from __future__ import annotations

import pytest

from cologen import machine


@pytest.mark.parametrize("flags, expected", [("fpu sse2 avx avx2 fma", "avx2"),
                                             ("fpu avx2 avx512f avx512bw", "avx512"),
                                             ("fpu sse2", "other")])
def test_the_widest_vector_extension_is_read_from_the_cpu_flags(tmp_path, monkeypatch, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(machine, "_CPUINFO", cpuinfo)
    assert machine.vector_extension() == expected
    assert machine.cpu_model() == "AMD EPYC 7B13"
    described = machine.describe()
    assert described["vector_extension"] == expected and described["cpu"] == "AMD EPYC 7B13"
    assert machine.label(described) == f"AMD EPYC 7B13, {described['cpu_count']} cores, {expected}"


def test_without_cpuinfo_the_extension_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_CPUINFO", tmp_path / "missing")
    assert machine.vector_extension() == "unknown"
    assert machine.cpu_model()  # platform's answer or "unknown", never empty
