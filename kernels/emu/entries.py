"""Writes the launch table of the stand-in libcuda.so: for each extern "C" __global__ entry point
of the given .cu folder, a wrapper that unpacks cuLaunchKernel's argument array and a check that
every pointer argument lies in device memory."""
import re, sys, glob
out = []
names = []
for path in sorted(glob.glob(sys.argv[1] + "/*.cu")):
    src = open(path).read()
    for m in re.finditer(r'extern "C" __global__ void\s+(\w+)\s*\(([^)]*)\)', src):
        name, params = m.group(1), m.group(2)
        ps = [p.strip() for p in params.split(',') if p.strip()]
        args, checks = [], []
        for i, p in enumerate(ps):
            ident = re.search(r'(\w+)\s*$', p).group(1)
            ty = p[: p.rfind(ident)].strip()
            args.append(f"*({ty}*)p[{i}]")
            if ty.endswith('*'):
                checks.append(f'check_ptr("{name}", {i}, *(const void**)p[{i}]);')
        out.append(f"static void check_{name}(void** p) {{ {' '.join(checks)} }}")
        out.append(f"static void wrap_{name}(void** p) {{ {name}({', '.join(args)}); }}")
        names.append(name)
print("\n".join(out))
print("struct Entry { const char* name; void (*fn)(void**); void (*check)(void**); };")
print("static Entry g_entries[] = {")
for n in names:
    print(f'  {{"{n}", wrap_{n}, check_{n}}},')
print("  {nullptr, nullptr, nullptr}};")
