"""Compiles the package's Triton kernels for a Hopper GPU (sm_90) on a machine without one.

Triton's interpreter, which runs the kernels in the CPU tests, executes them as
numpy code and accepts programs that the compiler refuses (a module constant
that is not a ``tl.constexpr``, a type mismatch in a loop-carried value, a
shared-memory footprint over the chip's limit). This tool closes that gap in
two steps, each in its own process because the interpreter must be chosen
before triton is imported:

    python tests/triton_sm90.py capture OUT.json   # TRITON_INTERPRET=1: run every
                                                    # family's Triton path on tiny
                                                    # inputs, record each launch
    python tests/triton_sm90.py compile OUT.json    # compile each recorded launch,
                                                    # and every GPU tile candidate
                                                    # of the InfoNCE kernel, to
                                                    # cubin for sm_90
    python tests/triton_sm90.py compile OUT.json --registers   # and report each
                                                    # kernel's registers and spills
                                                    # (ptxas -v, sm_90a)

A launch is recorded as its kernel, the types of its arguments (pointers with
the 16-byte alignment the launcher would see), its constexprs and its
num_warps / num_stages. ``compile`` prints one line per kernel with its shared
memory and exits non-zero on any failure: a kernel that does not compile, more
shared memory than the chip has, or register spills in the default tile of the
InfoNCE kernel's two hot passes (read with the ptxas that comes with Triton).
"""

import inspect
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED_MEMORY_LIMIT = 227 * 1024  # per block on the H100 / H200, after opting in
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ------------------------------------------------------------------------ capture


def _type_of(value):
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                      torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32",
                      torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _constexpr_value(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):  # e.g. an accumulator dtype
        return {"tl.dtype": value.name}
    return getattr(value, "value", value)  # tl.constexpr objects carry .value


def _constexpr_from_json(value):
    import triton.language as tl

    return tl.dtype(value["tl.dtype"]) if isinstance(value, dict) else value


def _exercise():
    """Runs the Triton path of every family once, forward and backward, on tiny inputs."""
    import torch
    import torch.nn.functional as F

    import pyclloss

    torch.manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape), dim=-1).requires_grad_()  # noqa: E731
    labels = torch.randint(0, 3, (40,))
    for dtype in (torch.float32, torch.float16):
        z1, z2 = unit(40, 33).to(dtype), unit(40, 33).to(dtype)
        z1.retain_grad()
        losses = [
            pyclloss.nt_xent(z1, z2, backend="triton"),
            pyclloss.supcon(z1, labels, backend="triton"),
            pyclloss.pair_nt_xent(z1, labels, backend="triton"),
            pyclloss.clip_loss(z1, z2, 14.0, backend="triton"),
            pyclloss.siglip_loss(z1, z2, 10.0, -10.0, backend="triton"),
            pyclloss.info_nce(z1, z2, queue=unit(50, 33).detach().to(dtype), backend="triton"),
        ]
        sum(losses).backward()
    for family_call in _family_calls():
        family_call()


def _family_calls():
    """One forward+backward per family outside the InfoNCE core, each on triton."""
    import torch
    import torch.nn.functional as F

    import pyclloss

    def gated():
        q, k = torch.randn(24, 16, requires_grad=True), torch.randn(24, 16, requires_grad=True)
        gates = torch.rand(24, 16, requires_grad=True)
        own = torch.randint(0, 4, (24,))
        partner = (own + 1) % 4
        pyclloss.gated_info_nce(q, k, gates, own, partner, own, backend="triton").backward()

    def ft_moco():
        q = F.normalize(torch.randn(8, 16), dim=1).requires_grad_()
        k = F.normalize(torch.randn(8, 16), dim=1)
        queue = F.normalize(torch.randn(64, 16), dim=1)
        pyclloss.ft_moco_loss(q, k, queue, 1.5, torch.rand(64), torch.randperm(64),
                              backend="triton").backward()

    def supremix():
        z = F.normalize(torch.randn(24, 16), dim=1).requires_grad_()
        pyclloss.supremix_loss(z, torch.rand(24) * 4, torch.rand(24, 24),
                               backend="triton").backward()

    def rnc():
        z = torch.randn(24, 16, requires_grad=True)
        pyclloss.rnc_loss(z, torch.rand(24), backend="triton").backward()

    def sorting():
        x = torch.randn(4, 11, requires_grad=True)
        sorted_x, perm = pyclloss.diff_sort(x, backend="triton")
        (sorted_x.sum() + perm.sum()).backward()

    def cacr():
        zs = [torch.randn(40, 20, requires_grad=True) for _ in range(2)]
        pyclloss.cacr_loss(*zs, backend="triton").backward()

    def amcl():
        net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                  torch.nn.Linear(16, 16))
        # k = min(topk, 2B − 2) rounded up to 128 and to 256 lanes, on one head and
        # the fewest rows that reach it: the interpreter's tl.sort takes seconds a program
        for b, topk in ((34, 100), (66, 256)):
            z1, z2 = torch.randn(b, 1, 16, requires_grad=True), torch.randn(b, 1, 16)
            pyclloss.amcl_loss(z1, z2, net, topk=topk, backend="triton").backward()

    return [gated, ft_moco, supremix, rnc, sorting, cacr, amcl]


def capture(path: str):
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    records = {}
    original = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args), **kwargs)
        params = inspect.signature(self.fn).parameters
        signature, constexprs, options = {}, {}, {}
        for name in self.arg_names:
            if name not in bound:
                continue  # a default the kernel fills itself
            value = bound[name]
            if "constexpr" in str(params[name].annotation):
                constexprs[name] = _constexpr_value(value)
                signature[name] = "constexpr"
            else:
                signature[name] = _type_of(value)
        for name in LAUNCH_OPTIONS:
            if name in bound:
                options[name] = bound[name]
        record = {"module": self.fn.__module__, "name": self.fn.__name__,
                  "signature": signature, "constexprs": constexprs, "options": options}
        records[json.dumps(record, sort_keys=True)] = record
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    _exercise()
    with open(path, "w") as f:
        json.dump(list(records.values()), f, indent=1)
    print(f"captured {len(records)} distinct launches")


# ------------------------------------------------------------------------ compile


def _jit_function(module: str, name: str):
    import importlib

    obj = getattr(importlib.import_module(module), name)
    while not hasattr(obj, "arg_names") or hasattr(obj, "configs"):
        obj = obj.fn  # through autotuners and heuristics to the JITFunction
    return obj


def compile_one(record, arch: int = 90):
    """The compiled kernel of one recorded launch (raises what the compiler raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(record["module"], record["name"])
    signature = dict(record["signature"])
    # The launcher tells the compiler which pointers are 16-byte aligned (all that
    # torch allocates) and which integers divide by 16: D = 16·k is the common
    # case, and a chunk of rows starts at a multiple of 256.
    aligned = [name for name, kind in signature.items()
               if kind.startswith("*") or name in ("D", "row0")]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    constexprs = {k: _constexpr_from_json(v) for k, v in record["constexprs"].items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=record["options"])


def infonce_candidates(records):
    """Every GPU tile candidate of the InfoNCE tiles kernel for its two hot passes
    (forward with column statistics, gradient chunks), in bf16 and in fp32."""
    import torch

    from pyclloss.triton_kernels import info_nce as tri

    hot = {}
    for record in records:
        constexprs = record["constexprs"]
        clip_forward = constexprs.get("PASS") == 0 and constexprs.get("COL_STATS")
        clip_backward = constexprs.get("PASS") == 3 and constexprs.get("COL_TERM")
        if record["name"] == "_tiles_kernel" and (clip_forward or clip_backward):
            hot.setdefault(constexprs["PASS"], record)
    out = []
    for record in hot.values():
        for pointer, dtype in (("*bf16", torch.bfloat16), ("*fp32", torch.float32)):
            for index, config in enumerate(tri._gpu_candidates(dtype, 512)):
                config = dict(config)
                options = {k: config.pop(k) for k in ("num_warps", "num_stages")}
                constexprs = dict(record["constexprs"], **config,
                                  DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32")
                signature = dict(record["signature"], q_ptr=pointer, k_ptr=pointer,
                                 grad_ptr=pointer)
                out.append(dict(record, signature=signature, constexprs=constexprs,
                                options=options, no_spills=index == 0))
    return out


def _ptxas():
    """A ptxas that reads the PTX this Triton writes (its own newest one), or None."""
    import glob

    import triton

    found = sorted(glob.glob(os.path.join(os.path.dirname(triton.__file__),
                                          "backends", "nvidia", "bin", "ptxas*")))
    return found[-1] if found else None


def registers(ptx: str):
    """(registers, spill-store bytes) from ptxas -v for sm_90a, or None without ptxas."""
    import re
    import subprocess
    import tempfile

    ptxas = _ptxas()
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", source, "-o",
                                 os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if regs is None or spills is None:
        return None
    return int(regs.group(1)), int(spills.group(1))


def compile_all(path: str, report_registers: bool = False) -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    print(f"triton {triton.__version__} at {os.path.realpath(os.path.dirname(triton.__file__))}")
    with open(path) as f:
        records = json.load(f)
    failures = 0
    for record in records + infonce_candidates(records):
        label = (f"{record['name']} {record['options']} " +
                 " ".join(f"{k}={v}" for k, v in sorted(record["constexprs"].items())
                          if k.isupper() and k.startswith(("BLOCK", "PASS", "FLAT", "DOT"))))
        try:
            kernel = compile_one(record)
        except Exception as exc:
            failures += 1
            print(f"FAILED {label}: {type(exc).__name__}: {str(exc)[:2000]}")
            continue
        shared = kernel.metadata.shared
        problems = [f"shared memory over {SHARED_MEMORY_LIMIT} B"] if \
            shared > SHARED_MEMORY_LIMIT else []
        usage = ""
        if report_registers or record.get("no_spills"):
            found = registers(kernel.asm["ptx"])
            if found:
                usage = f", registers {found[0]}, spills {found[1]} B"
                if record.get("no_spills") and found[1]:
                    problems.append("the default configuration spills registers")
        failures += bool(problems)
        print(f"{'FAILED' if problems else 'ok'} {label}: shared {shared} B, "
              f"wgmma {kernel.asm['ptx'].count('wgmma.mma_async')}{usage}"
              + "".join(f" ({p})" for p in problems))
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    step, out = sys.argv[1], sys.argv[2]
    if step == "capture":
        capture(out)
    else:
        sys.exit(compile_all(out, report_registers="--registers" in sys.argv))
