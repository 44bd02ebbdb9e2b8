"""The developer tools' own logic, where it runs without their external programs (nvcc, nvdisasm)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# nvdisasm's layout: a loop (.L_x_0 .. the predicated back branch) whose mask block a forward branch
# skips, and an exit branch that leaves it.
SASS = """
//--------------------- .text._Z1kv --------------------------
\t.section\t.text._Z1kv,"ax",@progbits
_Z1kv:
.text._Z1kv:
        /*0000*/                   MOV R0, RZ ;                                    /* 0x00 */
.L_x_0:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R1], desc[UR6][R2.64] ;    /* 0x00 */
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;          /* 0x00 */
        /*0030*/               @P3 BRA `(.L_x_2) ;                                 /* 0x00 */
        /*0040*/              @!P0 BRA `(.L_x_1) ;                                 /* 0x00 */
        /*0050*/                   ISETP.GE.AND P1, PT, R0, R1, PT ;               /* 0x00 */
        /*0060*/                   FSEL R4, R4, -INF , !P1 ;                       /* 0x00 */
.L_x_1:
        /*0070*/                   MUFU.EX2 R4, R4 ;                               /* 0x00 */
        /*0080*/               @P2 BRA `(.L_x_0) ;                                 /* 0x00 */
.L_x_2:
        /*0090*/                   EXIT ;                                          /* 0x00 */
\t.section\t.nv.shared._Z1kv,"aw",@nobits
"""


def test_sass_census_counts_each_path_through_a_loop_iteration():
    census = load_tool("sass_census")
    kernels = census.parse(SASS)
    assert list(kernels) == ["_Z1kv"]
    instrs, labels = kernels["_Z1kv"]
    assert [op for op, _ in instrs][:3] == ["MOV", "LDGSTS.E.BYPASS.128", "HMMA.16816.F32.BF16"]
    span, paths = census.loop_paths(instrs, labels)
    assert span == (1, 8)
    fewest = {census.classify(op): n for op, n in paths["fewest"].items()}
    most = {census.classify(op): n for op, n in paths["most"].items()}
    # The exit branch is taken by neither (it leaves the loop); predicated, it still takes a slot.
    assert fewest == {"MEM": 1, "HMMA": 1, "OTHER": 3, "MUFU": 1}
    assert most == {"MEM": 1, "HMMA": 1, "OTHER": 3, "INT": 1, "FP32": 1, "MUFU": 1}
