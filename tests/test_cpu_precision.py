"""CPU ranks train in fp32 unless the CPU computes bf16 natively (rils_scale/train/precision.py):
the DeepSpeed config's bf16 on a CPU without avx512_bf16/amx_bf16 resolves to fp32 with a
message; ``--precision bf16``, a CPU with native bf16 and a resumed bf16 run keep bf16; GPUs
are left to the config. (The start-up line of a real launch is checked by test_launch_single_rank.py
and test_demo.py.)"""
import json

from rils_scale.train.precision import cpu_native_bf16, resolve_precision

AVX2 = "fpu vme sse sse2 avx avx2 fma"
SAPPHIRE = AVX2 + " avx512f avx512_bf16 amx_bf16 amx_tile"


def _cpuinfo(tmp_path, flags, key="flags"):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\n{key}\t\t: {flags}\n\nprocessor\t: 1\n{key}\t\t: {flags}\n")
    return str(path)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    assert cpu_native_bf16(_cpuinfo(tmp_path, AVX2)) == (False, "no avx512_bf16 or amx_bf16 CPU flag")
    assert cpu_native_bf16(_cpuinfo(tmp_path, SAPPHIRE)) == (True, "amx_bf16/avx512_bf16")
    assert cpu_native_bf16(_cpuinfo(tmp_path, AVX2 + " avx512_bf16")) == (True, "avx512_bf16")


def test_config_bf16_on_a_cpu_without_native_bf16_becomes_fp32(tmp_path):
    no, yes = (False, "no avx512_bf16 or amx_bf16 CPU flag"), (True, "amx_bf16")
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    note = resolve_precision("config", ds, "cpu", no)
    assert ds["bf16"] == {"enabled": False} and note.startswith("fp32 instead of the DeepSpeed config's bf16")
    assert "--precision bf16" in note
    # asked explicitly, native hardware, or a GPU: bf16 stays
    for requested, device, native, says in (("bf16", "cpu", no, "emulated"), ("config", "cpu", yes, "native"),
                                            ("bf16", "cpu", yes, "native"), ("config", "gpu", no, "")):
        ds = {"bf16": {"enabled": True}}
        note = resolve_precision(requested, ds, device, native)
        assert ds["bf16"]["enabled"] is True and says in note, (requested, device, note)
    # fp32 in the config or on the command line: nothing to decide
    ds = {"bf16": {"enabled": False}}
    assert resolve_precision("fp32", ds, "cpu", no) == "" and ds["bf16"]["enabled"] is False
    # --resume of a run that trained in bf16 keeps it (DeepSpeed names optimizer files by precision)
    (tmp_path / "config.json").write_text(json.dumps({"deepspeed": {"bf16": {"enabled": True}}}))
    ds = {"bf16": {"enabled": True}}
    note = resolve_precision("config", ds, "cpu", no, resume_dir=str(tmp_path))
    assert ds["bf16"]["enabled"] is True and "resumed run" in note
    (tmp_path / "config.json").write_text(json.dumps({"deepspeed": {"bf16": {"enabled": False}}}))
    ds = {"bf16": {"enabled": True}}
    resolve_precision("config", ds, "cpu", no, resume_dir=str(tmp_path))
    assert ds["bf16"]["enabled"] is False
