"""The developer tools' own logic, where it runs without their external programs (nvcc, nvdisasm)."""
import importlib.util
import itertools
import os
from math import prod

from hypothesis import given, settings
from hypothesis import strategies as st

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


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=5))
def test_all_pairs_covers_every_two_options_values(sizes):
    # helpers.all_pairs, which picks the emulator's attention cases: every value of each axis meets
    # every value of each other axis in some case; ids as the stacked decorators gave them
    from helpers import all_pairs

    axes = [(f"a{i}", [f"v{i}{j}" for j in range(n)], None) for i, n in enumerate(sizes)]
    if len(sizes) > 1:  # an axis of two names given together, as "causal, window"
        axes[-1] = (f"a{len(sizes) - 1}, b", [(f"v{len(sizes) - 1}{j}", j) for j in range(sizes[-1])],
                    [f"w{j}" for j in range(sizes[-1])])
    every, picked = (all_pairs(axes, e).args[1] for e in (True, False))
    assert len(every) == prod(sizes) and {p.id for p in picked} <= {p.id for p in every}
    assert len(picked) <= len(every) and len({p.id for p in picked}) == len(picked)
    first = lambda value: value[0] if isinstance(value, tuple) else value  # noqa: E731
    rows = [[first(v) for v in p.values[:len(sizes)]] for p in picked]
    for a in range(len(sizes)):
        assert {row[a] for row in rows} == {first(v) for v in axes[a][1]}
    for a, b in itertools.combinations(range(len(sizes)), 2):
        want = {(x, y) for x in (first(v) for v in axes[a][1]) for y in (first(v) for v in axes[b][1])}
        assert {(row[a], row[b]) for row in rows} == want
    if len(sizes) > 1:  # the last axis's id first, its two values each given
        assert every[0].id.startswith("w0-") and every[0].values[-2:] == ("v%d0" % (len(sizes) - 1), 0)
