"""The compiled part of meshgate (everything else is declared in pyproject.toml).

`python setup.py build_pgo` builds it profile-guided (decision 2700), as `make setup` does:
an instrumented build, a training run of the plugin chain (`bench/plugin_chain.py
--train`), then the build GCC lays out by that run's profile. A plain `pip install`
builds it without a profile.
"""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Command, Extension, setup

HERE = Path(__file__).resolve().parent
#: Both builds compile to the same object path: GCC finds a profile by that path.
PGO_TEMP = "build/pgo-temp"
TRAINING_REQUESTS = "4000"
# setuptools' notice that `[tool.setuptools]` in pyproject.toml is beta, printed by every
# run of this file (build_pgo runs it three times): nothing a build of meshgate acts on.
warnings.filterwarnings("ignore", message=r"Support for `\[tool\.setuptools\]`")


class BuildPgo(Command):
    description = "build the compiled crossings in place, laid out by a training run's profile"
    user_options = [("plugins=", None, "folder with rate_limit.wasm and auth.wasm")]

    def initialize_options(self) -> None:
        self.plugins = "build/plugins"

    def finalize_options(self) -> None:
        self.plugins = str(Path(self.plugins).resolve())

    def run(self) -> None:
        profile = HERE / "build/pgo-profile"
        shutil.rmtree(profile, ignore_errors=True)
        train = [sys.executable, str(HERE / "bench/plugin_chain.py"), "--plugins", self.plugins,
                 "--train", TRAINING_REQUESTS]
        if (build_in_place(f"-fprofile-generate={profile} -fprofile-update=atomic",
                           "-fprofile-generate")
                and subprocess.run(train, cwd=HERE).returncode == 0
                and build_in_place(f"-fprofile-use={profile} -fprofile-correction", "")):
            return
        # An instrumented build must not stay: it is slower and writes profiles.
        print("setup.py build_pgo: a step failed (instrumented build, training run or "
              "profiled build); building without a profile", file=sys.stderr)
        if not build_in_place("", ""):
            raise SystemExit("setup.py build_pgo: the plain build failed")


def build_in_place(cflags: str, ldflags: str) -> bool:
    env = {**os.environ,
           "CFLAGS": f"{os.environ.get('CFLAGS', '')} {cflags}".strip(),
           "LDFLAGS": f"{os.environ.get('LDFLAGS', '')} {ldflags}".strip()}
    build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--force",
             "--build-temp", PGO_TEMP]
    return subprocess.run(build, cwd=HERE, env=env).returncode == 0


setup(
    cmdclass={"build_pgo": BuildPgo},
    ext_modules=[
        Extension(
            "meshgate.gateway.wasm._crossing",
            sources=["meshgate/gateway/wasm/_crossing.c"],
            depends=["meshgate/gateway/wasm/_fastpaths.h", "meshgate/gateway/wasm/_driver.h",
                     "meshgate/gateway/wasm/_attrs.h", "meshgate/gateway/wasm/_epoch.h",
                     "meshgate/gateway/wasm/_streams.h",
                     "meshgate/gateway/wasm/_phases.h", "meshgate/gateway/wasm/_chain.h"],
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
        )
    ],
)
