"""Build the Cython extensions in src/lmgw/_fast/ and map the simulators into the package.

Everything declarative lives in pyproject.toml; this file exists because extension modules and the
`simulators/` -> `lmgw.simulators` mapping are easiest to state in code.
"""

import os

from setuptools import Extension, find_packages, setup

try:
    from Cython.Build import cythonize
except ImportError:  # sdist consumers without Cython: fall back to pure-Python twins at runtime
    cythonize = None

FAST = os.path.join("src", "lmgw", "_fast")
ext_names = ["hashring", "tensorframe", "prefix", "chunked", "h1parse", "relay", "ssestream"]
extensions = [
    Extension(f"lmgw._fast.{name}", [os.path.join(FAST, f"{name}.pyx")], extra_compile_args=["-O3"])
    for name in ext_names
]

setup(
    package_dir={"": "src", "lmgw.simulators": "simulators"},
    packages=[*find_packages("src"), "lmgw.simulators"],
    ext_modules=cythonize(extensions, language_level=3) if cythonize else [],
    zip_safe=False,
)
