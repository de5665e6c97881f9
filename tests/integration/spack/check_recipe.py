#!/usr/bin/env python3
"""Checks ExaMoE's Spack recipe (spack/) without Spack: python3 check_recipe.py <repo root>

package.py is loaded against a stand-in of Spack's package API (a fake `spack.package`
module in sys.modules: CMakePackage, CudaPackage, the directives, when(), which, ...) that
records every directive per class, as Spack's DirectiveMeta does. The recorded directives are
then checked for self-consistency and against the project's CMake files:

  * spack/repo.yaml: namespace, and a directory layout that matches the repository API;
  * the Examoe class: derives from CMakePackage and CudaPackage; version("main") of a git
    source that resolves (by default the checkout that holds the recipe, not a placeholder
    host), with the packages.yaml override for a site's own server shown in the recipe and
    the README;
  * the Spack floor: the oldest builtin-packages release (and the Spack that defaults to it)
    with the Kokkos and CUDA versions the recipe asks for, as the recipe and README state it;
  * every condition (when=, `with when(...)`, conflicts/requires specs, dependency specs)
    names only declared variants with allowed values and known dependencies / variants;
  * the variants of the issue with the defaults of the CMake options they drive;
  * dependencies (types included) against find_package()/find_dependency() in the CMake
    files, cmake_minimum_required() and project(... LANGUAGES ...);
  * a small concretizer over the recipe's own directives (plus the few upstream rules of
    kokkos, kokkos-kernels and nccl that matter here): every cuda_arch value reaches kokkos,
    kokkos-kernels and nccl; kokkos and kokkos-kernels get the same version range; ^cuda@13
    needs Kokkos >= 4.7.01; +nccl~cuda (with the recipe's own message only: no nccl
    dependency, so none of nccl's rules) and +cuda cuda_arch=none are rejected; the README's
    `examoe +cuda cuda_arch=90` resolves with Kokkos_ARCH_HOPPER90;
  * cmake_args() for several specs: defines exactly the option()s of CMakeLists.txt with the
    right values, CMAKE_CXX_COMPILER = kokkos_cxx only with +cuda;
  * the standalone test runs `<prefix>/bin/examoe --version`.

Standard library only. Prints one line per check, then "N passed, M failed"; exits 1 on a
failure. The upstream facts below (variants of kokkos & co., Kokkos' cuda_arch map) are
copied from spack/spack-packages (2026); update them when upstream changes.
"""

import contextlib
import importlib.util
import os
import re
import sys
import traceback
import types

PKG = "examoe"
sys.dont_write_bytecode = True  # loading package.py must leave no __pycache__ in spack/

# ---------------------------------------------------------------------------------------------
# Upstream facts (spack-packages), kept to what the recipe can touch.
# ---------------------------------------------------------------------------------------------
CUDA_ARCH_VALUES = ("60", "70", "80", "86", "90", "100", "120")  # stand-in for CudaPackage's

# Kokkos' cuda_arch -> Kokkos_ARCH_<NAME> (subset of Kokkos.spack_cuda_arch_map).
KOKKOS_CUDA_ARCH = {
    "60": "PASCAL60", "70": "VOLTA70", "80": "AMPERE80", "86": "AMPERE86",
    "90": "HOPPER90", "100": "BLACKWELL100", "120": "BLACKWELL120",
}

# Variants of the dependencies: name -> (default, allowed values or None for a bool, multi).
_BOOL_F, _BOOL_T = (False, None, False), (True, None, False)
_KOKKOS_BOOL = (
    "cuda openmp threads serial rocm sycl openmptarget hpx hwloc numactl memkind "
    "aggressive_vectorization atomics_bypass compiler_warnings cuda_constexpr cuda_lambda "
    "cuda_ldg_intrinsic cuda_relocatable_device_code hip_relocatable_device_code "
    "sycl_relocatable_device_code cuda_uvm debug debug_bounds_check debug_dualview_modify_check "
    "deprecated_code hpx_async_dispatch tuning tests wrapper cmake_lang pic alloc_async apu"
).split()
DEP_VARIANTS = {
    "kokkos": dict(
        {v: _BOOL_F for v in _KOKKOS_BOOL},
        complex_align=_BOOL_T, shared=_BOOL_T,
        cuda_arch=("none", ("none",) + CUDA_ARCH_VALUES, False),  # single-valued in kokkos
        cxxstd=("17", ("14", "17", "20", "23"), False),
        amdgpu_target=("none", None, False), intel_gpu_arch=("none", None, False),
    ),
    "kokkos-kernels": dict(
        {v: _BOOL_F for v in (
            "cuda serial openmp threads blas lapack mkl cublas cusparse superlu cblas lapacke "
            "rocblas rocsparse cusolver rocsolver execspace_cuda execspace_openmp "
            "execspace_threads execspace_serial memspace_cudauvmspace memspace_cudaspace"
        ).split()},
        shared=_BOOL_T,
        cuda_arch=("none", ("none",) + CUDA_ARCH_VALUES, True),
        ordinals=("int", ("int", "int64_t"), True),
        offsets=("int,size_t", ("int", "size_t"), True),
        layouts=("left", ("left", "right"), False),
        scalars=("double", ("float", "double", "complex_float", "complex_double"), True),
    ),
    "nccl": {"cuda": _BOOL_T, "cuda_arch": ("none", ("none",) + CUDA_ARCH_VALUES, True),
             "fabrics": ("verbs", None, True)},
    "hdf5": dict({v: _BOOL_F for v in "hl cxx fortran java threadsafe szip map subfiling".split()},
                 shared=_BOOL_T, tools=_BOOL_T, mpi=_BOOL_T, api=("default", None, False)),
    "googletest": {"gmock": _BOOL_T, "pthreads": _BOOL_T, "shared": _BOOL_T,
                   "cxxstd": ("17", None, False)},
    "cuda": {"dev": _BOOL_F, "allow-unsupported-compilers": _BOOL_F},
    "cmake": {"ownlibs": _BOOL_T, "doc": _BOOL_F, "ncurses": _BOOL_T, "qtgui": _BOOL_F},
    "cli11": {},
    "nlohmann-json": {"multiple_headers": _BOOL_T, "conversions": _BOOL_T},
    "kokkos-nvcc-wrapper": {"mpi": _BOOL_F},
}
VIRTUALS = {"mpi": "mpich", "c": "gcc", "cxx": "gcc", "fortran": "gcc"}
COMPILERS = {"gcc", "llvm", "clang", "apple-clang", "oneapi", "nvhpc", "cce", "intel", "xl"}
# Versions the mini-concretizer may pick from (newest first).
CANDIDATES = {
    "kokkos": ["5.1.1", "5.0.2", "4.7.04", "4.7.01", "4.7.00", "4.6.02", "4.5.01", "4.3.01",
               "4.0.00", "3.7.02"],
    "cuda": ["13.0.2", "12.9.1", "12.4.1", "11.8.0"],
    "cmake": ["4.1.2", "3.31.9", "3.27.9", "3.22.6", "3.21.7", "3.20.6"],
    "cli11": ["2.6.1", "2.1.2", "2.0.0", "1.9.1"],
    "nlohmann-json": ["3.12.0", "3.11.2", "2.1.1"],
    "googletest": ["1.17.0", "1.12.1", "1.8.1"],
    "hdf5": ["1.14.6", "1.10.11"],
    "nccl": ["2.27.7-1", "2.23.4-1"],
}
CANDIDATES["kokkos-kernels"] = list(CANDIDATES["kokkos"])
# Releases of the builtin packages (spack/spack-packages tags vYYYY.MM.0): the Spack release that
# defaults to each (its etc/spack/defaults/.../repos.yaml: branch releases/vYYYY.MM) and the
# newest kokkos / kokkos-kernels and cuda each has.
BUILTIN_RELEASES = [
    ("v2025.07", "1.0", "4.6.01", "12.9.0"),
    ("v2025.11", "1.1", "4.7.01", "13.0.2"),
]
# CMake package name (find_package / find_dependency) -> Spack package.
CMAKE_TO_SPACK = {
    "MPI": "mpi", "Kokkos": "kokkos", "KokkosKernels": "kokkos-kernels", "CLI11": "cli11",
    "nlohmann_json": "nlohmann-json", "HDF5": "hdf5", "GTest": "googletest", "NCCL": "nccl",
    "CUDAToolkit": "cuda", "ExaMoE": None,
}
CMAKE_NOT_A_DEPENDENCY = {"Threads", "Python3", "Python", "PkgConfig", "Git", "Doxygen"}
LANGUAGE_TO_SPACK = {"C": "c", "CXX": "cxx", "Fortran": "fortran", "CUDA": "cuda"}
# Non-option CMake variables cmake_args() may set.
ALLOWED_CMAKE_VARS = re.compile(r"^(CMAKE_[A-Z0-9_]+|\w+_ROOT|\w+_DIR|MPI_\w+|HDF5_\w+)$")


# ---------------------------------------------------------------------------------------------
# Versions and a small Spack spec-syntax parser
# ---------------------------------------------------------------------------------------------
def _vkey(v):
    return tuple((1, int(p)) if p.isdigit() else (0, p) for p in re.split(r"[.\-_]", v) if p)


def version_satisfies(v, constraint):
    """v (concrete) against a Spack version constraint: 'a', '=a', 'a:', ':b', 'a:b', lists."""
    for c in constraint.split(","):
        c = c.strip()
        if c.startswith("="):
            if v == c[1:]:
                return True
            continue
        if ":" not in c:
            if v == c or _vkey(v)[: len(_vkey(c))] == _vkey(c):
                return True
            continue
        lo, hi = c.split(":", 1)
        if not re.match(r"^\d", v):  # branch versions (main, develop) only match open ranges
            if not lo and not hi:
                return True
            continue
        ok_lo = not lo or _vkey(v) >= _vkey(lo)
        ok_hi = not hi or _vkey(v) <= _vkey(hi) or _vkey(v)[: len(_vkey(hi))] == _vkey(hi)
        if ok_lo and ok_hi:
            return True
    return False


class SpecSyntaxError(Exception):
    pass


class Node:
    """One node of a parsed spec: name, version constraints, variants; edge is '', '^' or '%'."""

    def __init__(self, edge=""):
        self.edge, self.name, self.versions, self.variants = edge, None, [], {}

    def __repr__(self):
        return f"Node({self.edge}{self.name} @{self.versions} {self.variants})"


_TOKEN = re.compile(
    r"(?P<ws>\s+)|(?P<dep>\^)|(?P<direct>%%?)|(?P<version>@=?[\w.:,\-]*)"
    r"|(?P<bool>(?:\+\+?|~~?)[A-Za-z_][\w-]*)|(?P<kv>[A-Za-z_][\w-]*==?[^\s^%@+~]*)"
    r"|(?P<name>[A-Za-z0-9_][\w.\-]*)"
)


def parse_spec(text):
    """Returns [root, dep, ...] for Spack spec syntax (the subset recipes use)."""
    if not isinstance(text, str):
        raise SpecSyntaxError(f"not a string: {text!r}")
    nodes, pos, expect_name = [Node()], 0, False
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise SpecSyntaxError(f"cannot parse {text!r} at {text[pos:]!r}")
        pos, kind, tok = m.end(), m.lastgroup, m.group()
        cur = nodes[-1]
        if kind == "ws":
            continue
        if kind in ("dep", "direct"):
            if expect_name:
                raise SpecSyntaxError(f"{text!r}: '{tok}' must be followed by a package name")
            nodes.append(Node("^" if kind == "dep" else "%"))
            expect_name = True
            continue
        if kind == "kv" and expect_name and cur.edge == "%":  # %cxx=gcc: virtual=provider
            key, _, value = tok.partition("=")
            cur.name, expect_name = key, False
            cur.variants["__provider__"] = value.lstrip("=")
            continue
        if expect_name and kind != "name":
            raise SpecSyntaxError(f"{text!r}: expected a package name after '{cur.edge}'")
        if kind == "name":
            if cur.name is not None or (not expect_name and (cur.versions or cur.variants)):
                raise SpecSyntaxError(f"{text!r}: unexpected name {tok!r}")
            cur.name, expect_name = tok, False
        elif kind == "version":
            cur.versions.append(tok.lstrip("@"))
        elif kind == "bool":
            cur.variants[tok.lstrip("+~")] = tok.startswith("+")
        elif kind == "kv":
            key, _, value = tok.partition("=")
            values = tuple(x for x in value.lstrip("=").split(",") if x)
            if not values:
                raise SpecSyntaxError(f"{text!r}: variant {key} has no value")
            cur.variants[key] = values
    if expect_name:
        raise SpecSyntaxError(f"{text!r}: ends after '{nodes[-1].edge}'")
    return nodes


# ---------------------------------------------------------------------------------------------
# Stand-in of Spack's package API
# ---------------------------------------------------------------------------------------------
class Directive:
    def __init__(self, kind, args, kwargs, conditions, lineno):
        self.kind, self.args, self.kwargs, self.lineno = kind, args, kwargs, lineno
        self.conditions = conditions  # list of when= strings (when() stack + kwarg)
        self.owner = None

    @property
    def when(self):
        return " ".join(c for c in self.conditions if c) or None

    def __repr__(self):
        args = ", ".join([repr(a) for a in self.args]
                         + [f"{k}={v!r}" for k, v in self.kwargs.items()])
        w = f", when={self.when!r}" if self.when else ""
        return f"{self.kind}({args}{w})  [{self.owner} line {self.lineno}]"


_pending, _when_stack, _default_args = [], [], []


def _directive(kind):
    def record(*args, **kwargs):
        for extra in _default_args:
            for k, v in extra.items():
                kwargs.setdefault(k, v)
        conditions = list(_when_stack)
        if "when" in kwargs:
            conditions.append(kwargs.pop("when"))
        _pending.append(Directive(kind, args, kwargs, conditions, sys._getframe(1).f_lineno))

    record.__name__ = kind
    return record


@contextlib.contextmanager
def when(condition):
    _when_stack.append(condition)
    try:
        yield
    finally:
        _when_stack.pop()


@contextlib.contextmanager
def default_args(**kwargs):
    _default_args.append(kwargs)
    try:
        yield
    finally:
        _default_args.pop()


class _DirectiveMeta(type):
    def __new__(mcs, name, bases, namespace):
        cls = super().__new__(mcs, name, bases, namespace)
        cls._own_directives = list(_pending)
        for d in cls._own_directives:
            d.owner = name
        _pending.clear()
        return cls


# The checker's own base classes below record their directives like the recipe's do.
version = _directive("version")
variant = _directive("variant")
depends_on = _directive("depends_on")
conflicts = _directive("conflicts")
requires = _directive("requires")


class Values:
    """What any_combination_of() & co. return: allowed values, multi-valued, default 'none'."""

    def __init__(self, values, multi=True, default="none"):
        self.values, self.multi, self.default = tuple(values), multi, default


def any_combination_of(*values):
    return Values(("none",) + tuple(values))


def auto_or_any_combination_of(*values):
    return Values(("auto",) + tuple(values), default="auto")


def disjoint_sets(*sets):
    return Values(tuple(v for s in sets for v in s))


class Prefix(str):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Prefix(os.path.join(self, name))

    def join(self, name):
        return Prefix(os.path.join(self, name))


class CallRecorder:
    calls = []


class Executable:
    def __init__(self, path):
        self.path = str(path)

    def __call__(self, *args, **kwargs):
        CallRecorder.calls.append((self.path, args, kwargs))
        out = "examoe 0.1.0\n"
        if kwargs.get("output") in (str, str.split):
            return out
        return None


def which(*args, path=None, required=False):
    CallRecorder.calls.append(("which", args, {"path": path, "required": required}))
    name = str(args[0]) if args else ""
    if not os.path.isabs(name):
        return None if not required else Executable("/usr/bin/" + name)
    return Executable(name)


class InstallError(Exception):
    pass


class SpackError(Exception):
    pass


def _noop_decorator(*_a, **_k):
    return lambda f: f


class PackageBase(metaclass=_DirectiveMeta):
    run_tests = False

    def __init__(self, spec=None):
        self.spec = spec

    @property
    def prefix(self):
        return self.spec.prefix

    @property
    def name(self):
        return self.spec.name

    def __getitem__(self, name):  # Spack >= 1.0: self["dep"] is the dependency's package
        return self.spec[name].package

    def has_variant(self, name):
        return any(v.name == name for v in declared_variants(type(self)))


class Package(PackageBase):
    pass


class CMakePackage(PackageBase):
    build_time_test_callbacks = ["check"]
    variant("build_system", default="cmake", values=("cmake",), description="Build system")
    with when("build_system=cmake"):
        variant("build_type", default="Release", description="CMake build type",
                values=("Debug", "Release", "RelWithDebInfo", "MinSizeRel"))
        variant("generator", default="make", values=("make", "ninja"), description="generator")
        depends_on("cmake", type="build")

    def define(self, cmake_var, value):
        if isinstance(value, bool):
            kind, value = "BOOL", "ON" if value else "OFF"
        else:
            kind = "STRING"
            if isinstance(value, (list, tuple)):
                value = ";".join(str(v) for v in value)
            else:
                value = str(value)
        return f"-D{cmake_var}:{kind}={value}"

    def define_from_variant(self, cmake_var, variant=None):
        variant = variant or cmake_var.lower()
        if not self.has_variant(variant):
            raise KeyError(f'"{variant}" is not a variant of "{PKG}"')
        if variant not in self.spec.variants:
            return ""
        value = self.spec.variants[variant].value
        if isinstance(value, (tuple, list)):
            value = sorted(value)
        return self.define(cmake_var, value)


class CudaPackage(PackageBase):
    cuda_arch_values = CUDA_ARCH_VALUES
    variant("cuda", default=False, description="Build with CUDA")
    variant("cuda_arch", description="CUDA architecture",
            values=any_combination_of(*cuda_arch_values), sticky=True, when="+cuda")
    depends_on("cuda", when="+cuda")
    for _a in ("60", "70"):
        depends_on("cuda@:12.9", when=f"cuda_arch={_a}")
    depends_on("cuda@12.8:", when="cuda_arch=100")
    depends_on("cuda@12.8:", when="cuda_arch=120")
    del _a

    @staticmethod
    def cuda_flags(arch_list):
        return [f"--generate-code arch=compute_{a},code=sm_{a}" for a in arch_list]


class ROCmPackage(PackageBase):
    amdgpu_targets = ("gfx90a", "gfx942")
    variant("rocm", default=False, description="Enable ROCm support")


def _make_fake_spack():
    spack = types.ModuleType("spack")
    api = types.ModuleType("spack.package")
    names = {
        "CMakePackage": CMakePackage, "CudaPackage": CudaPackage, "ROCmPackage": ROCmPackage,
        "Package": Package, "PackageBase": PackageBase, "when": when,
        "default_args": default_args, "any_combination_of": any_combination_of,
        "auto_or_any_combination_of": auto_or_any_combination_of,
        "disjoint_sets": disjoint_sets, "which": which, "Executable": Executable,
        "Prefix": Prefix, "join_path": os.path.join, "InstallError": InstallError,
        "SpackError": SpackError, "run_after": _noop_decorator, "run_before": _noop_decorator,
        "on_package_attributes": _noop_decorator, "working_dir": contextlib.nullcontext,
        "dedupe": lambda seq: list(dict.fromkeys(seq)), "os": os, "re": re,
        "spack_cc": "/spack/env/cc", "spack_cxx": "/spack/env/c++",
        "mkdirp": lambda *a, **k: None, "filter_file": lambda *a, **k: None,
    }
    for kind in ("version", "variant", "depends_on", "conflicts", "requires", "provides",
                 "patch", "resource", "license", "maintainers", "extends", "redistribute",
                 "can_splice", "build_system"):
        names[kind] = _directive(kind)
    for k, v in names.items():
        setattr(api, k, v)
    api.__all__ = list(names)
    spack.package = api
    return {"spack": spack, "spack.package": api}


# ---------------------------------------------------------------------------------------------
# Reading the recorded directives
# ---------------------------------------------------------------------------------------------
class VariantDecl:
    def __init__(self, d):
        self.name = d.args[0]
        self.when = d.when
        kw = d.kwargs
        values, default, multi = kw.get("values"), kw.get("default"), kw.get("multi")
        if isinstance(values, Values):
            default = values.default if default is None else default
            multi = values.multi if multi is None else multi
            values = values.values
        elif callable(values):
            values = None  # validator: any value
        if values is None and default in (None, True, False):
            self.bool, self.values = True, None
            default = bool(default)
        else:
            self.bool, self.values = False, tuple(values) if values is not None else None
        self.default, self.multi = default, bool(multi)
        self.sticky, self.directive = kw.get("sticky", False), d


def all_directives(cls, kind=None):
    out = []
    for klass in reversed(cls.__mro__):
        out.extend(vars(klass).get("_own_directives", []))
    return [d for d in out if kind is None or d.kind == kind]


def declared_variants(cls):
    """Effective variant declarations: a subclass re-declaring (name, when) replaces it."""
    decls = {}
    for d in all_directives(cls, "variant"):
        decls[(d.args[0], d.when)] = VariantDecl(d)
    return list(decls.values())


def dependency_names(cls):
    names = set()
    for d in all_directives(cls, "depends_on"):
        try:
            names.add(parse_spec(d.args[0])[0].name)
        except SpecSyntaxError:
            pass
    return names


# ---------------------------------------------------------------------------------------------
# Concrete stand-in specs, condition evaluation and a small concretizer
# ---------------------------------------------------------------------------------------------
class VariantValue:
    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return repr(self.value)


class FakeKokkosPackage:
    def __init__(self, spec):
        self.spec, self.prefix = spec, spec.prefix

    @property
    def kokkos_cxx(self):  # as the kokkos recipe of Spack >= 1.0 defines it
        if self.spec.variants.get("wrapper") and self.spec.variants["wrapper"].value:
            return self.spec["kokkos-nvcc-wrapper"].package.kokkos_cxx
        return "/spack/env/c++"


class FakeWrapperPackage:
    def __init__(self, spec):
        self.spec, self.prefix = spec, spec.prefix

    @property
    def kokkos_cxx(self):
        return os.path.join(self.prefix, "bin", "nvcc_wrapper")


class FakeDepPackage:
    def __init__(self, spec):
        self.spec, self.prefix = spec, spec.prefix


class ConcreteSpec:
    def __init__(self, name, version, variants, provider=None):
        self.name, self.version = name, version
        self.variants = {k: VariantValue(v) for k, v in variants.items()}
        self.deps = {}
        self.provider = provider  # virtuals: the package providing it
        self.prefix = Prefix(f"/opt/spack/{provider or name}-{version or 'x'}")
        if name == "mpi":
            self.mpicc, self.mpicxx = self.prefix.bin.mpicc, self.prefix.bin.mpicxx
        cls = {"kokkos": FakeKokkosPackage, "kokkos-nvcc-wrapper": FakeWrapperPackage}
        self.package = cls.get(name, FakeDepPackage)(self)

    def traverse(self):
        seen = {}
        stack = list(self.deps.values())
        while stack:
            s = stack.pop()
            if s.name not in seen:
                seen[s.name] = s
                stack.extend(s.deps.values())
        return seen

    def __getitem__(self, name):
        if name == self.name:
            return self
        found = self.traverse().get(name)
        if found is None:
            raise KeyError(f"{name} is not a dependency of {self.name} in this spec")
        return found

    def satisfies(self, text):
        return holds(text, self)

    def __contains__(self, text):
        return holds(text, self)

    def __str__(self):
        parts = [f"{self.name}@{self.version}"]
        for k, v in sorted(self.variants.items()):
            val = v.value
            if isinstance(val, bool):
                parts.append(("+" if val else "~") + k)
            else:
                parts.append(f"{k}={','.join(val) if isinstance(val, tuple) else val}")
        return " ".join(parts)


def _node_holds(node, spec):
    if spec is None:
        return False
    if node.name and node.name not in (spec.name, spec.provider):
        return False
    for vc in node.versions:
        if spec.version is None or not version_satisfies(spec.version, vc):
            return False
    for name, want in node.variants.items():
        if name == "__provider__":
            if spec.provider != want:
                return False
            continue
        if name not in spec.variants:
            return False
        have = spec.variants[name].value
        if isinstance(want, bool):
            if have is not want:
                return False
        else:
            have_set = set(have) if isinstance(have, tuple) else {str(have)}
            if not set(want) <= have_set:
                return False
    return True


def holds(text, spec):
    """Does the concrete `spec` satisfy the (anonymous or named) constraint `text`?"""
    if text is None:
        return True
    nodes = parse_spec(text)
    if not _node_holds(nodes[0], spec):
        return False
    for dep in nodes[1:]:
        target = spec.deps.get(dep.name) if dep.edge == "%" else spec.traverse().get(dep.name)
        if dep.edge == "%" and target is None and dep.name in COMPILERS:
            target = spec.deps.get("cxx")
            if target is not None and target.provider != dep.name:
                target = None
        if not _node_holds(dep, target):
            return False
    return True


class Scenario:
    def __init__(self, label, variants, pins=None, run_tests=False):
        self.label, self.variants, self.run_tests = label, variants, run_tests
        self.pins = pins or {}


class Concretization:
    def __init__(self, root, problems, constraints):
        self.root, self.problems, self.constraints = root, problems, constraints


def _parse_user_value(decl, value):
    if decl.bool:
        return bool(value)
    vals = tuple(str(value).split(",")) if not isinstance(value, tuple) else value
    bad = [v for v in vals if decl.values is not None and v not in decl.values]
    if bad:
        raise ValueError(f"{decl.name}={','.join(bad)} is not an allowed value")
    if not decl.multi and len(vals) != 1:
        raise ValueError(f"{decl.name} is single-valued: {decl.name}={','.join(vals)} rejected")
    return tuple(sorted(vals)) if decl.multi else vals[0]


def _default_value(decl):
    if decl.bool:
        return decl.default
    if decl.multi:
        return tuple(sorted(str(decl.default).split(",")))
    return decl.default


def concretize(cls, scenario):
    """Resolve `scenario` with the recipe's directives and the upstream rules kept above.
    Returns a Concretization, or raises ValueError if the scenario's own spec is invalid."""
    decls = declared_variants(cls)
    versions = [d.args[0] for d in all_directives(cls, "version")]
    root = ConcreteSpec(PKG, versions[0] if versions else None, {})
    unknown = set(scenario.variants) - {d.name for d in decls}
    if unknown:
        raise ValueError(f"no variant {', '.join(sorted(unknown))} in the recipe")
    problems = []
    constraints = {}
    for _ in range(8):
        # variants of the root whose `when` holds now
        new_vars = {}
        for decl in decls:
            if decl.name in new_vars:
                continue
            if holds(decl.when, root):
                value = scenario.variants.get(decl.name, None)
                new_vars[decl.name] = (_parse_user_value(decl, value) if value is not None
                                       else _default_value(decl))
        # dependencies whose `when` holds now, merged per name
        constraints = {}

        def add(name, node, source):
            constraints.setdefault(name, []).append((node, source))

        for d in all_directives(cls, "depends_on"):
            if holds(d.when, root):
                node = parse_spec(d.args[0])[0]
                add(node.name, node, d)
        for d in all_directives(cls, "requires"):
            if len(d.args) == 1 and holds(d.when, root):
                nodes = parse_spec(d.args[0])
                if nodes[0].name is None and not nodes[0].variants and not nodes[0].versions:
                    for n in nodes[1:]:
                        if n.name in constraints or n.name in root.deps:
                            add(n.name, n, d)
        for name, pin in scenario.pins.items():
            add(name, parse_spec(f"{name}{pin}")[0], "scenario")
        new_deps, new_problems = {}, []
        for name, items in constraints.items():
            spec = _resolve_dependency(name, items, new_problems)
            new_deps[name] = spec
        if "kokkos" in new_deps and new_deps["kokkos"].variants.get("wrapper") and \
                new_deps["kokkos"].variants["wrapper"].value:
            new_deps["kokkos"].deps["kokkos-nvcc-wrapper"] = ConcreteSpec(
                "kokkos-nvcc-wrapper", new_deps["kokkos"].version, {})
        for name in ("kokkos-kernels", "nccl"):
            for dep in ("kokkos", "cuda"):
                if name in new_deps and dep in new_deps:
                    new_deps[name].deps[dep] = new_deps[dep]
        if "kokkos" in new_deps and "cuda" in new_deps:
            new_deps["kokkos"].deps["cuda"] = new_deps["cuda"]
        changed = (new_vars != {k: v.value for k, v in root.variants.items()}
                   or {k: str(v) for k, v in new_deps.items()}
                   != {k: str(v) for k, v in root.deps.items()})
        root.variants = {k: VariantValue(v) for k, v in new_vars.items()}
        root.deps = new_deps
        problems = new_problems
        if not changed:
            break
    else:
        problems.append("did not converge")
    problems += _violations(cls, root)
    return Concretization(root, problems, constraints)


def _resolve_dependency(name, items, problems):
    versions = [vc for node, _ in items for vc in node.versions]
    provider = VIRTUALS.get(name)
    if name in CANDIDATES:
        ok = [v for v in CANDIDATES[name] if all(version_satisfies(v, vc) for vc in versions)]
        if not ok:
            problems.append(f"no {name} version satisfies {'; '.join(versions)}")
            chosen = None
        else:
            chosen = ok[0]
    else:
        chosen = None
    table = DEP_VARIANTS.get(name, {})
    values = {}
    for vname, (default, _allowed, multi) in table.items():
        if isinstance(default, bool):
            values[vname] = default
        else:
            values[vname] = tuple(str(default).split(",")) if multi else default
    required = {}
    for node, source in items:
        for vname, want in node.variants.items():
            if vname == "__provider__":
                continue
            prev = required.get(vname)
            if isinstance(want, bool):
                if prev is not None and prev != want:
                    problems.append(f"{name}: both +{vname} and ~{vname} required")
                required[vname] = want
            else:
                multi = table.get(vname, (None, None, True))[2]
                merged = tuple(sorted(set(prev or ()) | set(want)))
                if not multi and len(merged) > 1:
                    problems.append(f"{name}: single-valued {vname} asked to be "
                                    f"{', '.join(merged)} at once")
                required[vname] = merged
    for vname, want in required.items():
        if isinstance(want, bool):
            values[vname] = want
        elif table.get(vname, (None, None, True))[2]:  # multi-valued
            values[vname] = tuple(v for v in want if v != "none") or ("none",)
        else:
            values[vname] = want[0]
    spec = ConcreteSpec(name, chosen, values, provider=provider)
    # cuda_arch only exists with +cuda upstream
    if "cuda_arch" in spec.variants and not values.get("cuda", False):
        del spec.variants["cuda_arch"]
    return spec


def _violations(cls, root):
    """Recipe conflicts()/requires() hit by `root`, and upstream rules of the dependencies."""
    out = []
    for d in all_directives(cls, "conflicts"):
        if holds(d.args[0], root) and holds(d.when, root):
            out.append(f"conflicts({d.args[0]!r}, when={d.when!r}): {d.kwargs.get('msg', '')}")
    for d in all_directives(cls, "requires"):
        if holds(d.when, root):
            policy = d.kwargs.get("policy", "one_of")
            hits = sum(1 for s in d.args if holds(s, root))
            if hits == 0 or (policy == "one_of" and hits > 1):
                out.append(f"requires{d.args!r} (when={d.when!r}) not met")
    deps = root.traverse()
    kokkos, kk, nccl, cuda = (deps.get(n) for n in ("kokkos", "kokkos-kernels", "nccl", "cuda"))
    if kokkos is not None:
        kv = {k: v.value for k, v in kokkos.variants.items()}
        if kv.get("cuda") and kv.get("cuda_arch", "none") == "none":
            out.append("kokkos: conflicts('+cuda', when='cuda_arch=none')")
        if kv.get("wrapper") and not kv.get("cuda"):
            out.append("kokkos: conflicts('+wrapper', when='~cuda')")
        if kv.get("cuda") and not kv.get("wrapper") and not kv.get("cmake_lang"):
            out.append("kokkos: +cuda needs +wrapper (or %clang / +cmake_lang) to build")
        if kv.get("cuda_lambda") and kokkos.version and kokkos.version.startswith("5"):
            out.append("kokkos@5: has no cuda_lambda variant")
        arch = kv.get("cuda_arch")
        if kv.get("cuda") and arch not in (None, "none") and arch not in KOKKOS_CUDA_ARCH:
            out.append(f"kokkos: no Kokkos_ARCH for cuda_arch={arch}")
        if cuda is not None and kv.get("cuda") and cuda.version and kokkos.version and \
                version_satisfies(cuda.version, "13:") and \
                version_satisfies(kokkos.version, ":4.7.0"):
            out.append(f"kokkos: conflicts('^cuda@13:', when='@:4.7.0') "
                       f"(kokkos@{kokkos.version} ^cuda@{cuda.version})")
    if kk is not None and kokkos is not None and kk.version != kokkos.version:
        out.append(f"kokkos-kernels@{kk.version} pins kokkos@{kk.version}, got {kokkos.version}")
    if kk is not None and kk.variants.get("cuda") and kk.variants["cuda"].value and \
            not (kokkos and kokkos.variants["cuda"].value):
        out.append("kokkos-kernels+cuda needs kokkos+cuda")
    if nccl is not None:
        nv = {k: v.value for k, v in nccl.variants.items()}
        if not nv.get("cuda"):
            out.append("nccl: conflicts('~cuda')")
        elif nv.get("cuda_arch", ("none",)) == ("none",):
            out.append("nccl: conflicts('cuda_arch=none')")
    return out


# ---------------------------------------------------------------------------------------------
# The project's CMake files
# ---------------------------------------------------------------------------------------------
def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def cmake_options(root):
    text = _read(os.path.join(root, "CMakeLists.txt"))
    opts = {}
    for m in re.finditer(r'^\s*option\(\s*(\w+)\s+"[^"]*"\s*(\w+)?\s*\)', text, re.M):
        opts[m.group(1)] = (m.group(2) or "OFF").upper() in ("ON", "TRUE", "YES", "1")
    cmin = re.search(r"cmake_minimum_required\(\s*VERSION\s+([\d.]+)", text)
    langs = re.search(r"project\([^)]*LANGUAGES\s+([A-Za-z ]+)\)", text)
    return opts, (cmin.group(1) if cmin else None), (langs.group(1).split() if langs else [])


def cmake_find_calls(root):
    """{cmake package name: [(kind, relative path)]} for find_package / find_dependency."""
    found = {}
    skip_dirs = {".git", "spack", "node_modules"}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith("build")
                       and not os.path.exists(os.path.join(dirpath, d, "CMakeCache.txt"))
                       and os.path.join(rel, d).replace(os.sep, "/") != "tests/integration"]
        for f in filenames:
            if f == "CMakeLists.txt" or f.endswith((".cmake", ".cmake.in")):
                path = os.path.join(dirpath, f)
                text = _read(path)
                text = re.sub(r"#[^\n]*", "", text)
                for m in re.finditer(r"\b(find_package|find_dependency)\(\s*([\w.]+)", text):
                    found.setdefault(m.group(2), []).append(
                        (m.group(1), os.path.relpath(path, root)))
    return found


def read_repo_yaml(path):
    """The two keys Spack reads from repo.yaml, without a YAML library."""
    data, in_repo = {}, False
    for line in _read(path).splitlines():
        line = line.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if re.match(r"^repo:\s*$", line):
            in_repo = True
            continue
        m = re.match(r"^\s+(\w+):\s*(.*)$", line)
        if in_repo and m:
            data[m.group(1)] = m.group(2).strip().strip("'\"")
        elif not line.startswith(" "):
            in_repo = False
    return data


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------
class Checker:
    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.spack_dir = os.path.join(self.root, "spack")
        self.passed, self.failed = [], []
        self.cls = None
        self.recipe_path = None

    def check(self, name, ok, detail=""):
        (self.passed if ok else self.failed).append((name, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""))
        return ok

    def run(self, name, fn):
        try:
            fn()
        except Exception as e:  # a crash in one check is that check's failure
            tb = traceback.extract_tb(e.__traceback__)
            where = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb)
                          if f.filename == self.recipe_path), "")
            self.check(name, False, f"{type(e).__name__}: {e}" + (f" [{where}]" if where else ""))

    # -- repository layout ----------------------------------------------------------------
    def check_repo_yaml(self):
        path = os.path.join(self.spack_dir, "repo.yaml")
        if not self.check("repo.yaml exists", os.path.isfile(path),
                          os.path.relpath(path, self.root)):
            return
        cfg = read_repo_yaml(path)
        ns = cfg.get("namespace", "")
        self.check("repo.yaml namespace", re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$", ns)
                   is not None, f"namespace: {ns!r}")
        api = cfg.get("api", "v1.0")
        m = re.match(r"^v(\d+)\.(\d+)$", api)
        if not self.check("repo.yaml api", m is not None, api):
            return
        subdir = cfg.get("subdirectory", "packages")
        pkg_dir = os.path.join(self.spack_dir, subdir, PKG)
        self.recipe_path = os.path.join(pkg_dir, "package.py")
        if int(m.group(1)) >= 2:
            parent = os.path.basename(os.path.dirname(self.spack_dir))
            ok = os.path.basename(self.spack_dir) == ns.split(".")[-1] and parent == "spack_repo"
            self.check("layout matches the namespace", ok,
                       f"api {api} needs <root>/spack_repo/{ns}/repo.yaml, found "
                       f"{os.path.relpath(self.spack_dir, self.root)}/repo.yaml")
        else:
            self.check("layout matches the namespace", os.path.isfile(self.recipe_path),
                       f"api {api}: namespace {ns!r} -> spack/{subdir}/{PKG}/package.py")

    # -- loading --------------------------------------------------------------------------
    def load(self):
        sys.modules.update(_make_fake_spack())
        spec = importlib.util.spec_from_file_location(f"spack.pkg.examoe.{PKG}", self.recipe_path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except NameError as e:
            raise NameError(f"{e} (if that is real Spack package API, add it to the stand-in "
                            f"in _make_fake_spack())") from e
        leftover = list(_pending)
        _pending.clear()
        self.check("package.py loads with the stand-in API", not leftover,
                   "directives outside a class: " + "; ".join(map(repr, leftover)) if leftover
                   else os.path.relpath(self.recipe_path, self.root))
        cls = getattr(module, "Examoe", None)
        if self.check("class Examoe exists", isinstance(cls, type),
                      "Spack looks for the class named after the package directory"):
            self.check("Examoe derives from CMakePackage and CudaPackage",
                       issubclass(cls, CMakePackage) and issubclass(cls, CudaPackage),
                       ", ".join(b.__name__ for b in cls.__mro__[1:-1]))
            self.cls = cls

    # -- metadata ---------------------------------------------------------------------------
    def check_versions(self):
        cls = self.cls
        vs = all_directives(cls, "version")
        git = getattr(cls, "git", None)
        url_ok = isinstance(git, str) and re.match(r"^((https?|ssh|git|file)://|git@)", git)
        self.check("git attribute", bool(url_ok), f"git = {git!r}")
        self.check_source(git if url_ok else "")
        main = [d for d in vs if d.args and d.args[0] == "main"]
        self.check('version("main", branch="main")',
                   len(main) == 1 and main[0].kwargs.get("branch") == "main",
                   repr(main[0]) if main else "missing")
        vcs = [d for d in vs if {"branch", "tag", "commit"} & set(d.kwargs)
               and not d.kwargs.get("git") and not git]
        self.check("every branch/tag/commit version has a git URL", not vcs,
                   "; ".join(map(repr, vcs)) or f"{len(vs)} version(s)")

    def check_source(self, git):
        """The source resolves: a file:// URL must be this checkout (the recipe's default);
        a remote one must not be a reserved placeholder host (.invalid, .example, ...), whose
        branch Spack can never resolve to a commit (a warning on every spec)."""
        if git.startswith("file://"):
            path = git[len("file://"):]
            ok = os.path.isdir(path) and os.path.samefile(path, self.root)
            self.check("git source: the checkout that holds the recipe", ok,
                       f"git = {git!r}, checkout {self.root}")
        else:
            host = re.sub(r"^(\w+://)?([^@/]*@)?", "", git).split("/")[0].split(":")[0]
            ok = bool(host) and not re.search(r"\.(invalid|example|test|localhost)$|^example\.",
                                              host)
            self.check("git source: a host that exists", ok, f"git = {git!r} (host {host!r})")
        texts = {"recipe": open(self.recipe_path).read(), "README": self._readme()}
        missing = [k for k, t in texts.items()
                   if not re.search(r"package_attributes:\s*\n[#\s]*git:", t)]
        self.check("the recipe and the README show a site's override (packages.yaml "
                   "package_attributes: git:)", not missing, "missing in " + ", ".join(missing)
                   if missing else "both")

    def _readme(self):
        path = os.path.join(self.root, "README.md")
        return open(path).read() if os.path.isfile(path) else ""

    # -- the Spack floor ---------------------------------------------------------------------
    def check_spack_floor(self):
        """The oldest builtin release with a Kokkos the recipe accepts (CPU builds) and, for
        `+cuda ^cuda@13`, a CUDA 13 and a Kokkos accepted with it: its Spack is the floor."""
        def allowed(variants, pins, release):
            _, _, kokkos, cuda = release
            c = self._concretize(variants, pins)
            ranges = [vc for node, src in c.constraints.get("kokkos", []) if src != "scenario"
                      for vc in node.versions]
            ok = [v for v in CANDIDATES["kokkos"] if _vkey(v) <= _vkey(kokkos)
                  and all(version_satisfies(v, r) for r in ranges)]
            return bool(ok) and all(version_satisfies(cuda, p[1:]) for k, p in pins.items()
                                    if k == "cuda")
        cpu = next((r for r in BUILTIN_RELEASES if allowed({"cuda": False}, {}, r)), None)
        gpu = next((r for r in BUILTIN_RELEASES
                    if allowed({"cuda": True, "cuda_arch": "90"}, {"cuda": "@13:"}, r)), None)
        if not self.check("some builtin release has what the recipe needs", cpu and gpu,
                          f"CPU: {cpu}, +cuda ^cuda@13: {gpu}"):
            return
        floor = max(cpu, gpu, key=lambda r: _vkey(r[1]))
        stated = {}
        recipe = open(self.recipe_path).read()
        stated["recipe"] = re.findall(r"[Nn]eeds Spack >= (\d+(?:\.\d+)*)", recipe)
        readme = self._readme()
        stated["README"] = re.findall(r"Spack (?:\()?>= (\d+(?:\.\d+)*)", readme)
        wrong = {k: v for k, v in stated.items() if not v or any(x != floor[1] for x in v)}
        builtin = {k: floor[0] in t for k, t in (("recipe", recipe), ("README", readme))}
        self.check(f"the Spack floor is stated: Spack >= {floor[1]}, builtin packages "
                   f"{floor[0]}", not wrong and all(builtin.values()),
                   f"first release with kokkos {floor[2]} and cuda {floor[3]}; stated: " +
                   ", ".join(f"{k} {v or 'nothing'}" for k, v in stated.items()) +
                   "; " + ", ".join(f"{k} names {floor[0]}: {v}" for k, v in builtin.items()))

    # -- every condition names declared things ---------------------------------------------
    def _validate_node(self, node, errors, where, own_vars, deps):
        if node.edge == "" and node.name in (None, PKG):
            table = {d.name: d for d in own_vars}
            for vname, want in node.variants.items():
                decl = table.get(vname)
                if decl is None:
                    errors.append(f"{where}: {PKG} has no variant {vname!r}")
                elif decl.bool != isinstance(want, bool):
                    errors.append(f"{where}: variant {vname!r} used as "
                                  f"{'bool' if isinstance(want, bool) else 'key=value'}")
                elif not decl.bool and decl.values is not None:
                    bad = [v for v in want if v not in decl.values]
                    if bad:
                        errors.append(f"{where}: {vname}={','.join(bad)} not an allowed value")
            return
        name = node.name
        if node.edge and name not in deps and name not in COMPILERS and \
                name not in ("kokkos-nvcc-wrapper",):
            errors.append(f"{where}: {node.edge}{name} is not a dependency of {PKG}")
            return
        if node.edge == "" and name not in DEP_VARIANTS and name not in VIRTUALS:
            errors.append(f"{where}: unknown Spack package {name!r}")
            return
        table = DEP_VARIANTS.get(name)
        if table is None:
            if node.variants and name in VIRTUALS:
                errors.append(f"{where}: virtual {name!r} takes no variants")
            return
        for vname, want in node.variants.items():
            if vname == "__provider__":
                continue
            if vname not in table:
                errors.append(f"{where}: {name} has no variant {vname!r}")
                continue
            default, allowed, _multi = table[vname]
            if isinstance(default, bool) != isinstance(want, bool):
                errors.append(f"{where}: {name} variant {vname!r} has the wrong kind")
            elif allowed is not None and not isinstance(want, bool):
                bad = [v for v in want if v not in allowed]
                if bad:
                    errors.append(f"{where}: {name} {vname}={','.join(bad)} not allowed")

    def check_conditions(self):
        cls = self.cls
        own_vars = declared_variants(cls)
        deps = dependency_names(cls)
        errors, count = [], 0
        for d in all_directives(cls):
            where = f"{d.owner} line {d.lineno} {d.kind}"
            texts = [c for c in d.conditions if c is not None]
            if d.kind in ("conflicts", "requires"):
                texts += list(d.args)
            for c in d.conditions:
                if not isinstance(c, str):
                    errors.append(f"{where}: when={c!r} is not a spec string")
            for text in (t for t in texts if isinstance(t, str)):
                count += 1
                try:
                    for node in parse_spec(text):
                        self._validate_node(node, errors, where, own_vars, deps)
                except SpecSyntaxError as e:
                    errors.append(f"{where}: {e}")
            if d.kind == "depends_on":
                count += 1
                try:
                    nodes = parse_spec(d.args[0])
                    if len(nodes) > 1 or nodes[0].name is None:
                        errors.append(f"{where}: depends_on({d.args[0]!r}) must name one package")
                    else:
                        self._validate_node(nodes[0], errors, where, own_vars,
                                            deps | {nodes[0].name})
                except SpecSyntaxError as e:
                    errors.append(f"{where}: {e}")
                types_ = d.kwargs.get("type", ("build", "link"))
                types_ = (types_,) if isinstance(types_, str) else tuple(types_)
                bad = [t for t in types_ if t not in ("build", "link", "run", "test")]
                if bad:
                    errors.append(f"{where}: bad dependency type(s) {bad}")
        more = f" (+{len(errors) - 8} more)" if len(errors) > 8 else ""
        self.check("conditions name only declared variants and known dependencies", not errors,
                   "; ".join(errors[:8]) + more if errors else
                   f"{count} specs/conditions in {len(all_directives(cls))} directives")

    # -- variants -----------------------------------------------------------------------------
    def check_variants(self, options):
        decls = {d.name: d for d in declared_variants(self.cls) if d.when in (None, "+cuda")}
        expected = {
            "cuda": (False, "CudaPackage; a GPU build is opt-in"),
            "nccl": (False, "+nccl needs +cuda, which is opt-in"),
            "hdf5": (options.get("ExaMoE_ENABLE_HDF5"), "default of ExaMoE_ENABLE_HDF5"),
        }
        for name, (default, why) in expected.items():
            d = decls.get(name)
            self.check(f"variant {name}", d is not None and d.bool and d.when is None
                       and d.default == default,
                       f"bool, default {default} ({why})" if d is None or d.default == default
                       else f"default is {d.default}, expected {default} ({why})")
        arch = decls.get("cuda_arch")
        ok = (arch is not None and arch.when == "+cuda" and not arch.bool
              and set(CudaPackage.cuda_arch_values) <= set(arch.values or ())
              and _default_value(arch) in ("none", ("none",)))
        kind = "single" if arch and not arch.multi else "multi"
        self.check("variant cuda_arch", ok,
                   f"when=+cuda, default none, all CudaPackage.cuda_arch_values, {kind}-valued"
                   if arch else "missing")

    # -- dependencies vs the CMake files -------------------------------------------------------
    def _dep_types(self, name):
        out = {}
        for d in all_directives(self.cls, "depends_on"):
            if parse_spec(d.args[0])[0].name == name:
                t = d.kwargs.get("type", ("build", "link"))
                out[d.when] = set((t,) if isinstance(t, str) else t)
        return out

    def check_dependencies(self, cmin, langs):
        deps = dependency_names(self.cls)
        finds = cmake_find_calls(self.root)
        errors, seen = [], []
        for cmake_name, where in sorted(finds.items()):
            if cmake_name in CMAKE_NOT_A_DEPENDENCY:
                continue
            if cmake_name not in CMAKE_TO_SPACK:
                errors.append(f"find_package({cmake_name}) in {where[0][1]}: no Spack package "
                              f"known for it (add it to the recipe and to CMAKE_TO_SPACK)")
                continue
            spack_name = CMAKE_TO_SPACK[cmake_name]
            if spack_name is None:
                continue
            seen.append(f"{cmake_name}->{spack_name}")
            if spack_name not in deps:
                errors.append(f"{cmake_name} ({where[0][1]}) has no depends_on({spack_name!r})")
                continue
            types_ = set().union(*self._dep_types(spack_name).values())
            if any(k == "find_dependency" for k, _ in where) and not types_ & {"link", "run"}:
                errors.append(f"{spack_name} is find_dependency()'d by the installed CMake "
                              f"package but has type {sorted(types_)}: dependents would not "
                              f"see it (needs 'link')")
        self.check("find_package()/find_dependency() of the CMake files are dependencies",
                   not errors, "; ".join(errors) or ", ".join(seen))
        for lang in langs:
            want = LANGUAGE_TO_SPACK.get(lang.upper() if lang != "Fortran" else lang, lang.lower())
            self.check(f"depends_on({want!r}) for project LANGUAGES {lang}", want in deps)
        expect_types = {"googletest": {"test"}, "cli11": {"build"}, "cmake": {"build"}}
        for name, want in expect_types.items():
            got = self._dep_types(name)
            ok = bool(got) and all(want <= t and (name != "googletest" or t == {"test"})
                                   for t in got.values())
            self.check(f"{name} dependency type", ok,
                       f"{ {k or 'always': sorted(v) for k, v in got.items()} }")
        for name in ("mpi", "kokkos", "kokkos-kernels"):
            got = self._dep_types(name)
            self.check(f"{name} is a link dependency",
                       bool(got) and all("link" in t for t in got.values()),
                       f"{len(got)} depends_on, types {sorted(set().union(*got.values()))}")
        if cmin:
            cmake_ranges = [vc for d in all_directives(self.cls, "depends_on") if d.when is None
                            for n in [parse_spec(d.args[0])[0]] if n.name == "cmake"
                            for vc in n.versions]
            below = ".".join(cmin.split(".")[:-1] + [str(int(cmin.split(".")[-1]) - 1)]) \
                if cmin.split(".")[-1] != "0" else None
            ok = all(version_satisfies(cmin, vc) for vc in cmake_ranges) and bool(cmake_ranges) \
                and (below is None or not all(version_satisfies(below + ".99", vc)
                                              for vc in cmake_ranges))
            self.check("cmake dependency matches cmake_minimum_required", ok,
                       f"cmake_minimum_required {cmin}, recipe cmake@{','.join(cmake_ranges)}")

    # -- concretization ------------------------------------------------------------------------
    def _concretize(self, variants, pins=None):
        return concretize(self.cls, Scenario("", variants, pins))

    def check_cuda_arch_propagation(self):
        errors = []
        for arch in CudaPackage.cuda_arch_values:
            try:
                c = self._concretize({"cuda": True, "cuda_arch": arch, "nccl": True})
            except ValueError as e:
                errors.append(f"cuda_arch={arch}: {e}")
                continue
            r = c.root
            for dep in ("kokkos", "kokkos-kernels", "nccl"):
                node = r.deps.get(dep)
                if node is None:
                    errors.append(f"cuda_arch={arch}: no {dep} dependency")
                    continue
                have = node.variants.get("cuda_arch")
                have = have.value if have else None
                have = (have,) if isinstance(have, str) else have
                if not node.variants.get("cuda") or not node.variants["cuda"].value:
                    errors.append(f"cuda_arch={arch}: {dep} is not +cuda")
                elif have != (arch,):
                    errors.append(f"cuda_arch={arch}: {dep} gets cuda_arch={have}")
            if c.problems:
                errors.append(f"cuda_arch={arch}: " + "; ".join(c.problems))
        self.check("every cuda_arch reaches kokkos, kokkos-kernels and nccl", not errors,
                   "; ".join(errors[:6]) if errors else
                   f"{len(CudaPackage.cuda_arch_values)} values, +cuda +nccl: "
                   f"{', '.join(CudaPackage.cuda_arch_values)}")
        try:
            c = self._concretize({"cuda": True, "cuda_arch": "80", "nccl": False})
            self.check("~nccl has no nccl dependency", "nccl" not in c.root.deps)
        except ValueError as e:
            self.check("~nccl has no nccl dependency", False, str(e))

    def check_explicit_dependency_variants(self):
        """What the issue asks for is spelled out, not left to upstream defaults."""
        cases = [
            ("+cuda cuda_arch=90", {"cuda": True, "cuda_arch": "90"},
             {"kokkos": {"cuda": True}, "kokkos-kernels": {"cuda": True, "cublas": True}}),
            ("+hdf5", {"hdf5": True}, {"hdf5": {"mpi": True}}),
            ("~hdf5", {"hdf5": False}, {"hdf5": None}),
        ]
        for label, variants, wanted in cases:
            c = self._concretize(variants)
            errors, shown = [], []
            for dep, want in wanted.items():
                explicit = {}
                for node, src in c.constraints.get(dep, []):
                    if src != "scenario":
                        explicit.update(node.variants)
                if want is None:
                    if dep in c.root.deps:
                        errors.append(f"{dep} is a dependency")
                    continue
                if dep not in c.root.deps:
                    errors.append(f"no {dep} dependency")
                    continue
                missing = [("+" if v else "~") + n for n, v in want.items()
                           if explicit.get(n) is not v]
                if missing:
                    errors.append(f"{dep} not explicitly {''.join(missing)}")
                shown.append(dep + "".join(("+" if v else "~") + n for n, v in want.items()))
            self.check(f"{label}: " + (", ".join(shown) if shown else
                                       " ".join(f"no {d}" for d in wanted)),
                       not errors, "; ".join(errors))

    def _allowed_versions(self, variants, pins, dep):
        """Kokkos release candidates the recipe allows for `dep` in this scenario."""
        c = self._concretize(variants, pins)
        ranges = [vc for node, src in c.constraints.get(dep, []) if src != "scenario"
                  for vc in node.versions]
        allowed = [v for v in CANDIDATES["kokkos"] if all(version_satisfies(v, r) for r in ranges)]
        return allowed, ranges

    def check_kokkos_versions(self):
        scenarios = [
            ("~cuda", {"cuda": False}, {}),
            ("+cuda cuda_arch=90 ^cuda@13", {"cuda": True, "cuda_arch": "90"}, {"cuda": "@13:"}),
            ("+cuda cuda_arch=90 ^cuda@12", {"cuda": True, "cuda_arch": "90"}, {"cuda": "@12"}),
        ]
        report, errors = [], []
        for label, variants, pins in scenarios:
            kokkos, kr = self._allowed_versions(variants, pins, "kokkos")
            kk, kkr = self._allowed_versions(variants, pins, "kokkos-kernels")
            span = f"{kokkos[-1]}..{kokkos[0]}" if kokkos else "none"
            report.append(f"{label}: kokkos@{' & @'.join(kr) or ':'} (of the releases: {span}), "
                          f"kokkos-kernels@{' & @'.join(kkr) or ':'}")
            if kokkos != kk:
                errors.append(f"{label}: kokkos allows {kokkos}, kokkos-kernels {kk}")
            if "4.7.01" not in kokkos:
                errors.append(f"{label}: Kokkos 4.7.01 (the tested release) is excluded")
            if "@13:" in pins.values() and any(version_satisfies(v, ":4.7.0") for v in kokkos):
                errors.append(f"{label}: allows Kokkos < 4.7.01, which has no CUDA 13 support")
        self.check("kokkos and kokkos-kernels version ranges match", not errors,
                   "; ".join(errors) if errors else " | ".join(report))

    def check_conflicts(self):
        def outcome(variants, pins=None):
            """(rejected, rejected by the recipe itself, why)"""
            try:
                c = self._concretize(variants, pins)
            except ValueError as e:  # the spec itself is invalid for the recipe's variants
                return True, True, str(e)
            own = [p for p in c.problems if p.startswith(("conflicts(", "requires("))]
            return bool(c.problems), bool(own), "; ".join(c.problems) or "accepted"

        # (label, variants, by the recipe itself: not left to kokkos/nccl to fail)
        # +nccl ~cuda: the recipe's conflict alone. A nccl dependency there would add nccl's own
        # rules (cuda_arch=none), whose unrelated message the real Spack prints first.
        bad, own, why = outcome({"nccl": True, "cuda": False})
        c = self._concretize({"nccl": True, "cuda": False})
        others = [p for p in c.problems if not p.startswith(("conflicts(", "requires("))]
        self.check("+nccl ~cuda: only the recipe's conflict, no nccl dependency",
                   bad and own and not others and "nccl" not in c.root.deps, why)
        for label, variants, own_needed in [
            ("+nccl ~cuda", {"nccl": True, "cuda": False}, True),
            ("+cuda cuda_arch=none", {"cuda": True, "cuda_arch": "none"}, True),
            ("+cuda cuda_arch=80,90 (Kokkos takes one arch)",
             {"cuda": True, "cuda_arch": "80,90"}, False),
        ]:
            bad, own, why = outcome(variants)
            self.check(f"{label} is rejected" + (" by the recipe" if own_needed else ""),
                       bad and (own or not own_needed), why)
        for label, variants, pins in [
            ("~cuda (defaults)", {}, None),
            ("~cuda ~hdf5", {"cuda": False, "hdf5": False}, None),
            ("+cuda cuda_arch=90 +nccl +hdf5",
             {"cuda": True, "cuda_arch": "90", "nccl": True, "hdf5": True}, None),
            ("+cuda cuda_arch=90 ^kokkos@4.7.01 ^cuda@13", {"cuda": True, "cuda_arch": "90"},
             {"kokkos": "@4.7.01", "kokkos-kernels": "@4.7.01", "cuda": "@13:"}),
        ]:
            bad, _own, why = outcome(variants, pins)
            self.check(f"{label} is accepted", not bad, why)

    def check_readme_spec(self):
        c = self._concretize({"cuda": True, "cuda_arch": "90"})
        k = c.root.deps.get("kokkos")
        kv = {n: v.value for n, v in k.variants.items()} if k else {}
        arch = KOKKOS_CUDA_ARCH.get(kv.get("cuda_arch"))
        ok = not c.problems and kv.get("cuda") and arch == "HOPPER90"
        shown = (f"^kokkos@{k.version} " + " ".join(
            ("+" if kv.get(n) else "~") + n for n in ("cuda", "wrapper", "cuda_lambda") if n in kv)
            + f" cuda_arch={kv.get('cuda_arch')} -> Kokkos_ARCH_{arch}") if k else "no kokkos"
        self.check("`examoe +cuda cuda_arch=90` resolves, Kokkos gets Kokkos_ARCH_HOPPER90", ok,
                   "; ".join(c.problems) if c.problems else shown)

    # -- cmake_args -----------------------------------------------------------------------------
    def check_cmake_args(self, options):
        scenarios = [
            Scenario("+cuda cuda_arch=90 +nccl +hdf5",
                     {"cuda": True, "cuda_arch": "90", "nccl": True, "hdf5": True}),
            Scenario("~cuda ~hdf5 (run_tests)", {"cuda": False, "hdf5": False}, run_tests=True),
            Scenario("~cuda +hdf5", {"cuda": False, "hdf5": True}),
            Scenario("+cuda cuda_arch=80 ~nccl ~hdf5 (run_tests)",
                     {"cuda": True, "cuda_arch": "80", "hdf5": False}, run_tests=True),
        ]
        for sc in scenarios:
            name = f"cmake_args() {sc.label}"
            c = concretize(self.cls, sc)
            if c.problems:
                self.check(name, False, "spec does not resolve: " + "; ".join(c.problems))
                continue
            pkg = self.cls(c.root)
            pkg.run_tests = sc.run_tests
            try:
                args = pkg.cmake_args()
            except Exception as e:
                tb = traceback.extract_tb(e.__traceback__)
                line = next((f" [package.py:{f.lineno}: {f.line}]" for f in reversed(tb)
                             if f.filename == self.recipe_path), "")
                hint = ""
                if isinstance(e, AttributeError) and "kokkos_cxx" in str(e):
                    hint = (" (Spack >= 1.0: kokkos_cxx is a property of the kokkos package: "
                            "self[\"kokkos\"].kokkos_cxx)")
                self.check(name, False, f"{type(e).__name__}: {e}{line}{hint}")
                continue
            self.check(name, *self._judge_args(args, sc, c.root, options))

    def _judge_args(self, args, sc, root, options):
        errors, defs = [], {}
        if not isinstance(args, (list, tuple)):
            return False, f"returned {type(args).__name__}, not a list"
        for a in args:
            if a == "":
                continue  # define_from_variant of an inactive variant: CMake ignores it
            m = re.match(r"^-D([^:=]+)(?::(\w+))?=(.*)$", a) if isinstance(a, str) else None
            if not m:
                errors.append(f"not a -D definition: {a!r}")
                continue
            var, kind, value = m.groups()
            if var in defs:
                errors.append(f"{var} defined twice")
            defs[var] = (kind, value)
            if kind == "BOOL" and value not in ("ON", "OFF"):
                errors.append(f"{var}:BOOL={value}")
            if var not in options:
                if "examoe" in var.lower():
                    errors.append(f"{var} is not an option() of CMakeLists.txt "
                                  f"(options: {', '.join(options)})")
                elif not ALLOWED_CMAKE_VARS.match(var):
                    errors.append(f"{var} is neither an option() of CMakeLists.txt nor a "
                                  f"CMake/Find variable")
        missing = [o for o in options if o not in defs]
        if missing:
            errors.append(f"options not set: {', '.join(missing)}")

        def is_on(var):
            return defs.get(var, (None, None))[1] in ("ON", "TRUE", "1", "YES")

        v = {k: x.value for k, x in root.variants.items()}
        want = {"ExaMoE_ENABLE_HDF5": v.get("hdf5"), "ExaMoE_ENABLE_NCCL": v.get("nccl"),
                "ExaMoE_REQUIRE_NCCL": v.get("nccl"),
                "ExaMoE_ENABLE_TESTS": sc.run_tests, "ExaMoE_ENABLE_APPS": True}
        for var, expected in want.items():
            if var in options and var in defs and is_on(var) != bool(expected):
                errors.append(f"{var}={defs[var][1]}, expected {'ON' if expected else 'OFF'}")
        cxx = defs.get("CMAKE_CXX_COMPILER", (None, None))[1]
        if v.get("cuda"):
            expected = root["kokkos"].package.kokkos_cxx
            if cxx != expected:
                errors.append(f"+cuda: CMAKE_CXX_COMPILER={cxx!r}, "
                              f"expected kokkos_cxx {expected!r}")
        elif cxx is not None:
            errors.append(f"~cuda: CMAKE_CXX_COMPILER={cxx!r} set (only +cuda takes kokkos_cxx)")
        shown = " ".join(f"{k}={val}" for k, (_, val) in defs.items() if k in options or
                         k == "CMAKE_CXX_COMPILER")
        return not errors, "; ".join(errors) if errors else shown

    # -- standalone test -----------------------------------------------------------------------
    def check_standalone_test(self):
        fn = getattr(self.cls, "test_version", None)
        if not self.check("standalone test test_version() defined", callable(fn),
                          "Spack runs test_* methods in `spack test run examoe`"):
            return
        self.check("test_version() has a docstring (the test's purpose)", bool(fn.__doc__))
        c = self._concretize({})
        pkg = self.cls(c.root)
        CallRecorder.calls.clear()
        fn(pkg)
        exe_path = os.path.join(c.root.prefix, "bin", "examoe")
        runs = [(p, a) for p, a, _k in CallRecorder.calls if p == exe_path]
        ok = any("--version" in a for _p, a in runs)
        self.check("test_version() runs <prefix>/bin/examoe --version", ok,
                   f"calls: {[(p, a) for p, a, _k in CallRecorder.calls]}")
        tests_cb = getattr(self.cls, "build_time_test_callbacks", ["check"])
        self.check("ctest runs in the check phase under run_tests", "check" in tests_cb,
                   f"build_time_test_callbacks = {tests_cb}")

    # -- all --------------------------------------------------------------------------------------
    def main(self):
        self.check_repo_yaml()
        if not self.recipe_path or not os.path.isfile(self.recipe_path):
            self.check("recipe found", False, "spack/packages/examoe/package.py")
            return self.summary()
        self.run("package.py loads with the stand-in API", self.load)
        if self.cls is None:
            return self.summary()
        options, cmin, langs = cmake_options(self.root)
        self.check("CMakeLists.txt option()s found", bool(options), ", ".join(options))
        self.run("versions", self.check_versions)
        self.run("conditions", self.check_conditions)
        self.run("variants", lambda: self.check_variants(options))
        self.run("dependencies", lambda: self.check_dependencies(cmin, langs))
        self.run("cuda_arch propagation", self.check_cuda_arch_propagation)
        self.run("dependency variants", self.check_explicit_dependency_variants)
        self.run("kokkos versions", self.check_kokkos_versions)
        self.run("conflicts", self.check_conflicts)
        self.run("Spack floor", self.check_spack_floor)
        self.run("README spec", self.check_readme_spec)
        self.run("cmake_args", lambda: self.check_cmake_args(options))
        self.run("standalone test", self.check_standalone_test)
        return self.summary()

    def summary(self):
        if self.failed:
            print("\nFailed:")
            for name, detail in self.failed:
                print(f"  {name}: {detail}")
        print(f"{len(self.passed)} passed, {len(self.failed)} failed")
        return 1 if self.failed else 0


if __name__ == "__main__":
    repo_root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
    sys.exit(Checker(repo_root).main())
