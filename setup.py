"""Which packages the wheel holds. The source folders are top-level (``worker/``,
``training/``, ...) and install as ``hogwild.<folder>``; every package under each one
is found here, so a new subpackage cannot be left out (``tests/test_wheel.py`` checks
the built wheel against the tree). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

# import name under ``hogwild`` -> source folder
FOLDERS = {"contracts": "contracts", "plugin": "plugin", "worker": "worker", "training": "training", "readout": "readout",
           "stories": "stories"}

packages = find_packages(include=["hogwild"])
package_dir = {"hogwild": "hogwild"}
for name, folder in FOLDERS.items():
    package_dir[f"hogwild.{name}"] = folder
    packages += [f"hogwild.{name}{found[len(folder):]}" for found in find_packages(include=[folder, f"{folder}.*"])]

setup(packages=packages, package_dir=package_dir)
