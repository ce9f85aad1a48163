"""The compiled part of meshgate (everything else is declared in pyproject.toml)."""

from setuptools import Extension, setup

setup(
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
    ]
)
