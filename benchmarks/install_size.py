"""The size of lungzarr's install: the distributions its requirements pull in, as installed here.

    python -m benchmarks.install_size [--extra s3 ...] [--name install_size]

Reads ``[project].dependencies`` of the checkout's ``pyproject.toml`` (and the optional dependencies of
each ``--extra``), follows every requirement whose environment marker holds here through the installed
distributions' own ``Requires-Dist`` (with the extras each requirement names), and adds up the files
each distribution's RECORD lists, as they are on disk. lungzarr itself, pip and the interpreter are not
counted; a fresh virtual environment adds pip (about 10 MB). A requirement that is not installed here is
listed under ``missing``, never guessed. Seconds, no network.
"""
from __future__ import annotations

import argparse
import platform
import time
import tomllib
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks.harness import REPO, write_result


def _holds(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**default_environment(), "extra": extra}) for extra in extras or {""})


def closure(requirements: list[str]) -> tuple[dict[str, metadata.Distribution], list[str]]:
    """The installed distributions ``requirements`` need, by canonical name, and the names not installed."""
    found: dict[str, metadata.Distribution] = {}
    missing: list[str] = []
    todo = [(Requirement(text), set()) for text in requirements]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        requirement, parent_extras = todo.pop()
        if not _holds(requirement, parent_extras):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        found[name] = dist
        todo.extend((Requirement(text), set(requirement.extras)) for text in dist.requires or ())
    return found, sorted(set(missing))


def installed_bytes(dist: metadata.Distribution) -> int:
    """The bytes of the files ``dist``'s RECORD lists, as they are on disk now."""
    total = 0
    for file in dist.files or ():
        path = file.locate()
        if path.is_file():
            total += path.stat().st_size
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=[], help="an optional dependency group to add")
    parser.add_argument("--name", default="install_size")
    args = parser.parse_args(argv)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in args.extra:
        requirements += project["optional-dependencies"][extra]
    t0 = time.perf_counter()
    found, missing = closure(requirements)
    sizes = {name: installed_bytes(dist) for name, dist in found.items()}
    result = {
        "what": "installed size of lungzarr's requirements (pyproject.toml dependencies and their own, "
                "as installed here; RECORD files on disk; lungzarr, pip and the interpreter not counted)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "machine": platform.machine()},
        "extras": args.extra,
        "distributions": len(found),
        "total_bytes": sum(sizes.values()),
        "missing": missing,
        "per_distribution": {name: {"version": found[name].version, "bytes": sizes[name]}
                             for name in sorted(sizes, key=sizes.get, reverse=True)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_result(args.name, result)
    print(f"{len(found)} distributions, {result['total_bytes'] / 1e9:.2f} GB; missing: {missing or 'none'}")


if __name__ == "__main__":
    main()
